"""The throughput model: per-replica rates from datasheet figures, precision, memory limits, calibration by a
profile on another device, mixtures of experts, and predict_offline for the bench."""
from __future__ import annotations

import pytest

from llmbatch.cluster import throughput_model as tm
from llmbatch.cluster.accelerators import ACCELERATORS
from llmbatch.cluster.families import KnownSize
from llmbatch.cluster.model_facts import facts_from_config, facts_from_size
from llmbatch.cluster.profiles import rates as profile_rates

LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
              "torch_dtype": "bfloat16", "hidden_act": "silu", "tie_word_embeddings": False}
LLAMA3_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_hidden_layers": 80}
MIXTRAL_8X7B = {**LLAMA31_8B, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                "num_local_experts": 8, "num_experts_per_tok": 2}
BF16 = tm.precision("bf16")


def decode_rate(config: dict, device: str, prec: tm.Precision = BF16, tp: int = 1, **limits) -> tm.Breakdown:
    facts = facts_from_config(config)
    return tm.predict(facts, ACCELERATORS[device], prec, tp, 512, 256, 4096, **limits).breakdown


def test_an_h100_decodes_an_8b_model_several_times_faster_than_an_l4():
    l4, h100 = decode_rate(LLAMA31_8B, "L4"), decode_rate(LLAMA31_8B, "H100-80GB")
    assert h100.decode_tokens_per_second >= 3 * l4.decode_tokens_per_second
    assert h100.prefill_tokens_per_second >= 3 * l4.prefill_tokens_per_second
    # the L4's 24 GiB leave room for fewer sequences than its scheduler would run
    assert l4.batch_limit == "the KV cache" and l4.batch < h100.batch


@pytest.mark.parametrize("device, wide, narrow", [("L4", "bf16", "fp8"), ("A100-80GB", "fp32", "fp16")])
def test_half_the_weight_bytes_about_doubles_bandwidth_bound_decode_at_batch_1(device, wide, narrow):
    slow = decode_rate(LLAMA31_8B, device, tm.precision(wide), max_num_seqs=1)
    fast = decode_rate(LLAMA31_8B, device, tm.precision(narrow), max_num_seqs=1)
    assert slow.batch == fast.batch == 1 and slow.bound == fast.bound == "bandwidth"
    assert fast.decode_tokens_per_second / slow.decode_tokens_per_second == pytest.approx(2, rel=0.15)


def test_a_precision_runs_at_the_peak_the_device_has():
    assert decode_rate(LLAMA31_8B, "H100-80GB", tm.precision("fp8")).peak == "fp8"
    assert decode_rate(LLAMA31_8B, "A100-80GB", tm.precision("fp8")).peak == "bf16"   # no FP8 tensor cores
    assert decode_rate(LLAMA31_8B, "H100-80GB", tm.precision("int4")).peak == "bf16"  # W4A16 kernels
    int4 = tm.precision_for(facts_from_config({**LLAMA31_8B, "quantization_config": {"quant_method": "awq",
                                                                                       "bits": 4}}), "auto")
    assert (int4.name, int4.weight_bytes, int4.activations) == ("int4", 0.5, "bfloat16")


