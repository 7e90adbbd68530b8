"""Per-replica rates of a model on a device, predicted from the model's shapes and the device's datasheet figures
(cluster/accelerator_facts.yaml): what a plan uses when no profile of the model on that device exists.

A decode step reads the weights and the batch's KV cache and multiplies every active parameter once per
sequence: it takes the longer of the two, plus the tensor-parallel all-reduces and the engine's own overhead.
Prefill is compute-bound. A request costs its prompt at the prefill rate and its output at the decode rate.

Calibration: a profile of the same model measured on one device (any engine settings) gives measured /
predicted for decode and for prefill there; the prediction for any other device is multiplied by those ratios.
That carries over how far this model gets from the datasheet peaks. Pure arithmetic: no I/O."""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from llmbatch.cluster.accelerators import GIB, Accelerator, accelerator
from llmbatch.cluster.engine_limits import offline_defaults
from llmbatch.cluster.model_facts import DTYPE_BYTES, ModelFacts
from llmbatch.cluster.profiles import Rates, rates as measured_rates
from llmbatch.cluster.sizing import (
    TP_CHOICES, activation_bytes, choose_tensor_parallel, memory_before_kv, splits_heads,
)
from llmbatch.errors import UserError

# Shares of the datasheet peaks an engine reaches. Memory-bound kernels (a decode step's weight GEMVs) typically
# stream at 60-80% of the peak bandwidth, less attention, sampling and the launch gaps between them; large
# matmuls (prefill, decode at large batches) typically run at 50-70% of the dense tensor peak, attention and the
# small ops less. A profile of the model on any device replaces them by what was measured (module docstring).
EFF_BANDWIDTH = 0.6
EFF_COMPUTE = 0.5
EFF_INTERCONNECT = 0.7          # of the one-way link bandwidth a ring all-reduce reaches
ALL_REDUCE_LATENCY_SECONDS = {"NVLink": 10e-6, "PCIe": 30e-6}
STEP_OVERHEAD_SECONDS = 0.002   # per engine step, what no kernel counts: scheduling, sampling, handing out tokens
STARTUP_SECONDS = {"gpu": 150.0, "cpu": 30.0}   # Ray, the engine's process, CUDA graphs and compilation
WEIGHT_LOAD_BYTES_PER_SECOND = 1e9              # a replica's devices reading their shards of the weights

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
PEAK_OF = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}   # a dtype's entry in the tflops figures
QUANTIZED_WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}


class DoesNotFit(UserError):
    """The model's weights, a step's activations and one full-length sequence do not fit the devices."""


@dataclass(frozen=True)
class Precision:
    """How a replica holds and multiplies the weights."""
    name: str              # bfloat16, float16, float32, fp8, int8, int4
    weight_bytes: float    # per parameter
    activations: str       # dtype of the activations and the KV cache
    peak: str              # the accelerator's tflops entry its matmuls run at, when the device lists it

    def weights_of(self, facts: ModelFacts) -> float:
        return facts.parameters * self.weight_bytes


def precision(weights: str, activations: str = "bfloat16") -> Precision:
    """`weights` is a dtype (bfloat16, bf16, float16, float32) or a weight format: fp8 and int8 multiply at
    their own peak where the device lists it (W8A8), else at the 16-bit one (weight-only kernels); int4 always
    at the 16-bit one (W4A16: AWQ and GPTQ kernels widen the weights inside the matmul)."""
    weights = DTYPE_NAMES.get(weights, weights)
    activations = DTYPE_NAMES.get(activations, activations)
    if weights in QUANTIZED_WEIGHT_BYTES:
        peak = PEAK_OF[activations] if weights == "int4" else weights
        return Precision(weights, QUANTIZED_WEIGHT_BYTES[weights], activations, peak)
    if weights not in PEAK_OF:
        known = ", ".join([*PEAK_OF, *DTYPE_NAMES, *QUANTIZED_WEIGHT_BYTES])
        raise UserError(f"unknown dtype or weight format '{weights}'; known: {known}")
    return Precision(weights, DTYPE_BYTES[weights], weights, PEAK_OF[weights])


