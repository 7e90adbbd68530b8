variable "name_prefix" {
  type        = string
  description = "Prefix of every bucket name, e.g. acme-llmbatch (bucket names are global: make it unique)."
}

variable "results_retention_days" {
  type        = number
  description = "Days after which run folders in the results bucket expire (0 keeps them forever)."
  default     = 180
}

variable "noncurrent_version_days" {
  type        = number
  description = "Days an overwritten or deleted object's earlier version is kept in any bucket."
  default     = 30
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
