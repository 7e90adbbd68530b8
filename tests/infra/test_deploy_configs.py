"""The cluster configs under cluster/deploy/, checked here without a cloud: the launcher YAML against Ray's own
cluster-config schema, the KubeRay resources against a pinned copy of KubeRay's CRD schemas, the built-in
Kubernetes kinds against their schema (kubernetes-validate), and the versions they name against pyproject."""
from __future__ import annotations

import gzip
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "cluster" / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
KUBERAY_VERSION = "v1.7.0"
KUBERNETES_VERSION = "1.33"
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayService": "rayservices"}


def pinned_versions() -> tuple[str, str]:
    """(llmbatch version, Ray version) as pyproject.toml pins them: the one place to bump either."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray = next(re.match(r"ray\[[^\]]*\]==(.+)", d).group(1) for d in project["dependencies"] if d.startswith("ray["))
    return project["version"], ray


def image_tag() -> str:
    version, ray = pinned_versions()
    return f"{version}-ray{ray}"


def kubernetes_documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def crd_schema(kind: str) -> dict:
    text = gzip.decompress((SCHEMAS / f"kuberay-{KUBERAY_VERSION}-ray.io_{KUBERAY_KINDS[kind]}.yaml.gz").read_bytes())
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare, as the API server's strict field validation (kubectl --validate=strict)
    reports them; JSON schema alone lets them through, where Kubernetes would drop them silently."""
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for key, item in value.items()
                for f in unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterConfig", doc["spec"])
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_the_launcher_config_is_valid_for_rays_own_schema_with_a_cpu_head_and_gpu_groups_from_zero():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((DEPLOY / "ray-cluster-aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    gpu_groups = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_groups and all(t["min_workers"] == 0 for t in gpu_groups)
    assert config["docker"]["image"].endswith(":" + image_tag())


@pytest.mark.parametrize("name, doc", kubernetes_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_kubernetes_resource_validates_against_its_schema(name, doc):
    if doc["kind"] in KUBERAY_KINDS:
        schema = crd_schema(doc["kind"])
        jsonschema.validate(doc, schema)
        assert unknown_fields(doc["spec"], schema["properties"]["spec"], "spec") == []
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_caught_as_kubernetes_strict_validation_would():
    doc = next(d for _, d in kubernetes_documents() if d["kind"] == "RayCluster")
    spec = json.loads(json.dumps(doc["spec"]))
    spec["workerGroupSpecs"][0]["maxReplica"] = 3
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert unknown_fields(spec, crd_schema("RayCluster")["properties"]["spec"], "spec") == [
        "spec.headGroupSpec.template.spec.containers[0].imagePullPolicyy", "spec.workerGroupSpecs[0].maxReplica"]


def test_the_kuberay_resources_carry_the_pinned_ray_and_image_and_keep_gpus_off_the_head():
    version, ray = pinned_versions()
    for name, doc in kubernetes_documents():
        if doc["kind"] not in KUBERAY_KINDS:
            continue
        spec = doc["spec"].get("rayClusterConfig", doc["spec"])
        assert spec["rayVersion"] == ray, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", name
        for container in containers(doc):
            assert container["image"].endswith(":" + image_tag()), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        for group in spec.get("workerGroupSpecs", []):
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and group["minReplicas"] == 0, name


def test_the_dockerfile_builds_the_pinned_ray_as_a_non_root_user_with_no_secrets():
    text = (DEPLOY / "Dockerfile").read_text()
    _, ray = pinned_versions()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray)}$", text, re.M)
    assert re.search(r"^USER ray$", text, re.M) and not re.search(r"^USER root", text, re.M)
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS_KEY|RAY_AUTH_TOKEN|HF_TOKEN)\s*=", text)


def test_the_scheduler_service_names_the_app_builder_that_exists():
    doc = next(d for _, d in kubernetes_documents() if d["kind"] == "RayService")
    app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
    module, name = app["import_path"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), name))
    assert app["route_prefix"] == "/llmbatch-scheduler" and {"state", "jobs_address"} <= set(app["args"])