def precision_for(facts: ModelFacts, dtype: str | None) -> Precision:
    """The precision an engine of `dtype` (None or auto: the checkpoint's own, except that vLLM runs a float32
    checkpoint in bfloat16 on GPU) runs the checkpoint at: its declared quantization, with activations of that
    dtype. On CPU, llmbatch passes float32 itself (cluster/resources.engine_dtype)."""
    if dtype in (None, "auto"):
        activations = "bfloat16" if facts.dtype == "float32" else facts.dtype
    else:
        activations = DTYPE_NAMES.get(dtype, dtype)
    return precision(facts.quantization or activations, activations)


@dataclass(frozen=True)
class Calibration:
    decode: float     # measured / predicted decode rate on the profiled device
    prefill: float    # measured / predicted prefill rate there (the decode ratio when prefill was not measured)
    source: str       # which profile, e.g. "a profile on CPU (3f2a...)"


@dataclass(frozen=True)
class Breakdown:
    """How a prediction was made, for `plan --explain`."""
    accelerator: str
    tensor_parallel_size: int
    precision: str
    peak: str
    tflops: float                  # per device, the peak used
    bandwidth_gb_per_s: float      # per device
    kv_cache_tokens: int           # per replica
    batch: int                     # sequences in a decode step
    batch_limit: str               # what bounds it: the KV cache or max_num_seqs
    bytes_per_step: float          # per device
    memory_seconds: float          # a decode step's reads at the effective bandwidth
    compute_seconds: float         # a decode step's matmuls at the effective peak
    all_reduce_seconds: float      # a decode step's tensor-parallel all-reduces
    step_seconds: float
    bound: str                     # bandwidth | compute
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    startup_seconds: float
    eff_bandwidth: float = EFF_BANDWIDTH
    eff_compute: float = EFF_COMPUTE
    calibration: Calibration | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: what bounds decode, and the rates."""
        tp = f"{self.tensor_parallel_size} x " if self.tensor_parallel_size > 1 else ""
        text = (f"{self.bound}-bound decode of {self.batch} sequences a step (bounded by {self.batch_limit}) on "
                f"{tp}{self.accelerator} at {self.precision}: {self.step_seconds * 1000:.1f} ms a step, "
                f"{self.decode_tokens_per_second:.0f} output tok/s; prefill {self.prefill_tokens_per_second:.0f} "
                f"tok/s")
        c = self.calibration
        if c is None:
            return f"{text}; uncalibrated"
        return f"{text}; calibrated from {c.source} (decode x{c.decode:.3g}, prefill x{c.prefill:.3g})"


@dataclass(frozen=True)
class Prediction:
    rates: Rates
    breakdown: Breakdown


def predict(facts: ModelFacts, device: Accelerator, prec: Precision, tensor_parallel_size: int,
            input_tokens: float, output_tokens: float, max_model_len: int, *, max_num_seqs: int | None = None,
            max_num_batched_tokens: int | None = None, calibration: Calibration | None = None,
            rows: float | None = None) -> Prediction:
    """Per-replica rates of `tensor_parallel_size` x `device` for requests of these mean input and output
    lengths. The scheduler limits default to vLLM's offline ones for the device. Raises DoesNotFit, with the
    memory arithmetic, when the KV cache left cannot hold one sequence of `max_model_len` tokens."""
    tp = tensor_parallel_size
    if not splits_heads(facts, tp):
        raise UserError(f"tensor_parallel_size {tp} does not divide the model's {facts.attention_heads} attention "
                        f"heads ({facts.kv_heads} KV heads)")
    if tp > 1 and not device.interconnect_gb_per_s:
        raise UserError(f"{device.name} has no interconnect for tensor parallelism: a replica is one device")
    kv_cache = _kv_cache_tokens(facts, device, prec, tp, max_model_len)
    seqs, chunk = offline_defaults(device)
    seqs, chunk = max_num_seqs or seqs, max_num_batched_tokens or chunk
    context = input_tokens + output_tokens / 2    # a sequence in flight is, on average, halfway through its output
    by_cache = int(kv_cache // max(1.0, context))
    rows_at_once = int(rows) if rows else seqs      # a replica never runs more sequences than it has rows
    batch = max(1, min(seqs, by_cache, rows_at_once))
    limit = ("the job's rows" if rows_at_once < min(seqs, by_cache)
             else "max_num_seqs" if seqs <= by_cache else "the KV cache")

    kv_token = facts.kv_bytes_per_token(prec.activations)
    bytes_per_step = (_weight_params_read(facts, batch) * prec.weight_bytes / tp
                      + batch * context * kv_token / facts.kv_shards(tp))
    memory = bytes_per_step / _bandwidth(device)
    compute = _flops_per_token(facts, context) * batch / tp / _flops(device, prec)
    reduce = _all_reduce_seconds(facts, device, prec, tp, batch)
    step = max(memory, compute) + reduce + STEP_OVERHEAD_SECONDS
    decode = batch / step

    prefill_compute = _flops_per_token(facts, input_tokens) * chunk / tp / _flops(device, prec)
    prefill_memory = facts.parameters * prec.weight_bytes / tp / _bandwidth(device)
    prefill_step = max(prefill_compute, prefill_memory) + _all_reduce_seconds(facts, device, prec, tp, chunk)
    prefill = chunk / (prefill_step + STEP_OVERHEAD_SECONDS)
    if calibration is not None:
        decode, prefill = decode * calibration.decode, prefill * calibration.prefill

    startup = STARTUP_SECONDS["cpu" if device.name == "CPU" else "gpu"] \
        + prec.weights_of(facts) / tp / WEIGHT_LOAD_BYTES_PER_SECOND
    per_request = input_tokens / prefill + output_tokens / decode
    rates = Rates(output_tokens_per_second=output_tokens / per_request,
                  input_tokens_per_second=input_tokens / per_request, requests_per_second=1 / per_request,
                  startup_seconds=round(startup, 1), mean_input_tokens=input_tokens, mean_output_tokens=output_tokens,
                  measurements=0, prefill_tokens_per_second=prefill)
    breakdown = Breakdown(
        accelerator=device.name, tensor_parallel_size=tp, precision=prec.name, peak=_peak_name(device, prec),
        tflops=device.tflops[_peak_name(device, prec)], bandwidth_gb_per_s=device.memory_bandwidth_gb_per_s,
        kv_cache_tokens=kv_cache, batch=batch, batch_limit=limit, bytes_per_step=bytes_per_step,
        memory_seconds=memory, compute_seconds=compute, all_reduce_seconds=reduce, step_seconds=step,
        bound="bandwidth" if memory >= compute else "compute", decode_tokens_per_second=decode,
        prefill_tokens_per_second=prefill, startup_seconds=rates.startup_seconds, calibration=calibration)
    return Prediction(rates, breakdown)


def _kv_cache_tokens(facts: ModelFacts, device: Accelerator, prec: Precision, tp: int, max_model_len: int) -> int:
    """Per replica, the KV-cache tokens the memory left after weights and activations holds (sizing.py's
    arithmetic), refused when that is less than one sequence."""
    weights = prec.weights_of(facts)
    before = memory_before_kv(facts, device, tp, prec.activations, weights)
    kv_token = facts.kv_bytes_per_token(prec.activations)
    tokens = int(max(0.0, device.usable_bytes - before) * facts.kv_shards(tp) // kv_token)
    if tokens >= max_model_len:
        return tokens
    activations = activation_bytes(facts, device, tp, prec.activations)
    usable = (f"{device.usable_bytes / GIB:.1f} GiB usable ({device.memory_utilization:.0%} of "
              f"{device.memory_bytes / GIB:.1f} GiB)")
    left = (f"which leaves a KV cache of {tokens} tokens, less than one {max_model_len}-token sequence"
            if before < device.usable_bytes else "more than it has")
    raise DoesNotFit(f"{facts.architecture} ({facts.parameters / 1e9:.1f}B parameters at {prec.name}) does not fit "
                     f"{tp} x {device.name}: weights {weights / GIB:.1f} GiB / {tp} + activations "
                     f"{activations / GIB:.1f} GiB = {before / GIB:.1f} GiB per device of {usable}, {left}")


def _weight_params_read(facts: ModelFacts, batch: int) -> float:
    """Parameters a decode step reads: all of a dense model; of a mixture of experts, the shared ones and the
    experts its `batch` tokens are routed to (each expert is hit by some token with 1 - (1 - k/E)^batch)."""
    if facts.experts <= 1 or facts.experts_per_token >= facts.experts:
        return facts.parameters
    idle = facts.parameters - facts.parameters_per_token
    experts = idle / (facts.experts - facts.experts_per_token) * facts.experts
    touched = 1 - (1 - facts.experts_per_token / facts.experts) ** batch
    return facts.parameters - experts + experts * touched


def _flops_per_token(facts: ModelFacts, context: float) -> float:
    """Multiply-adds of one token: every active parameter once, and attention over `context` earlier tokens."""
    attention = 4 * facts.layers * context * facts.attention_heads * facts.head_dim
    return 2 * facts.parameters_per_token + attention


def _peak_name(device: Accelerator, prec: Precision) -> str:
    for name in (prec.peak, PEAK_OF.get(prec.activations), "bf16", "fp32"):
        if name and device.tflops.get(name):
            return name
    raise UserError(f"{device.name} lists no FLOPs figure for {prec.name}")


def _flops(device: Accelerator, prec: Precision) -> float:
    """Effective FLOP/s of one device at the precision's peak (else the activations' or the 16-bit one)."""
    return device.tflops[_peak_name(device, prec)] * 1e12 * EFF_COMPUTE


def _bandwidth(device: Accelerator) -> float:
    return device.memory_bandwidth_gb_per_s * 1e9 * EFF_BANDWIDTH


def _all_reduce_seconds(facts: ModelFacts, device: Accelerator, prec: Precision, tp: int, tokens: float) -> float:
    """Two ring all-reduces of the hidden states per layer (after attention, after the MLP)."""
    if tp <= 1:
        return 0.0
    link = device.interconnect_gb_per_s / 2 * 1e9 * EFF_INTERCONNECT   # one direction
    message = tokens * facts.hidden_size * DTYPE_BYTES[prec.activations]
    latency = next((s for kind, s in ALL_REDUCE_LATENCY_SECONDS.items() if device.interconnect.startswith(kind)),
                   ALL_REDUCE_LATENCY_SECONDS["PCIe"])
    return 2 * facts.layers * (latency + 2 * (tp - 1) / tp * message / link)


def calibration_from(profile: dict[str, Any], facts: ModelFacts) -> Calibration | None:
    """Measured / predicted on the profile's device, with its engine settings and its requests' mean lengths;
    None when the profile holds no measurement or names a device or settings the model cannot predict."""
    measured = measured_rates(profile)
    if measured is None or not measured.mean_output_tokens:
        return None
    engine = profile.get("engine") or {}
    try:
        device = accelerator(str(profile.get("accelerator")))
        length = engine.get("max_model_len") or math.ceil(measured.mean_input_tokens + measured.mean_output_tokens)
        predicted = predict(facts, device, precision_for(facts, engine.get("dtype")),
                            int(engine.get("tensor_parallel_size") or 1), measured.mean_input_tokens,
                            measured.mean_output_tokens, int(length), rows=_rows_per_replica(profile))
    except UserError:
        return None
    source = f"a profile on {device.name} ({profile.get('key', '?')})"
    if measured.decode_tokens_per_second:
        return Calibration(measured.decode_tokens_per_second / predicted.breakdown.decode_tokens_per_second,
                           measured.prefill_tokens_per_second / predicted.breakdown.prefill_tokens_per_second,
                           source)
    overall = measured.output_tokens_per_second / predicted.rates.output_tokens_per_second
    return Calibration(overall, overall, source)


def _rows_per_replica(profile: dict[str, Any]) -> float | None:
    """How many rows each replica of the profile's runs had (the batch it could form), their median."""
    counts = [m["rows"] / max(1, m.get("replicas") or 1) for m in profile.get("measurements") or []
              if isinstance(m.get("rows"), (int, float)) and m["rows"] > 0]
    return statistics.median(counts) if counts else None


