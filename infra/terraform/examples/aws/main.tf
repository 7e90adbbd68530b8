# Everything llmbatch runs on, in one AWS account: buckets, an EKS cluster with GPU pools, the pods' identity,
# and the KubeRay operator with the llmbatch RayCluster. DEPLOY.md walks through applying it.
provider "aws" {
  region = var.region
}

module "storage" {
  source      = "../../modules/storage"
  name_prefix = var.name_prefix
}

module "cluster" {
  source                = "../../modules/cluster"
  name                  = "${var.name_prefix}-ray"
  subnet_ids            = var.subnet_ids
  public_endpoint_cidrs = var.public_endpoint_cidrs
  gpu_pools             = var.gpu_pools
}

module "identity" {
  source       = "../../modules/identity"
  name_prefix  = var.name_prefix
  cluster_name = module.cluster.cluster_name
  bucket_arns  = module.storage.bucket_arns
  kms_key_arn  = module.storage.kms_key_arn
}

data "aws_eks_cluster_auth" "this" {
  name = module.cluster.cluster_name
}

provider "kubernetes" {
  host                   = module.cluster.endpoint
  cluster_ca_certificate = base64decode(module.cluster.certificate_authority)
  token                  = data.aws_eks_cluster_auth.this.token
}

provider "helm" {
  kubernetes {
    host                   = module.cluster.endpoint
    cluster_ca_certificate = base64decode(module.cluster.certificate_authority)
    token                  = data.aws_eks_cluster_auth.this.token
  }
}

module "kuberay" {
  source          = "../../modules/kuberay"
  image           = var.image
  namespace       = module.identity.namespace
  service_account = module.identity.service_account
}
