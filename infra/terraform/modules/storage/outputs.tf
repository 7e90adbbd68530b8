output "bucket_names" {
  description = "Bucket name by purpose: prompts, results, models, profiles, scheduler-state."
  value       = { for purpose, bucket in aws_s3_bucket.this : purpose => bucket.bucket }
}

output "bucket_arns" {
  description = "Bucket ARN by purpose."
  value       = { for purpose, bucket in aws_s3_bucket.this : purpose => bucket.arn }
}

output "kms_key_arn" {
  description = "The KMS key the buckets are encrypted with (the identity module grants its use)."
  value       = aws_kms_key.data.arn
}
