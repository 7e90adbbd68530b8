output "ray_cluster_name" {
  description = "The RayCluster's name; its head service is <name>-head-svc (Jobs API on port 8265)."
  value       = local.ray_cluster.metadata.name
}

output "jobs_address" {
  description = "The Jobs API address inside the cluster (kubectl port-forward it to submit from outside)."
  value       = "http://${local.ray_cluster.metadata.name}-head-svc.${var.namespace}.svc.cluster.local:8265"
}