@pytest.mark.parametrize("quantization, weights", [
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "fp8"),
    ({"quant_method": "modelopt", "quant_algo": "FP8_PB_WO"}, "fp8"),
    ({"quant_method": "modelopt", "quantization": {"quant_algo": "NVFP4"}}, "int4"),
    ({"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}, "int4"),
    ({"quant_method": "modelopt", "quant_algo": "SOMETHING_NEW"}, None),
])
def test_modelopt_and_mxfp4_checkpoints_are_sized_by_their_weight_bits(quantization, weights):
    from llmbatch.cluster.model_facts import quantization_of

    assert quantization_of({**LLAMA31_8B, "quantization_config": quantization}) == weights


def test_a_model_that_does_not_fit_is_refused_with_the_memory_arithmetic():
    facts = facts_from_config(LLAMA3_70B)
    with pytest.raises(tm.DoesNotFit) as refused:
        tm.predict(facts, ACCELERATORS["L4"], BF16, 1, 512, 256, 4096)
    message = str(refused.value)
    weights = facts.parameters * 2 / 2**30
    assert f"at bfloat16) does not fit 1 x L4: weights {weights:.1f} GiB / 1 + activations " in message
    assert "GiB per device of 21.6 GiB usable (90% of 24.0 GiB), more than it has" in message
    with pytest.raises(tm.DoesNotFit, match="needs 8 of them per replica on L4; 4 given"):
        tm.predict_offline(facts, "L4", 4, "bf16", 512, 256)


def _profile(accelerator: str) -> dict:
    """A profile of 100 requests (500 tokens in, 256 out) in 50 busy seconds, prefill measured alone in 5 s."""
    return {"key": f"profile-on-{accelerator}", "model_fingerprint": "sha256:m", "accelerator": accelerator,
            "engine": {"dtype": "auto", "max_model_len": 4096, "tensor_parallel_size": 1},
            "measurements": [{"rows": 100, "replica_busy_seconds": 50.0, "input_tokens": 50_000,
                              "output_tokens": 25_600, "startup_seconds": 120.0}],
            "prefill": [{"input_tokens": 50_000, "replica_busy_seconds": 5.0}]}


def test_a_profile_on_one_device_scales_the_prediction_on_another_by_measured_over_predicted():
    facts = facts_from_config(LLAMA31_8B)
    profile = _profile("A100-80GB")
    measured = profile_rates(profile)
    on_a100 = tm.predict(facts, ACCELERATORS["A100-80GB"], BF16, 1, 500, 256, 4096, rows=100).breakdown
    calibration = tm.calibration_from(profile, facts)   # its run had 100 rows: a batch of at most 100
    assert calibration.decode == pytest.approx(measured.decode_tokens_per_second / on_a100.decode_tokens_per_second)
    assert calibration.prefill == pytest.approx(10_000 / on_a100.prefill_tokens_per_second)
    assert calibration.source == "a profile on A100-80GB (profile-on-A100-80GB)"

    h100 = ACCELERATORS["H100-80GB"]
    plain = tm.predict(facts, h100, BF16, 1, 800, 300, 4096).breakdown
    calibrated = tm.predict(facts, h100, BF16, 1, 800, 300, 4096, calibration=calibration).breakdown
    assert calibrated.decode_tokens_per_second / plain.decode_tokens_per_second == pytest.approx(calibration.decode)
    assert calibrated.prefill_tokens_per_second / plain.prefill_tokens_per_second == pytest.approx(
        calibration.prefill)
    assert calibrated.summary().endswith(f"calibrated from a profile on A100-80GB (profile-on-A100-80GB) (decode "
                                         f"x{calibration.decode:.3g}, prefill x{calibration.prefill:.3g})")
    assert plain.summary().endswith("; uncalibrated")


def test_a_gpu_is_calibrated_by_a_gpu_profile_before_a_cpu_one():
    facts = facts_from_config(LLAMA31_8B)
    cpu = {**_profile("CPU"), "engine": {"dtype": "bfloat16", "max_model_len": 2048, "tensor_parallel_size": 1}}
    cpu["measurements"] = cpu["measurements"] * 3
    small = facts_from_config({**LLAMA31_8B, "num_hidden_layers": 4, "hidden_size": 1024, "intermediate_size": 2048,
                               "num_attention_heads": 8, "vocab_size": 32000})
    stored = [cpu, _profile("L4")]
    assert tm.calibration_for(stored, facts, ACCELERATORS["H100-80GB"]).source.startswith("a profile on L4 ")
    assert tm.calibration_for(stored, small, ACCELERATORS["CPU"]).source.startswith("a profile on CPU ")
    assert tm.calibration_for([{"accelerator": "L4", "measurements": []}], facts, ACCELERATORS["L4"]) is None


def test_a_mixture_of_experts_reads_the_experts_its_batch_is_routed_to():
    facts = facts_from_config(MIXTRAL_8X7B)
    assert facts.experts_per_token == 2 and facts.active_parameters / 1e9 == pytest.approx(12.9, rel=0.02)

    def parameters_read(step: tm.Breakdown) -> float:
        """(weights + the batch's KV cache at 512 + 256 / 2 tokens) / tp = bytes_per_step, at 2 bytes each."""
        return (step.bytes_per_step * 2 - step.batch * 640 * facts.kv_bytes_per_token()) / 2

    one = decode_rate(MIXTRAL_8X7B, "H100-80GB", tp=2, max_num_seqs=1)
    assert parameters_read(one) == pytest.approx(facts.active_parameters, rel=0.001)
    many = decode_rate(MIXTRAL_8X7B, "H100-80GB", tp=2, max_num_seqs=256)
    assert many.batch == 256 and parameters_read(many) == pytest.approx(facts.parameters, rel=0.001)


def test_tensor_parallelism_pays_all_reduces_over_the_interconnect():
    nvlink = decode_rate(LLAMA3_70B, "H100-80GB", tp=4, max_num_seqs=64)
    pcie = decode_rate(LLAMA3_70B, "L40S", tp=4, max_num_seqs=64)
    assert nvlink.all_reduce_seconds > 0 and pcie.all_reduce_seconds > 5 * nvlink.all_reduce_seconds
    assert decode_rate(LLAMA31_8B, "H100-80GB").all_reduce_seconds == 0


def test_predict_offline_runs_as_many_replicas_as_the_devices_hold_at_the_best_tensor_parallelism():
    small, large = facts_from_config(LLAMA31_8B), facts_from_config(LLAMA3_70B)
    one = tm.predict_offline(small, "H100", 1, "bf16", 500, 500)
    assert tm.predict_offline(small, ACCELERATORS["H100-80GB"], 8, "bfloat16", 500, 500) == pytest.approx(8 * one)
    tp = tm.smallest_fit(large, ACCELERATORS["H100-80GB"], BF16, 1000)
    per_replica = tm.predict(large, ACCELERATORS["H100-80GB"], BF16, tp, 500, 500, 1000).rates
    assert tp == 2
    layouts = {size: 8 // size * tm.predict(large, ACCELERATORS["H100-80GB"], BF16, size, 500, 500, 1000)
               .rates.output_tokens_per_second for size in (2, 4, 8)}
    assert tm.predict_offline(large, "H100", 8, "bf16", 500, 500) == pytest.approx(max(layouts.values()))
    assert max(layouts.values()) >= 4 * per_replica.output_tokens_per_second
    assert tm.predict_offline(large, "H100", 3, "bf16", 500, 500) == pytest.approx(
        per_replica.output_tokens_per_second)
    with pytest.raises(tm.DoesNotFit, match="needs 2 of them per replica on H100-80GB; 1 given"):
        tm.predict_offline(large, "H100", 1, "bf16", 500, 500)


def test_accelerator_facts_hold_dense_figures_with_sources():
    for device in ACCELERATORS.values():
        assert device.memory_bandwidth_gb_per_s > 0 and device.tflops.get("bf16", 0) > 0
        assert device.name == "CPU" or (device.sources and device.interconnect_gb_per_s > 0)
    h100 = ACCELERATORS["H100-80GB"]
    assert h100.tflops["bf16"] == 989.5 and h100.tflops["fp8"] == 1979   # dense, not the 2:4-sparsity figures
    assert "fp8" not in ACCELERATORS["A100-80GB"].tflops


def test_facts_from_a_known_family_size():
    seventy = facts_from_size(KnownSize(name="Llama-2-70B", params="69.0B", layers=80, kv_heads=8, head_dim=128,
                                        context=4096))
    seven = facts_from_size(KnownSize(name="Llama-2-7B", params="6.74B", layers=32, kv_heads=32, head_dim=128,
                                      context=4096))
    assert (seventy.hidden_size, seventy.attention_heads, seventy.max_context) == (8192, 64, 4096)
    assert (seven.hidden_size, seven.attention_heads) == (4096, 32)
    assert seventy.weight_bytes() == 69_000_000_000 * 2
    assert tm.predict_offline(seven, "A100-80GB", 1, "bf16", 500, 200) > 0


def test_a_replica_runs_no_more_sequences_at_once_than_the_job_has_rows():
    facts = facts_from_config(LLAMA31_8B)
    h100 = ACCELERATORS["H100-80GB"]
    few = tm.predict(facts, h100, BF16, 1, 500, 256, 4096, rows=12).breakdown
    many = tm.predict(facts, h100, BF16, 1, 500, 256, 4096).breakdown
    assert few.batch == 12 and "the job's rows" in few.summary()
    assert many.decode_tokens_per_second > 10 * few.decode_tokens_per_second


def test_auto_dtype_runs_a_float32_checkpoint_in_bfloat16_on_gpu():
    fp32 = facts_from_config({**LLAMA31_8B, "torch_dtype": "float32"})
    assert tm.precision_for(fp32, "auto").activations == "bfloat16"
    assert tm.precision_for(fp32, "float32").activations == "float32"
