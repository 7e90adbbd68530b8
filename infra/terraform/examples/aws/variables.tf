variable "region" {
  type        = string
  description = "AWS region of everything."
  default     = "us-east-1"
}

variable "name_prefix" {
  type        = string
  description = "Prefix of every name: buckets, roles, the cluster. Bucket names are global: make it unique."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets in at least two availability zones, with a NAT gateway (image pulls, the hub)."
}

variable "public_endpoint_cidrs" {
  type        = list(string)
  description = "CIDRs that may reach the Kubernetes API (your office or VPN); empty keeps it private."
  default     = []
}

variable "gpu_pools" {
  type = list(object({
    name          = string
    instance_type = string
    gpu_count     = number
    min_size      = number
    max_size      = number
    spot          = bool
  }))
  description = "GPU node groups (see the cluster module)."
  default = [
    { name = "l4", instance_type = "g6.4xlarge", gpu_count = 1, min_size = 0, max_size = 8, spot = false },
  ]
}

variable "image" {
  type        = string
  description = "The llmbatch image in your registry (`make image`, then push)."
}
