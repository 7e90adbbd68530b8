"""How many sequences and tokens an engine schedules per step, and how many batches a replica keeps in flight.

ray.data.llm builds vLLM's engine without a usage context, so vLLM's offline defaults for large GPUs never
apply and every engine would run at vLLM's generic 128 sequences and 2048 batched tokens. On GPUs llmbatch sets
vLLM's offline (`LLM` class) defaults for the device instead; on CPU vLLM's own CPU defaults stand."""
from __future__ import annotations

import math

from llmbatch.cluster.accelerators import GIB, Accelerator, device_for_label

RAY_DEFAULT_CONCURRENT_BATCHES = 8
QUEUE_HEADROOM = 1.25   # rows in flight per replica, over what its scheduler can run at once


def offline_defaults(device: Accelerator | None) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) vLLM's LLM class picks on `device` (vllm/engine/arg_utils.py,
    get_batch_defaults); an unknown device gets the smaller ones."""
    memory = device.memory_bytes if device else 0
    if memory >= 160 * GIB or (memory >= 70 * GIB and "a100" not in device.name.lower()):
        return 1024, 16384
    return 256, 8192


def scheduler_limits(accelerator: str, device: Accelerator | None, max_num_seqs: int | None,
                     max_num_batched_tokens: int | None) -> dict[str, int]:
    """The engine arguments to set: the job's values, else on GPU the device's offline defaults."""
    limits: dict[str, int] = {}
    seqs, tokens = offline_defaults(device) if accelerator == "gpu" else (None, None)
    if max_num_seqs or seqs:
        # vLLM refuses max_num_batched_tokens below max_num_seqs: a job's own token budget caps the default
        limits["max_num_seqs"] = max_num_seqs or min(seqs, max_num_batched_tokens or seqs)
    if max_num_batched_tokens or tokens:
        limits["max_num_batched_tokens"] = max_num_batched_tokens or tokens
    return limits


def concurrent_batches(explicit: int | None, max_num_seqs: int | None, batch_size: int) -> int | None:
    """Batches a replica works on at once: enough that its scheduler always has rows waiting
    (max_num_seqs x 1.25 rows), never fewer than Ray's default; None leaves Ray's default."""
    if explicit:
        return explicit
    if not max_num_seqs:
        return None
    return max(RAY_DEFAULT_CONCURRENT_BATCHES, math.ceil(max_num_seqs * QUEUE_HEADROOM / batch_size))


def device_of(labels: set[str], pinned: str | None) -> Accelerator | None:
    """The device replicas run on: the pinned accelerator_type, else the hosts' one label; with several, the
    one with the least memory (its limits suit every host); None when unknown."""
    if pinned:
        return device_for_label(pinned)
    devices = [device_for_label(label) for label in labels]
    if not devices or any(d is None for d in devices):
        return None
    return min(devices, key=lambda d: d.memory_bytes)
