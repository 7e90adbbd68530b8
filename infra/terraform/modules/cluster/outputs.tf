output "cluster_name" {
  description = "The EKS cluster's name."
  value       = aws_eks_cluster.this.name
}

output "endpoint" {
  description = "The Kubernetes API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "certificate_authority" {
  description = "The cluster's CA certificate (base64)."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "gpu_taint" {
  description = "The taint on every GPU node group: the Ray GPU workers tolerate it."
  value       = local.gpu_taint
}

output "gpu_label" {
  description = "The label on every GPU node group: the Ray GPU workers select it."
  value       = local.gpu_label
}
