output "role_arn" {
  description = "The role the Ray pods assume."
  value       = aws_iam_role.pods.arn
}

output "service_account" {
  description = "The service account bound to the role (the RayCluster's serviceAccountName)."
  value       = var.service_account
}

output "namespace" {
  description = "The namespace of that service account."
  value       = var.namespace
}
