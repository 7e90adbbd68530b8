# Least privilege for the Ray pods: read-only on prompts and models, read-write on results, profiles and the
# scheduler's state, and the KMS key to read and write them; bound through EKS Pod Identity to the one service
# account the RayCluster uses.
locals {
  read_only  = ["prompts", "models"]
  read_write = ["results", "profiles", "scheduler-state"]
}

data "aws_iam_policy_document" "trust" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "pods" {
  name               = "${var.name_prefix}-ray-pods"
  assume_role_policy = data.aws_iam_policy_document.trust.json
  tags               = var.tags
}

data "aws_iam_policy_document" "data" {
  statement {
    sid       = "ListAll"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [for purpose in concat(local.read_only, local.read_write) : var.bucket_arns[purpose]]
  }
  statement {
    sid       = "ReadOnly"
    actions   = ["s3:GetObject"]
    resources = [for purpose in local.read_only : "${var.bucket_arns[purpose]}/*"]
  }
  statement {
    sid = "ReadWrite"
    actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts"]
    resources = [for purpose in local.read_write : "${var.bucket_arns[purpose]}/*"]
  }
  statement {
    sid       = "DataKey"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_policy" "data" {
  name   = "${var.name_prefix}-ray-data"
  policy = data.aws_iam_policy_document.data.json
  tags   = var.tags
}

resource "aws_iam_role_policy_attachment" "data" {
  role       = aws_iam_role.pods.name
  policy_arn = aws_iam_policy.data.arn
}

resource "aws_eks_pod_identity_association" "ray" {
  cluster_name    = var.cluster_name
  namespace       = var.namespace
  service_account = var.service_account
  role_arn        = aws_iam_role.pods.arn
  tags            = var.tags
}
