variable "name" {
  type        = string
  description = "The EKS cluster's name."
}

variable "kubernetes_version" {
  type        = string
  description = "Kubernetes version of the control plane and node groups, e.g. 1.33."
  default     = "1.33"
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets (at least two availability zones) for the control plane and the nodes."
}

variable "public_endpoint_cidrs" {
  type        = list(string)
  description = "CIDRs that may reach the Kubernetes API from outside the VPC; empty keeps the endpoint private."
  default     = []
}

variable "system_pool" {
  type = object({
    instance_type = string
    min_size      = number
    max_size      = number
  })
  description = "The CPU node group for system pods, the KubeRay operator and the Ray head."
  default     = { instance_type = "m6i.2xlarge", min_size = 1, max_size = 3 }
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
  description = "GPU node groups: each tainted nvidia.com/gpu=true:NoSchedule and labelled llmbatch.io/gpu=true, so only the Ray GPU workers (which tolerate the taint) land there."
  default = [
    { name = "l4", instance_type = "g6.4xlarge", gpu_count = 1, min_size = 0, max_size = 8, spot = false },
  ]
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
