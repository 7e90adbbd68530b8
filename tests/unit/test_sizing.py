"""Sizing arithmetic: model facts from configs, GPUs per replica, replicas for a deadline or budget, cost."""
from __future__ import annotations

import math

import pytest

from llmbatch.cluster import profiles
from llmbatch.cluster.accelerators import ACCELERATORS, GIB, accelerator
from llmbatch.cluster.model_facts import facts_from_config
from llmbatch.cluster.sizing import (
    choose_tensor_parallel, cost_usd, replicas_for_budget, replicas_for_deadline, wall_seconds,
)
from llmbatch.errors import SpecError, UserError
from llmbatch.jobs.spec import parse_duration, validate_spec
from manifest_samples import earlier_manifest

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "torch_dtype": "float16", "hidden_act": "silu", "tie_word_embeddings": False}
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "vocab_size": 32000,
                "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "hidden_act": "silu"}
OPT_125M = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 768, "ffn_dim": 3072,
            "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 50272,
            "max_position_embeddings": 2048, "torch_dtype": "float16"}


@pytest.mark.parametrize("config, billions, kv_bytes", [
    (LLAMA2_7B, 6.74, 2 * 32 * 32 * 128 * 2),      # 0.5 MiB per token
    (MIXTRAL_8X7B, 46.7, 2 * 32 * 8 * 128 * 2),    # grouped-query attention: 8 KV heads
    (OPT_125M, 0.125, 2 * 12 * 12 * 64 * 2),
])
def test_parameters_and_kv_bytes_of_known_families(config, billions, kv_bytes):
    facts = facts_from_config(config)
    assert facts.parameters / 1e9 == pytest.approx(billions, rel=0.01)
    assert facts.kv_bytes_per_token() == kv_bytes
    assert facts.weight_bytes() == facts.parameters * 2


def test_llama2_7b_fits_one_24gb_gpu_and_mixtral_needs_several():
    llama, mixtral = facts_from_config(LLAMA2_7B), facts_from_config(MIXTRAL_8X7B)
    assert choose_tensor_parallel(llama, ACCELERATORS["A10G"], 2048).tensor_parallel_size == 1
    # weights 12.6 GiB + a step's activations at 8192 batched tokens (~1.9 GiB) leave 7.1 of 21.6 GiB: less
    # than four 4096-token sequences' 8 GiB of KV cache
    assert choose_tensor_parallel(llama, ACCELERATORS["A10G"], 4096).tensor_parallel_size == 2
    assert choose_tensor_parallel(llama, ACCELERATORS["A100-80GB"], 4096).tensor_parallel_size == 1
    assert choose_tensor_parallel(mixtral, ACCELERATORS["H100-80GB"], 4096).tensor_parallel_size == 2
    assert choose_tensor_parallel(mixtral, ACCELERATORS["A100-40GB"], 4096).tensor_parallel_size == 4
    assert choose_tensor_parallel(mixtral, ACCELERATORS["L4"], 4096).tensor_parallel_size == 8


def test_activations_grow_with_the_devices_batched_tokens_and_shrink_with_tensor_parallelism():
    from llmbatch.cluster.sizing import activation_bytes

    llama = facts_from_config(LLAMA2_7B)
    h100, l4 = ACCELERATORS["H100-80GB"], ACCELERATORS["L4"]
    assert activation_bytes(llama, ACCELERATORS["CPU"], 1) == 0
    assert activation_bytes(llama, h100, 1) > activation_bytes(llama, l4, 1) > GIB
    assert activation_bytes(llama, h100, 4) < activation_bytes(llama, h100, 1)
    assert activation_bytes(llama, h100, 1) / GIB == pytest.approx(2.7, abs=0.05)


def test_a_model_that_fits_nowhere_says_how_much_it_needs():
    huge = facts_from_config({**LLAMA2_7B, "hidden_size": 16384, "intermediate_size": 53248,
                              "num_attention_heads": 128, "num_key_value_heads": 8, "num_hidden_layers": 120})
    fit = choose_tensor_parallel(huge, ACCELERATORS["L4"], 4096)
    assert fit.tensor_parallel_size is None
    assert fit.reason.startswith("does not fit: weights plus a KV cache for 4 x 4096 tokens need")


def test_replicas_for_a_deadline():
    assert replicas_for_deadline(work_seconds=36000, startup_seconds=600, deadline_seconds=7200) == 6
    assert replicas_for_deadline(100, 10, 1000) == 1
    assert replicas_for_deadline(100, 600, 300) is None  # start-up alone misses it
    assert wall_seconds(36000, 600, 6) == 6600


