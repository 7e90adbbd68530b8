"""Engine scheduler limits and batches in flight: vLLM's offline defaults per GPU, the job's own values, and
Ray accelerator labels mapped to the planner's devices exactly."""
from __future__ import annotations

import pytest

from llmbatch.cluster.accelerators import ACCELERATORS, accelerator, device_for_label
from llmbatch.cluster.engine_limits import concurrent_batches, device_of, offline_defaults, scheduler_limits
from llmbatch.errors import UserError
from llmbatch.jobs.engines import engine_stage
from llmbatch.jobs.resolve import ResolvedModel
from llmbatch.cluster.resources import replica_shape
from llmbatch.jobs.spec import EngineSpec


@pytest.mark.parametrize("name, expected", [
    ("H100-80GB", (1024, 16384)), ("H200-141GB", (1024, 16384)), ("B200-180GB", (1024, 16384)),
    ("A100-80GB", (256, 8192)), ("A100-40GB", (256, 8192)), ("L4", (256, 8192)), ("L40S", (256, 8192)),
])
def test_gpu_defaults_are_vllms_offline_ones_for_the_device(name, expected):
    assert offline_defaults(ACCELERATORS[name]) == expected


def test_an_unknown_gpu_gets_the_smaller_defaults_and_cpu_keeps_vllms_own():
    assert scheduler_limits("gpu", None, None, None) == {"max_num_seqs": 256, "max_num_batched_tokens": 8192}
    assert scheduler_limits("cpu", None, None, None) == {}
    assert scheduler_limits("cpu", None, 64, None) == {"max_num_seqs": 64}
    assert scheduler_limits("gpu", ACCELERATORS["H100-80GB"], 512, 4096) == {"max_num_seqs": 512,
                                                                              "max_num_batched_tokens": 4096}
    # vLLM refuses fewer batched tokens than sequences: a job's small token budget caps the default sequences
    assert scheduler_limits("gpu", ACCELERATORS["H100-80GB"], None, 512) == {"max_num_seqs": 512,
                                                                             "max_num_batched_tokens": 512}


def test_batches_in_flight_keep_the_scheduler_fed():
    assert concurrent_batches(None, 1024, 32) == 40        # 1280 rows in flight for 1024 slots
    assert concurrent_batches(None, 256, 32) == 10
    assert concurrent_batches(None, 64, 32) == 8           # never below Ray's default
    assert concurrent_batches(None, None, 32) is None      # CPU: Ray's default
    assert concurrent_batches(3, 1024, 32) == 3            # the job's value


def test_ray_labels_map_to_the_planners_devices_exactly():
    assert accelerator("H100").name == "H100-80GB" and accelerator("h200").name == "H200-141GB"
    assert accelerator("A100-80G").name == "A100-80GB" and accelerator("A100-40G").name == "A100-40GB"
    assert accelerator("a100-80gb").name == "A100-80GB"
    assert accelerator("A100").name == "A100-40GB"      # Ray's label for every A100: planned as the smaller
    with pytest.raises(UserError, match="unknown accelerator 'H10'"):
        accelerator("H10")
    assert device_for_label("TPU-V4") is None


def test_the_device_is_the_pinned_type_else_the_hosts_smallest():
    assert device_of({"A10G", "H100"}, None).name == "A10G"
    assert device_of({"H100"}, None).name == "H100-80GB"
    assert device_of({"H100"}, "H200").name == "H200-141GB"
    assert device_of(set(), None) is None and device_of({"H100", "TPU-V4"}, None) is None
    assert device_of({"H100", "A100"}, None).name == "A100-40GB"


def test_an_h100_engine_stage_gets_the_large_defaults_and_enough_batches(tmp_path):
    nodes = {"n1": {"CPU": 16, "GPU": 8, "accelerator_type:H100": 1, "memory": 2**40}}
    model = ResolvedModel("org/m", "hub", tmp_path, "vllm", None, 4096, None)
    stage = engine_stage(model, EngineSpec(), {"max_tokens": 64}, accelerator="gpu", shape=replica_shape("gpu", 1),
                         replicas=(8, 8), nodes=nodes, accelerator_type=None, batch_size=32, rows=10**6)
    assert stage.engine_kwargs["max_num_seqs"] == 1024 and stage.engine_kwargs["max_num_batched_tokens"] == 16384
    assert stage.max_concurrent_batches == 40
    cpu = engine_stage(model, EngineSpec(), {"max_tokens": 64}, accelerator="cpu", shape=replica_shape("cpu", 1),
                       replicas=(1, 1), nodes={"n1": {"CPU": 2, "memory": 2**34}}, accelerator_type=None,
                       batch_size=32, rows=12)
    assert "max_num_seqs" not in cpu.engine_kwargs and cpu.max_concurrent_batches is None
