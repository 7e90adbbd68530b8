"""What each engine replica reserves, and whether the cluster can hold the requested pool."""
from __future__ import annotations

from dataclasses import dataclass

from jobs.errors import UserError

# Reading, rendering and writing run beside the engines; they need this much CPU in all.
PIPELINE_CPU_OVERHEAD = 0.5


@dataclass(frozen=True)
class ReplicaShape:
    accelerator: str                 # "cpu" | "gpu"
    bundle: dict[str, float]         # per engine worker (tensor_parallel_size workers per replica)
    workers_per_replica: int


def choose_accelerator(requested: str, cluster: dict[str, float]) -> str:
    gpus = cluster.get("GPU", 0)
    if requested == "gpu" and gpus < 1:
        raise UserError("resources.accelerator: gpu was asked for, but the Ray cluster has no GPUs; "
                        "use accelerator: cpu (or auto) or submit to a cluster with GPU nodes")
    if requested == "auto":
        return "gpu" if gpus >= 1 else "cpu"
    return requested


def replica_shape(accelerator: str, tensor_parallel_size: int) -> ReplicaShape:
    if accelerator == "gpu":
        return ReplicaShape("gpu", {"GPU": 1.0, "CPU": 1.0}, tensor_parallel_size)
    return ReplicaShape("cpu", {"CPU": 1.0}, 1)


def check_fits(shape: ReplicaShape, replicas: int, cluster: dict[str, float]) -> None:
    """Fail before any engine starts when the pool can never be scheduled."""
    need_cpu = shape.bundle.get("CPU", 0) * shape.workers_per_replica * replicas + PIPELINE_CPU_OVERHEAD
    have_cpu = cluster.get("CPU", 0)
    if need_cpu > have_cpu:
        raise UserError(
            f"resources.replicas: {replicas} replica(s) need {need_cpu:g} CPUs "
            f"({shape.bundle.get('CPU', 0) * shape.workers_per_replica:g} each plus {PIPELINE_CPU_OVERHEAD:g} "
            f"for reading and writing); the cluster has {have_cpu:g}"
        )
    need_gpu = shape.bundle.get("GPU", 0) * shape.workers_per_replica * replicas
    if need_gpu > cluster.get("GPU", 0):
        raise UserError(f"resources.replicas: {replicas} replica(s) need {need_gpu:g} GPUs; "
                        f"the cluster has {cluster.get('GPU', 0):g}")


def default_memory_utilization(accelerator: str, replicas_per_node: int) -> float:
    """vLLM's share of device memory. On CPU it is a share of RAM, split between co-located replicas."""
    if accelerator == "gpu":
        return 0.9
    return round(max(0.1, min(0.5, 0.8 / max(1, replicas_per_node))), 2)
