"""On an autoscaling cluster (Ray's fake multi-node provider: worker nodes are local raylets it starts on
request) whose GPU worker group stands at zero, a run's driver asks for its replicas' bundles and waits until a
GPU node has joined. Ray's own autoscaler publishes no node types to the GCS, so the job's
resources.scale_up_timeout is what turns the waiting on there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

from ray.cluster_utils import AutoscalingCluster

from support import CLI, REPO

# The fake multi-node provider's base config (ray's fake_multi_node/example.yaml, which the wheel leaves out).
FAKE_CLUSTER = {
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class FakeAutoscalingCluster(AutoscalingCluster):
    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        from ray.cluster_utils import FAKE_HEAD_NODE_ID

        provider = {**FAKE_CLUSTER["provider"], **({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
                                                   if autoscaler_v2 else {})}
        return {**FAKE_CLUSTER, "provider": provider, "available_node_types": {
            **worker_node_types,
            "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}}}

DRIVER = r"""
import json, ray, structlog
from llmbatch.cluster.connect import alive_nodes
from llmbatch.cluster.resources import replica_shape
from llmbatch.cluster.scale_up import ask_autoscaler, node_groups, wait_for_nodes

ray.init(address="auto", logging_level="ERROR")
groups = node_groups()
before = ray.cluster_resources()
nodes, asked = wait_for_nodes(replica_shape("gpu", 1), 1, None, 240, nodes_now=alive_nodes, request=ask_autoscaler,
                              log=structlog.get_logger())
ask_autoscaler([])
print(json.dumps({"groups": groups, "gpus_before": before.get("GPU", 0), "asked": asked,
                  "gpus_after": sum(n.get("GPU", 0) for n in nodes.values())}))
"""


def test_a_run_asks_the_autoscaler_for_a_gpu_node_and_waits_until_it_joins(monkeypatch):
    monkeypatch.setenv("PATH", f"{Path(CLI).parent}:{os.environ['PATH']}")  # the cluster's own `ray start`s
    cluster = FakeAutoscalingCluster(head_resources={"CPU": 1}, worker_node_types={"gpu-workers": {
        "resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}})
    cluster.start()
    try:
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["groups"] is None and seen["gpus_before"] == 0
    assert seen["asked"] is True and seen["gpus_after"] == 1
    assert "waiting_for_nodes" in proc.stdout + proc.stderr and "nodes_ready" in proc.stdout + proc.stderr
