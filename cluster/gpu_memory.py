"""Before a judge pass starts its engines on the GPUs the previous pass's engines used, wait until those GPUs
have memory free again: an engine process can outlive its pass by seconds while it exits, and vLLM refuses to
start when less than its memory share is free."""
from __future__ import annotations

import time
from typing import Callable

FREE_WAIT_SECONDS = 120.0
POLL_SECONDS = 2.0

Probe = Callable[[list[str]], dict[str, float | None]]   # node ids -> least free share of any GPU there


def least_free_share() -> float | None:
    """The smallest free/total memory of this machine's GPUs (NVML sees them all, whatever Ray assigned to the
    caller); None without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        shares = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            shares.append(info.free / info.total)
        return min(shares) if shares else None
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def probe_nodes(node_ids: list[str]) -> dict[str, float | None]:
    """least_free_share on each node, asked with a zero-resource task pinned there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(least_free_share)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in node_ids]
    return dict(zip(node_ids, ray.get(refs, timeout=60)))


def wait_for_free_memory(node_ids: list[str], share: float, log, *, timeout: float = FREE_WAIT_SECONDS,
                         probe: Probe = probe_nodes, clock: Callable[[], float] = time.monotonic,
                         pause: Callable[[float], None] = time.sleep) -> bool:
    """Wait until every GPU on `node_ids` has at least `share` of its memory free; True once it has (or
    when no node reports GPUs), False after `timeout` (the engines then start anyway, and vLLM says what is
    short)."""
    deadline = clock() + timeout
    waited = False
    while True:
        try:
            shares = {node: value for node, value in probe(node_ids).items() if value is not None}
        except Exception as exc:  # a node that cannot answer: nothing to wait on
            log.warning("gpu_memory_not_checked", error=f"{type(exc).__name__}: {exc}")
            return True
        short = {node: value for node, value in shares.items() if value < share}
        if not short:
            if waited:
                log.info("gpu_memory_free", nodes=len(shares))
            return True
        if clock() >= deadline:
            log.warning("gpu_memory_still_held", wanted_share=share,
                        free_shares={node[:12]: round(value, 3) for node, value in short.items()},
                        note="starting the engines anyway; a process still holding GPU memory shows in nvidia-smi")
            return False
        if not waited:
            log.info("gpu_memory_wait", wanted_share=share,
                     free_shares={node[:12]: round(value, 3) for node, value in short.items()})
            waited = True
        pause(POLL_SECONDS)
