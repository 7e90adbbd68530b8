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


LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "intermediate_size": 14336, "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}


def _checkpoint(tmp_path, config):
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_without_max_model_len_gpu_engines_fit_the_models_context_to_memory_and_rows_keep_the_context(tmp_path):
    from llmbatch.jobs.engines import AUTO_FIT, row_limit

    model = ResolvedModel("org/m", "hub", _checkpoint(tmp_path, LLAMA_8B), "vllm", 131072, 131072, None)
    nodes = {"n1": {"CPU": 16, "GPU": 8, "accelerator_type:H100": 1, "memory": 2**40}}
    stage = engine_stage(model, EngineSpec(), {"max_tokens": 64}, accelerator="gpu", shape=replica_shape("gpu", 1),
                         replicas=(8, 8), nodes=nodes, accelerator_type=None, batch_size=32, rows=100)
    assert stage.engine_kwargs["max_model_len"] == AUTO_FIT == -1   # vLLM: the context, or what the KV cache holds
    assert row_limit(stage, model) == 131072
    model = ResolvedModel("org/m", "hub", tmp_path, "vllm", 131072, 8192, None)   # as resolve sets it
    pinned = engine_stage(model, EngineSpec(max_model_len=8192), {"max_tokens": 64}, accelerator="gpu",
                          shape=replica_shape("gpu", 1), replicas=(8, 8), nodes=nodes, accelerator_type=None,
                          batch_size=32, rows=100)
    assert pinned.engine_kwargs["max_model_len"] == 8192 and row_limit(pinned, model) == 8192


def test_without_max_model_len_a_cpu_engine_gets_the_context_its_memory_share_holds(tmp_path):
    from llmbatch.cluster.resources import cpu_max_model_len
    from llmbatch.jobs.engines import row_limit

    model = ResolvedModel("m", "local", _checkpoint(tmp_path, LLAMA_8B), "vllm", 131072, 131072, None)
    per_token = 2 * 32 * 8 * 128 * 4          # float32 on CPU: 256 KiB a token
    nodes = {"n1": {"CPU": 2, "memory": 16 * 2**30}}
    stage = engine_stage(model, EngineSpec(), {"max_tokens": 64}, accelerator="cpu", shape=replica_shape("cpu", 1),
                         replicas=(1, 1), nodes=nodes, accelerator_type=None, batch_size=8, rows=10)
    limit = stage.engine_kwargs["max_model_len"]
    share = stage.engine_kwargs["gpu_memory_utilization"] * 16 * 2**30
    assert limit == cpu_max_model_len(per_token, 131072, share) and limit % 16 == 0
    assert 1024 < limit < 131072 and limit * per_token < share     # capped: 128k tokens would need 32 GiB
    assert row_limit(stage, model) == limit
    assert cpu_max_model_len(per_token, 4096, share) == 4096         # a short context fits whole
    assert cpu_max_model_len(per_token, None, share) is None


def test_the_planner_sizes_replicas_for_the_jobs_rows_not_a_long_context_they_never_reach(tmp_path):
    from types import SimpleNamespace

    from llmbatch.jobs.plan import planning_len
    from llmbatch.jobs.spec import EngineSpec as Engine

    def job(max_model_len, context, max_tokens):
        spec = SimpleNamespace(model=SimpleNamespace(engine=Engine(max_model_len=max_model_len)))
        return SimpleNamespace(spec=spec, model=SimpleNamespace(max_len=max_model_len or context),
                               max_tokens=max_tokens)

    assert planning_len(job(None, 131072, 256)) == 2048
    assert planning_len(job(None, 131072, 4000)) == 4512
    assert planning_len(job(None, 1024, 256)) == 1024
    assert planning_len(job(32768, 131072, 256)) == 32768


class _Log:
    def __init__(self):
        self.events = []

    def info(self, event, **kw):
        self.events.append(event)

    warning = info


def test_a_judge_pass_waits_until_the_gpus_have_its_memory_share_free_again():
    from llmbatch.cluster.gpu_memory import wait_for_free_memory

    readings = iter([{"a": 0.95, "b": 0.2}, {"a": 0.95, "b": 0.5}, {"a": 0.95, "b": 0.93}])
    now, pauses, log = [0.0], [], _Log()

    def pause(seconds):
        pauses.append(seconds)
        now[0] += seconds

    assert wait_for_free_memory(["a", "b"], 0.9, log, probe=lambda nodes: next(readings), clock=lambda: now[0],
                                pause=pause)
    assert len(pauses) == 2 and log.events == ["gpu_memory_wait", "gpu_memory_free"]


def test_gpu_memory_still_held_at_the_timeout_lets_the_engines_start_and_say_so():
    from llmbatch.cluster.gpu_memory import wait_for_free_memory

    now, log = [0.0], _Log()

    def pause(seconds):
        now[0] += seconds

    assert not wait_for_free_memory(["a"], 0.9, log, timeout=10, probe=lambda nodes: {"a": 0.4},
                                    clock=lambda: now[0], pause=pause)
    assert log.events == ["gpu_memory_wait", "gpu_memory_still_held"]
    quiet = _Log()   # nodes without GPUs NVML can read: nothing to wait on
    assert wait_for_free_memory(["a"], 0.9, quiet, probe=lambda nodes: {"a": None}) and quiet.events == []
