"""infra/terraform checked without terraform or a cloud: every file parses (python-hcl2), each module keeps the
structure rules, and what the modules and the cluster configs say of each other agrees."""
from __future__ import annotations

import re
from pathlib import Path

import hcl2
import pytest
import yaml

from test_deploy_configs import DEPLOY, KUBERAY_VERSION, kubernetes_documents

TERRAFORM = Path(__file__).resolve().parents[2] / "infra" / "terraform"
MODULES = sorted(p for p in (TERRAFORM / "modules").iterdir() if p.is_dir())
ROOTS = MODULES + sorted(p for p in (TERRAFORM / "examples").iterdir() if p.is_dir())
EXACT_VERSION = re.compile(r"^=?\s*\d+\.\d+\.\d+$")


def plain(value):
    """python-hcl2's tree with labels and string literals unquoted and its block markers dropped."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def load(path: Path) -> dict:
    with open(path) as handle:
        return plain(hcl2.load(handle))


def parsed(folder: Path) -> dict[str, list]:
    """Every block of the folder's .tf files, by block type."""
    merged: dict[str, list] = {}
    for path in sorted(folder.glob("*.tf")):
        for key, blocks in load(path).items():
            merged.setdefault(key, []).extend(blocks)
    return merged


def local_value(folder: Path, name: str):
    return next(block[name] for block in parsed(folder).get("locals", []) if name in block)


def variables(folder: Path) -> dict[str, dict]:
    return {name: body for block in parsed(folder).get("variable", []) for name, body in block.items()}


def resources(folder: Path, kind: str) -> dict[str, dict]:
    return {name: body for block in parsed(folder).get("resource", []) for rtype, named in block.items()
            if rtype == kind for name, body in named.items()}


def default(folder: Path, name: str):
    return variables(folder)[name]["default"]


@pytest.mark.parametrize("folder", ROOTS, ids=lambda p: p.name)
def test_every_file_parses_and_the_module_has_its_files(folder):
    assert parsed(folder)
    for name in ("variables.tf", "outputs.tf", "versions.tf", "README.md"):
        assert (folder / name).is_file(), f"{folder.name} has no {name}"


@pytest.mark.parametrize("folder", ROOTS, ids=lambda p: p.name)
def test_every_variable_is_typed_and_described_and_every_output_described(folder):
    for name, body in variables(folder).items():
        assert "type" in body and body.get("description"), f"{folder.name}: variable {name}"
    for block in parsed(folder).get("output", []):
        for name, body in block.items():
            assert body.get("description"), f"{folder.name}: output {name}"


@pytest.mark.parametrize("folder", ROOTS, ids=lambda p: p.name)
def test_terraform_and_every_provider_are_pinned(folder):
    (settings,) = parsed(folder)["terraform"]
    assert settings.get("required_version")
    providers = {name: spec for block in settings["required_providers"] for name, spec in block.items()}
    assert providers
    for name, spec in providers.items():
        assert EXACT_VERSION.match(spec["version"]), f"{folder.name}: provider {name} at {spec['version']}"
        assert spec["source"].startswith("hashicorp/")
    used = {key.split("_", 1)[0] for block in parsed(folder).get("resource", []) + parsed(folder).get("data", [])
            for key in block}
    assert used <= set(providers), f"{folder.name} uses {used - set(providers)} without pinning it"


@pytest.mark.parametrize("folder", ROOTS, ids=lambda p: p.name)
def test_module_sources_are_local_or_pinned(folder):
    for block in parsed(folder).get("module", []):
        for name, body in block.items():
            source = body["source"]
            local = source.startswith(("./", "../"))
            assert local or body.get("version") or "?ref=" in source, f"{folder.name}: module {name} at {source}"
            if local:
                assert (folder / source).resolve().is_dir(), f"{folder.name}: module {name}: no {source}"


def test_the_gpu_taint_and_label_are_what_the_ray_gpu_workers_tolerate_and_select():
    taint = local_value(TERRAFORM / "modules" / "cluster", "gpu_taint")
    ((label_key, label_value),) = local_value(TERRAFORM / "modules" / "cluster", "gpu_label").items()
    node_groups = resources(TERRAFORM / "modules" / "cluster", "aws_eks_node_group")
    assert node_groups["gpu"]["taint"] == [{"key": "${local.gpu_taint.key}", "value": "${local.gpu_taint.value}",
                                             "effect": "${local.gpu_taint.effect}"}]
    assert "local.gpu_label" in node_groups["gpu"]["labels"]
    effect = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute", "PREFER_NO_SCHEDULE": "PreferNoSchedule"}
    cluster = next(d for _, d in kubernetes_documents() if d["kind"] == "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert {"key": taint["key"], "operator": "Equal", "value": taint["value"],
                "effect": effect[taint["effect"]]} in pod["tolerations"]
        assert pod["nodeSelector"] == {label_key: label_value}


def test_the_service_account_is_the_one_the_identity_binds():
    bound = default(TERRAFORM / "modules" / "identity", "service_account")
    namespace = default(TERRAFORM / "modules" / "identity", "namespace")
    assert default(TERRAFORM / "modules" / "kuberay", "service_account") == bound
    for name, doc in kubernetes_documents():
        if doc["kind"] == "ServiceAccount":
            assert (doc["metadata"]["name"], doc["metadata"]["namespace"]) == (bound, namespace), name
            continue
        assert doc["metadata"]["namespace"] == namespace, name
        if doc["kind"] not in ("RayCluster", "RayService"):
            continue
        spec = doc["spec"].get("rayClusterConfig", doc["spec"])
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            assert group["template"]["spec"]["serviceAccountName"] == bound, name


def test_every_bucket_the_policies_name_is_one_the_storage_makes_and_each_is_used():
    made = set(local_value(TERRAFORM / "modules" / "storage", "purposes"))
    identity = TERRAFORM / "modules" / "identity"
    read_only, read_write = set(local_value(identity, "read_only")), set(local_value(identity, "read_write"))
    assert read_only | read_write == made and not read_only & read_write
    assert read_only == {"prompts", "models"}
    example = (TERRAFORM / "examples" / "aws" / "outputs.tf").read_text()
    assert set(re.findall(r'bucket_names\["([^"]+)"\]', example)) <= made


def test_the_kuberay_chart_is_the_version_whose_crds_the_manifests_are_checked_against():
    assert "v" + default(TERRAFORM / "modules" / "kuberay", "kuberay_chart_version") == KUBERAY_VERSION


def test_the_tfvars_example_sets_every_required_variable_of_the_example():
    folder = TERRAFORM / "examples" / "aws"
    given = load(folder / "terraform.tfvars.example")
    required = {name for name, body in variables(folder).items() if "default" not in body}
    assert required <= set(given)
    assert yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text())["docker"]["image"].split(":")[-1] == \
        given["image"].split(":")[-1]