def test_cost_and_budget():
    assert cost_usd(3600, replicas=2, devices_per_replica=4, hourly_usd=3.0) == pytest.approx(24.0)
    # 10 replica-hours of work, no start-up: every replica count costs the same, so the budget allows the most
    assert replicas_for_budget(36000, 0, 1, 1.0, budget_usd=10.0, most=8) == 8
    # a 1 h start-up makes each extra replica cost an hour more
    assert replicas_for_budget(36000, 3600, 1, 1.0, budget_usd=13.0, most=8) == 3
    assert replicas_for_budget(36000, 3600, 1, 1.0, budget_usd=5.0, most=8) is None


def test_accelerator_catalog_lookup():
    assert accelerator("h100-80gb").memory_bytes == 80 * GIB
    assert accelerator("H100").name == "H100-80GB" and accelerator("gpu").name == "A10G"
    with pytest.raises(UserError, match="unknown accelerator 'TPU'"):
        accelerator("TPU")


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("1h30m", 5400), ("45s", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_targets_require_auto_replicas():
    base = {"name": "a", "model": {"source": "m"}, "input": {"path": "p"}, "output": {"path": "o"}}
    spec = validate_spec({**base, "resources": {"replicas": "auto", "deadline": "2h", "budget": 50}})
    assert spec.resources.deadline_seconds == 7200
    with pytest.raises(SpecError) as info:
        validate_spec({**base, "resources": {"replicas": 2, "deadline": "2h"}})
    assert info.value.lines == ["resources: deadline size the pool only with replicas: auto"]
    with pytest.raises(SpecError) as info:
        validate_spec({**base, "resources": {"replicas": "auto", "deadline": "soon"}})
    assert info.value.lines == ["resources.deadline: 'soon' is not a duration like 2h, 90m or 1h30m"]


def _manifest(run_id, busy, rows, out_tokens, wall, startup, max_tokens=64):
    earlier = earlier_manifest()
    return earlier_manifest(
        run_id=run_id, rows={"in": rows, "out": rows, "ok": rows, "error": 0},
        tokens={"input": rows * 30, "generated": out_tokens}, wall_seconds=wall, generation_seconds=wall,
        startup_seconds=startup, spec={**earlier["spec"], "sampling": {"max_tokens": max_tokens}},
        replicas=[{"first_batch_at": 1000.0, "last_batch_at": 1000.0 + busy}])


def test_profiles_accumulate_measurements_and_prediction_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_PROFILE_STORE", str(tmp_path / "store"))
    key = profiles.profile_key("sha256:abc", "CPU", {"dtype": "float32", "max_model_len": 2048,
                                                      "tensor_parallel_size": 1, "enable_prefix_caching": True})
    first = profiles.measurement_from_manifest(_manifest("a", 10.0, 20, 1000, 60.0, 45.0), "profile:a")
    assert first["output_tokens_per_second"] == 100.0 and first["mean_output_tokens"] == 50.0
    profiles.record(key, {"model_source": "m"}, first)
    second = profiles.measurement_from_manifest(_manifest("b", 30.0, 40, 2000, 80.0, 55.0), "run:b")
    stored = profiles.record(key, {"model_source": "m"}, second,
                             {"run_id": "b", "predicted_wall_seconds": 88.0, "measured_wall_seconds": 80.0})
    rates = profiles.rates(stored)
    assert rates.output_tokens_per_second == pytest.approx(3000 / 40)  # token-weighted over busy time
    assert rates.startup_seconds == 50.0 and rates.measurements == 2
    assert rates.mean_output_tokens == pytest.approx(50.0)
    assert profiles.prediction_errors(profiles.load(key))[0]["error"] == pytest.approx(0.1)
    assert profiles.measurement_from_manifest(_manifest("c", 0.0, 5, 10, 1.0, 1.0), "run:c") is None
    assert math.isclose(rates.requests_per_second, 60 / 40)


def test_a_prefill_measurement_splits_busy_time_into_prefill_and_decode(tmp_path, monkeypatch):
    """With prefill measured alone, work is input/prefill + output/decode; for the profiled job's own shape it
    adds up to the measured busy time, and longer prompts cost more than the output-only estimate."""
    monkeypatch.setenv("LLMBATCH_PROFILE_STORE", str(tmp_path / "store"))
    key = "k"
    generation = profiles.measurement_from_manifest(_manifest("a", 10.0, 20, 1000, 60.0, 45.0), "profile:a")
    stored = profiles.record(key, {"model_source": "m"}, generation)
    assert profiles.rates(stored).prefill_tokens_per_second is None
    assert profiles.rates(stored).replica_seconds(600, 1000) == pytest.approx(10.0)
    one_token = _manifest("p", 2.0, 20, 20, 5.0, 40.0, max_tokens=1)
    prefill = profiles.prefill_from_manifest(one_token, "profile-prefill:p")
    assert prefill["prefill_tokens_per_second"] == 300.0  # 600 prompt tokens in 2 s
    stored = profiles.record(key, {"model_source": "m"}, None, prefill=prefill)
    rates = profiles.rates(stored)
    assert rates.measurements == 1 and rates.prefill_tokens_per_second == 300.0
    assert rates.decode_tokens_per_second == pytest.approx(1000 / 8.0)  # 10 s busy minus 2 s of prefill
    assert rates.replica_seconds(600, 1000) == pytest.approx(10.0)
    assert rates.replica_seconds(6000, 1000) == pytest.approx(20.0 + 8.0)
    assert profiles.prefill_from_manifest(_manifest("z", 0.0, 5, 5, 1.0, 1.0), "x") is None


def _plan(replicas: int, tp: int = 1, accelerator_name: str = "A10G"):
    from llmbatch.jobs.plan import Plan

    return Plan(model="m", accelerator=accelerator_name, engine={}, rows=100, input_tokens=1000,
                input_tokens_method="counted", output_tokens=10000, tensor_parallel_size=tp, fit="fits",
                replicas=replicas, devices_total=replicas * tp, wall_seconds=0, device_hours=0, cost_usd=0,
                hourly_usd=1.0, profile={"used": False}, work_seconds=3600.0, startup_seconds=60.0)


def test_a_plan_is_capped_by_what_the_cluster_holds():
    from llmbatch.jobs.plan import fit_to_cluster

    base = {"name": "a", "model": {"source": "m"}, "input": {"path": "p"}, "output": {"path": "o"}}
    auto = validate_spec({**base, "resources": {"replicas": "auto", "deadline": "10m"}})
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 4.0}]
    fitted = fit_to_cluster(_plan(12), auto, "http://head:8265", nodes)
    assert fitted.replicas == 3 and fitted.devices_total == 3
    assert fitted.wall_seconds == pytest.approx(60 + 3600 / 3, abs=1)
    assert fitted.cluster["replica_capacity"] == 3 and fitted.cluster["nodes_that_can_host"] == 2
    assert "capped at 3 replica(s): what the cluster at http://head:8265 holds at once (planned 12)" in fitted.notes
    two_gpus = fit_to_cluster(_plan(12, tp=2), auto, "http://head:8265", nodes)
    assert two_gpus.replicas == 1  # only the first node holds a 2-GPU replica
    fixed = validate_spec({**base, "resources": {"replicas": 5}})
    refused = fit_to_cluster(_plan(5), fixed, "http://head:8265", nodes)
    assert refused.replicas == 5 and "the run would be refused" in refused.problems[-1]
    ranged = fit_to_cluster(_plan(8), validate_spec({**base, "resources": {"replicas": [1, 8]}}), "http://h", nodes)
    assert ranged.replicas == 3 and "the pool grows to 3 replica(s) here" in ranged.notes[-1]
    too_wide = fit_to_cluster(_plan(1, tp=4), auto, "http://h", nodes)
    assert too_wide.cluster["replica_capacity"] == 0 and "cannot hold one replica" in too_wide.problems[0]
    assert fit_to_cluster(_plan(2, accelerator_name="CPU"), auto, "http://h", nodes).replicas == 2


def test_auto_replicas_refuse_a_tensor_parallelism_below_what_the_model_needs():
    from llmbatch.jobs.plan import check_planned_parallelism

    base = {"name": "a", "model": {"source": "llama-70b"}, "input": {"path": "p"}, "output": {"path": "o"},
            "resources": {"replicas": "auto"}}
    with pytest.raises(UserError) as refused:
        check_planned_parallelism(validate_spec(base), _plan(2, tp=4, accelerator_name="H100-80GB"))
    assert str(refused.value) == ("model.engine.tensor_parallel_size: 1 x H100-80GB per replica cannot hold "
                                  "llama-70b; it needs 4 (fits); set model.engine.tensor_parallel_size: 4")
    wide = {**base, "model": {"source": "llama-70b", "engine": {"tensor_parallel_size": 4}}}
    check_planned_parallelism(validate_spec(wide), _plan(2, tp=4, accelerator_name="H100-80GB"))
