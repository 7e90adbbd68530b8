"""checkov (pinned, in its own venv: `make setup` puts it in .venv-infra, since its dependencies pin older
versions of some of llmbatch's) on our own resources: the Terraform modules, the Kubernetes manifests (the Ray
pods' templates as the pods KubeRay makes of them, which checkov would not look inside a RayCluster for), the
Dockerfile, and secrets in all of them. It passes with no failed check; every skip is written beside the
resource with its reason."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from test_deploy_configs import DEPLOY, KUBERAY_KINDS, REPO, kubernetes_documents

CHECKOV = Path(os.environ.get("LLMBATCH_CHECKOV", REPO / ".venv-infra" / "bin" / "checkov"))


def pods_of(doc: dict) -> list[dict]:
    """The pods KubeRay makes of a RayCluster's (or a RayService's cluster's) group templates."""
    spec = doc["spec"].get("rayClusterConfig", doc["spec"])
    pods = []
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        template = group["template"]
        pods.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {**template.get("metadata", {}), "namespace": doc["metadata"]["namespace"],
                                  "name": f"{doc['metadata']['name']}-{group.get('groupName', 'head')}"},
                     "spec": template["spec"]})
    return pods


def checkov(directory: Path, frameworks: list[str]) -> list[dict]:
    if not CHECKOV.is_file():
        pytest.fail(f"no checkov at {CHECKOV}: `make setup` installs it into .venv-infra")
    proc = subprocess.run([str(CHECKOV), "-d", str(directory), "--framework", *frameworks, "--skip-download",
                           "--compact", "-o", "json"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""})
    reports = json.loads(proc.stdout or "[]")
    return reports if isinstance(reports, list) else [reports]


def failures(reports: list[dict]) -> list[str]:
    return [f"{r['check_type']}: {c['check_id']} {c['resource']} ({c['file_path']})"
            for r in reports if isinstance(r, dict) and "results" in r for c in r["results"]["failed_checks"]]


def skip_reasons(reports: list[dict]) -> list[str]:
    return [(c.get("check_result") or {}).get("suppress_comment") or "" for r in reports
            if isinstance(r, dict) and "results" in r for c in r["results"]["skipped_checks"]]


def test_the_terraform_modules_pass_with_every_skip_reasoned():
    reports = checkov(REPO / "infra" / "terraform", ["terraform", "secrets"])
    assert failures(reports) == []
    reasons = skip_reasons(reports)
    assert reasons and all(len(reason.split()) >= 4 for reason in reasons)


def test_the_kubernetes_manifests_and_the_ray_pods_pass_with_every_skip_reasoned(tmp_path):
    documents = [doc for _, doc in kubernetes_documents()]
    pods = [pod for doc in documents if doc["kind"] in KUBERAY_KINDS for pod in pods_of(doc)]
    builtin = [doc for doc in documents if doc["kind"] not in KUBERAY_KINDS]
    (tmp_path / "resources.yaml").write_text(yaml.safe_dump_all(builtin + pods))
    reports = checkov(tmp_path, ["kubernetes"])
    assert failures(reports) == []
    assert {pod["metadata"]["name"] for pod in pods} <= {
        c["resource"].rsplit(".", 1)[-1] for r in reports for c in r["results"]["passed_checks"]}
    reasons = skip_reasons(reports)
    assert reasons and all(len(reason.split()) >= 4 for reason in reasons)


def test_the_dockerfile_and_the_manifests_hold_no_secret_and_pass():
    reports = checkov(DEPLOY, ["dockerfile", "secrets"])
    assert failures(reports) == []
    assert any(r.get("check_type") == "dockerfile" and r["results"]["passed_checks"] for r in reports)
