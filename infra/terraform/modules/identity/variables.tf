variable "name_prefix" {
  type        = string
  description = "Prefix of the IAM role and policy names."
}

variable "cluster_name" {
  type        = string
  description = "The EKS cluster whose pods get the role (through EKS Pod Identity)."
}

variable "namespace" {
  type        = string
  description = "Kubernetes namespace of the Ray pods."
  default     = "llmbatch"
}

variable "service_account" {
  type        = string
  description = "The one Kubernetes service account the RayCluster's pods run as (cluster/deploy/kuberay)."
  default     = "llmbatch"
}

variable "bucket_arns" {
  type        = map(string)
  description = "Bucket ARN by purpose, as the storage module outputs them."
}

variable "kms_key_arn" {
  type        = string
  description = "The KMS key the buckets are encrypted with."
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
