"""The engine stages of a run: vLLM's arguments and the replica pool, for the job's model and each judge's."""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from llmbatch.cluster.engine_limits import concurrent_batches, device_of, scheduler_limits
from llmbatch.cluster.model_facts import facts_for_checkpoint
from llmbatch.cluster.model_store import ensure_model_here
from llmbatch.cluster.resources import (
    ReplicaShape, can_host, cpu_kv_cache_bytes, cpu_max_model_len, default_memory_utilization, engine_dtype, engine_in_process,
    replica_threads,
)
from llmbatch.jobs.resolve import ResolvedModel
from llmbatch.pipelines.infer import EngineSettings

Nodes = dict[str, dict[str, float]]   # node id -> its Ray resources
AUTO_FIT = -1   # vLLM's max_model_len for "the model's context, or as much of it as the KV cache holds"


def engine_stage(model: ResolvedModel, engine, sampling: dict[str, Any], *, accelerator: str, shape: ReplicaShape,
                 replicas: tuple[int, int], nodes: Nodes, accelerator_type: str | None, batch_size: int, rows: int,
                 progress_actor: str | None = None, max_concurrent_batches: int | None = None,
                 on_cluster: bool = False) -> EngineSettings:
    """The settings of one engine stage: `engine` is the model.engine section it runs with."""
    hosts = hosts_for(shape, nodes, accelerator_type)
    per_node = math.ceil(replicas[1] / max(1, len(hosts)))
    kwargs = engine_kwargs_for(engine, accelerator, model.max_len, per_node)
    if model.engine == "vllm":
        kwargs.update(scheduler_limits(accelerator, device_of(host_labels(nodes, hosts), accelerator_type),
                                       engine.max_num_seqs, engine.max_num_batched_tokens))
        if engine.max_model_len is None:
            fitted = fitted_max_len(model, accelerator, kwargs, smallest_host_memory(nodes, hosts))
            kwargs.pop("max_model_len", None)
            if fitted is not None:
                kwargs["max_model_len"] = fitted
        kwargs.update(kv_cache_for(kwargs, model.path, accelerator, engine, sampling.get("max_tokens") or 1, rows,
                                   batch_size, smallest_host_memory(nodes, hosts)))
    return EngineSettings(
        model_path=str(model.path),
        engine_kwargs=kwargs,
        sampling_params=sampling,
        replicas=replicas,
        batch_size=batch_size,
        max_concurrent_batches=concurrent_batches(max_concurrent_batches, kwargs.get("max_num_seqs"), batch_size),
        bundle_per_replica=shape.bundle,
        accelerator_type=accelerator_type,
        progress_actor=progress_actor,
        engine=model.engine,
        in_process=engine_in_process(accelerator, engine.tensor_parallel_size),
        threads=replica_threads(accelerator, smallest_host_cpus(nodes, hosts), per_node),
        ensure_model=(partial(ensure_model_here, model.source, model.path.name if model.kind == "hub" else None)
                      if on_cluster and model.kind != "local" else None),
    )


def fitted_max_len(model: ResolvedModel, accelerator: str, engine_kwargs: dict[str, Any],
                   host_memory: float | None) -> int | None:
    """max_model_len when the job sets none: the model's own context, capped by the KV cache a replica holds.
    On GPU vLLM measures that itself at start-up (AUTO_FIT); on CPU it is the memory share the replica gets."""
    if accelerator != "cpu":
        return AUTO_FIT
    if not host_memory or model.path is None:
        return model.max_len
    try:
        per_token = facts_for_checkpoint(model.path).kv_bytes_per_token(engine_kwargs["dtype"])
    except (OSError, ValueError, KeyError, TypeError):
        return model.max_len
    return cpu_max_model_len(per_token, model.max_len, engine_kwargs["gpu_memory_utilization"] * host_memory)


def row_limit(stage: EngineSettings, model: ResolvedModel) -> int | None:
    """The longest prompt plus output a row may have on this stage's engines: their max_model_len, or the
    model's context where vLLM fits it at start-up (a longer row then fails alone, in the engine)."""
    value = stage.engine_kwargs.get("max_model_len")
    return value if value and value > 0 else model.max_len


def hosts_for(shape: ReplicaShape, nodes: Nodes, accelerator_type: str | None) -> list[str]:
    return [node for node, res in nodes.items() if can_host(shape, res, accelerator_type)]


def host_labels(nodes: Nodes, hosts: list[str]) -> set[str]:
    """The Ray accelerator_type labels of the hosts."""
    return {key.split(":", 1)[1] for node in hosts for key in nodes[node] if key.startswith("accelerator_type:")}


def engine_kwargs_for(engine, accelerator: str, max_len: int | None, replicas_per_node: int) -> dict[str, Any]:
    """vLLM engine arguments for an engine spec on this accelerator."""
    kwargs: dict[str, Any] = {
        "dtype": engine_dtype(engine.dtype, accelerator == "cpu"),
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization
        or default_memory_utilization(accelerator, replicas_per_node),
        "enable_prefix_caching": engine.enable_prefix_caching,
    }
    if max_len is not None:
        kwargs["max_model_len"] = max_len
    if engine.trust_remote_code:
        kwargs["trust_remote_code"] = True
    eager = engine.enforce_eager if engine.enforce_eager is not None else accelerator == "cpu"
    if eager:  # compiling costs minutes on CPU and buys little there
        kwargs["enforce_eager"] = True
    return kwargs


def kv_cache_for(engine_kwargs: dict[str, Any], model_path: Path | None, accelerator: str, engine, max_tokens: int,
                 rows: int, batch_size: int, host_memory: float | None) -> dict[str, Any]:
    """On CPU with no memory share set, a KV cache sized to the job (see cpu_kv_cache_bytes) in place of the
    share: vLLM then neither allocates half the machine's RAM nor warms up before the first row."""
    if accelerator != "cpu" or engine.gpu_memory_utilization is not None or not host_memory or model_path is None:
        return {}
    try:
        per_token = facts_for_checkpoint(model_path).kv_bytes_per_token(engine_kwargs["dtype"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    size = cpu_kv_cache_bytes(per_token, engine_kwargs.get("max_model_len"), max_tokens, rows, batch_size,
                              engine_kwargs["gpu_memory_utilization"] * host_memory)
    if size is None:
        return {}
    return {"kv_cache_memory_bytes": size}


def smallest_host_memory(nodes: Nodes, hosts: list[str]) -> float | None:
    """Memory Ray may schedule on the smallest node that may host a replica (less than its RAM)."""
    return min((nodes[node]["memory"] for node in hosts if nodes[node].get("memory")), default=None)


def smallest_host_cpus(nodes: Nodes, hosts: list[str]) -> float:
    """CPUs of the smallest node that may host a replica."""
    return min((nodes[node].get("CPU", 1) for node in hosts), default=1)
