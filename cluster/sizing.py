"""Sizing arithmetic: GPUs per replica from memory, replicas from a deadline or budget, time and cost."""
from __future__ import annotations

import math
from dataclasses import dataclass

from llmbatch.cluster.accelerators import GIB, Accelerator
from llmbatch.cluster.engine_limits import offline_defaults
from llmbatch.cluster.model_facts import DTYPE_BYTES, ModelFacts

TP_CHOICES = (1, 2, 4, 8)
USEFUL_CONTEXTS = 4          # a replica is useful when its KV cache holds this many full-length sequences
RUNTIME_RESERVE = 1 * GIB      # per GPU: the CUDA context, CUDA graphs, the collective library's buffers


@dataclass(frozen=True)
class Fit:
    tensor_parallel_size: int | None
    kv_cache_tokens: int
    needed_bytes_per_device: float
    reason: str


def activation_bytes(facts: ModelFacts, device: Accelerator, tp: int, dtype: str | None = None) -> float:
    """Per GPU, the peak of one engine step at the device's scheduler limits (what vLLM's start-up profiling
    measures): the step's hidden states and its share of the MLP's activations for max_num_batched_tokens
    tokens, the float32 logits of max_num_seqs sequences, and the runtime's own reserve."""
    if device.name == "CPU":
        return 0.0
    seqs, tokens = offline_defaults(device)
    width = facts.intermediate_size or 4 * facts.hidden_size
    element = DTYPE_BYTES[dtype or facts.dtype]
    step = tokens * (facts.hidden_size + 2 * width / tp) * element * 2   # in and out of each op
    logits = seqs * facts.vocab_size * 4
    return RUNTIME_RESERVE + step + logits


def splits_heads(facts: ModelFacts, tp: int) -> bool:
    """Whether tensor parallelism of `tp` divides the attention heads (and the KV heads, or replicates them)."""
    return not (facts.attention_heads % tp or facts.kv_heads % tp and tp % facts.kv_heads)


def memory_before_kv(facts: ModelFacts, device: Accelerator, tp: int, dtype: str | None = None,
                     weights: float | None = None) -> float:
    """Per GPU, what the KV cache cannot have: its share of the weights (`weights` bytes in all, else the
    checkpoint's at `dtype`) and one step's activations."""
    weights = facts.weight_bytes(dtype) if weights is None else weights
    return weights / tp + activation_bytes(facts, device, tp, dtype)


def choose_tensor_parallel(facts: ModelFacts, device: Accelerator, max_model_len: int, dtype: str | None = None,
                           weights: float | None = None) -> Fit:
    """The smallest tensor_parallel_size whose devices hold the weights (`weights` bytes, else the checkpoint's at
    `dtype`), a step's activations and a useful KV cache."""
    weights = facts.weight_bytes(dtype) if weights is None else weights
    kv_token = facts.kv_bytes_per_token(dtype)
    wanted_kv = USEFUL_CONTEXTS * max_model_len * kv_token
    last = None
    for tp in TP_CHOICES:
        if not splits_heads(facts, tp):
            continue
        per_device = memory_before_kv(facts, device, tp, dtype, weights)
        kv_budget = (device.usable_bytes - per_device) * facts.kv_shards(tp)
        tokens = max(0, int(kv_budget // kv_token))
        last = Fit(tp, tokens, per_device + wanted_kv / facts.kv_shards(tp), "")
        if kv_budget >= wanted_kv:
            return Fit(tp, tokens, per_device + wanted_kv / facts.kv_shards(tp),
                       f"weights {weights / GIB:.1f} GiB over {tp} x {device.name} leave a KV cache of "
                       f"{tokens} tokens ({tokens // max_model_len} sequences of {max_model_len})")
    need = (weights + wanted_kv) / GIB
    return Fit(None, last.kv_cache_tokens if last else 0, last.needed_bytes_per_device if last else 0,
               f"does not fit: weights plus a KV cache for {USEFUL_CONTEXTS} x {max_model_len} tokens need "
               f"{need:.1f} GiB; {TP_CHOICES[-1]} x {device.name} give {TP_CHOICES[-1] * device.usable_bytes / GIB:.1f} GiB usable")


def replicas_for_deadline(work_seconds: float, startup_seconds: float, deadline_seconds: float) -> int | None:
    """Fewest replicas that finish `work_seconds` (of one replica) within the deadline; None if none can."""
    budget = deadline_seconds - startup_seconds
    if budget <= 0:
        return None
    return max(1, math.ceil(work_seconds / budget))


def wall_seconds(work_seconds: float, startup_seconds: float, replicas: int) -> float:
    return startup_seconds + work_seconds / max(1, replicas)


def cost_usd(wall: float, replicas: int, devices_per_replica: int, hourly_usd: float) -> float:
    return wall / 3600 * replicas * devices_per_replica * hourly_usd


def replicas_for_budget(work_seconds: float, startup_seconds: float, devices_per_replica: int, hourly_usd: float,
                        budget_usd: float, most: int) -> int | None:
    """Most replicas (fastest run) whose cost stays within budget; None if even one replica is over."""
    best = None
    for n in range(1, most + 1):
        if cost_usd(wall_seconds(work_seconds, startup_seconds, n), n, devices_per_replica, hourly_usd) <= budget_usd:
            best = n
    return best
