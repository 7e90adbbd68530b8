# The KubeRay operator at a pinned chart version, the llmbatch namespace and service account, and the
# RayCluster of cluster/deploy/kuberay/raycluster.yaml with the image set. The RayCluster's CRD must exist
# before it is planned: apply with -target=helm_release.kuberay_operator first (see DEPLOY.md).
locals {
  manifest_path = coalesce(var.raycluster_manifest, "${path.module}/../../../../cluster/deploy/kuberay/raycluster.yaml")
  documents     = [for doc in split("\n---\n", file(local.manifest_path)) : yamldecode(replace(doc, "/image: \\S+/", "image: ${var.image}"))]
  ray_cluster   = one([for doc in local.documents : doc if doc.kind == "RayCluster"])
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_chart_version
  namespace        = "kuberay-system"
  create_namespace = true
}

resource "kubernetes_namespace" "llmbatch" {
  metadata {
    name = var.namespace
  }
}

resource "kubernetes_service_account" "ray" {
  metadata {
    name      = var.service_account
    namespace = kubernetes_namespace.llmbatch.metadata[0].name
  }
  automount_service_account_token = false
}

resource "kubernetes_manifest" "ray_cluster" {
  manifest   = merge(local.ray_cluster, { metadata = merge(local.ray_cluster.metadata, { namespace = var.namespace }) })
  depends_on = [helm_release.kuberay_operator, kubernetes_service_account.ray]
}
