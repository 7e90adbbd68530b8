variable "kuberay_chart_version" {
  type        = string
  description = "Version of the kuberay-operator Helm chart (the CRD schemas tests/infra checks against)."
  default     = "1.7.0"
}

variable "namespace" {
  type        = string
  description = "Namespace of the RayCluster and its service account."
  default     = "llmbatch"
}

variable "service_account" {
  type        = string
  description = "The service account the Ray pods run as; the identity module binds the data role to it."
  default     = "llmbatch"
}

variable "image" {
  type        = string
  description = "The llmbatch image (`make image`, pushed to your registry), e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/llmbatch:0.1.0-ray2.60.0."
}

variable "raycluster_manifest" {
  type        = string
  description = "Path of the RayCluster manifest to apply (its image lines are set to var.image)."
  default     = null
}