def calibration_for(stored: list[dict[str, Any]], facts: ModelFacts, device: Accelerator) -> Calibration | None:
    """The calibration from the model's profiles that best suits `device`: one measured on the same kind of
    device (CPU or GPU) first, then the one with the most measurements."""
    def preference(profile: dict[str, Any]) -> tuple[bool, int]:
        same_kind = (profile.get("accelerator") == "CPU") == (device.name == "CPU")
        return same_kind, len(profile.get("measurements") or [])

    for profile in sorted(stored, key=preference, reverse=True):
        found = calibration_from(profile, facts)
        if found is not None:
            return found
    return None


def smallest_fit(facts: ModelFacts, device: Accelerator, prec: Precision, max_model_len: int) -> int | None:
    """The smallest tensor_parallel_size whose devices hold the model and a useful KV cache (sizing.py's rule);
    None when none does, or when it takes more than one device that has no interconnect (a CPU)."""
    tp = choose_tensor_parallel(facts, device, max_model_len, prec.activations,
                                prec.weights_of(facts)).tensor_parallel_size
    return tp if tp == 1 or device.interconnect_gb_per_s else None


def predict_offline(facts: ModelFacts, device: Accelerator | str, gpus: int, dtype: str, input_tokens: int,
                    output_tokens: int) -> float:
    """Output tokens per second of `gpus` devices together, offline (a queue of requests that never runs dry):
    `gpus // tp` replicas of the tensor_parallel_size that gives the most, from the smallest that holds the
    model (sizing.py's rule: weights, a step's activations and a KV cache for four sequences of input + output
    tokens) up to `gpus` (a larger one buys KV cache, so a larger batch, at the price of all-reduces), each
    predicted by `predict` for requests of `input_tokens` in and `output_tokens` out. `device` is an
    Accelerator or a name `accelerators.accelerator` takes (H100, L4, ...); `dtype` is bf16, fp16, fp32, fp8,
    int8 or int4 (weights; activations and KV cache in bf16 for the quantized ones). Uncalibrated. Raises
    DoesNotFit when the model needs more than `gpus` devices."""
    device = device if isinstance(device, Accelerator) else accelerator(device)
    prec = precision(dtype)
    length = input_tokens + output_tokens
    tp = smallest_fit(facts, device, prec, length)
    if tp is None or tp > gpus:
        most = TP_CHOICES[-1] if device.interconnect_gb_per_s else 1
        need = f"{tp} of them" if tp else f"more than {most} of them"
        raise DoesNotFit(f"{facts.architecture} at {prec.name} needs {need} per replica on {device.name}; "
                         f"{gpus} given")
    totals = []
    for size in (choice for choice in TP_CHOICES if tp <= choice <= gpus):
        if not splits_heads(facts, size):
            continue
        rates = predict(facts, device, prec, size, input_tokens, output_tokens, length).rates
        totals.append(gpus // size * rates.output_tokens_per_second)
    return max(totals)

