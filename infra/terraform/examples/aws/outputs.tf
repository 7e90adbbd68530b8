output "buckets" {
  description = "Bucket name by purpose: put prompts in `prompts`, point output.path at `results`."
  value       = module.storage.bucket_names
}

output "cluster_name" {
  description = "For `aws eks update-kubeconfig --name`."
  value       = module.cluster.cluster_name
}

output "jobs_address" {
  description = "The Jobs API inside the cluster; port-forward the head service to use `--address`."
  value       = module.kuberay.jobs_address
}

output "scheduler_state" {
  description = "LLMBATCH_SCHEDULER_STATE for `llmbatch scheduler deploy`."
  value       = "s3://${module.storage.bucket_names["scheduler-state"]}/state"
}
