"""What each engine replica reserves, and whether the cluster can hold the requested pool."""
from __future__ import annotations

from dataclasses import dataclass

from llmbatch.errors import UserError

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


def check_fits(shape: ReplicaShape, replicas: int, cluster: dict[str, float],
               nodes: list[dict[str, float]] | None = None, accelerator_type: str | None = None) -> None:
    """Fail before any engine starts when the pool can never be scheduled.

    `replicas` is the least the pool needs; `nodes` (each node's total resources) checks that one
    replica's workers fit on a single node, since a replica's placement group is packed on one node.
    """
    if nodes:
        check_replica_fits_a_node(shape, nodes, accelerator_type)
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


def can_host(shape: ReplicaShape, node: dict[str, float], accelerator_type: str | None = None) -> bool:
    """Whether one replica's workers fit on this node."""
    if accelerator_type and node.get(f"accelerator_type:{accelerator_type}", 0) <= 0:
        return False
    return all(node.get(key, 0) >= amount * shape.workers_per_replica for key, amount in shape.bundle.items())


def replica_capacity(shape: ReplicaShape, cluster: dict[str, float]) -> int:
    """How many replicas of this shape the cluster holds at once, next to the pipeline's CPU stages."""
    per = {k: v * shape.workers_per_replica for k, v in shape.bundle.items()}
    limits = []
    for key, amount in per.items():
        have = cluster.get(key, 0) - (PIPELINE_CPU_OVERHEAD if key == "CPU" else 0)
        limits.append(int(have // amount) if amount else 10**6)
    return max(0, min(limits)) if limits else 0


def engine_dtype(dtype: str, on_cpu: bool) -> str:
    """The dtype an engine runs: `auto` is the checkpoint's own on GPU, float32 on CPU (vLLM's CPU kernels)."""
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu else "auto"


def default_memory_utilization(accelerator: str, replicas_per_node: int) -> float:
    """vLLM's share of device memory. On CPU it is a share of RAM, split between co-located replicas."""
    if accelerator == "gpu":
        return 0.9
    return round(max(0.1, min(0.5, 0.8 / max(1, replicas_per_node))), 2)


def check_replica_fits_a_node(shape: ReplicaShape, nodes: list[dict[str, float]],
                              accelerator_type: str | None = None) -> None:
    need = {key: amount * shape.workers_per_replica for key, amount in shape.bundle.items()}
    if accelerator_type:
        label = f"accelerator_type:{accelerator_type}"
        typed = [n for n in nodes if n.get(label, 0) > 0]
        if not typed:
            known = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
            raise UserError(f"resources.accelerator_type: no node has {accelerator_type} GPUs; "
                            f"the cluster has {', '.join(known) or 'no typed accelerators'}")
        nodes = typed
    for key, amount in need.items():
        largest = max((n.get(key, 0) for n in nodes), default=0)
        if amount > largest:
            what = "GPUs" if key == "GPU" else f"{key}s" if key == "CPU" else key
            field = "model.engine.tensor_parallel_size" if key == "GPU" else "resources"
            raise UserError(f"{field}: one replica needs {amount:g} {what} on a single node "
                            f"(tensor_parallel_size={shape.workers_per_replica}); the largest node has {largest:g}")


def engine_in_process(accelerator: str, tensor_parallel_size: int) -> bool:
    """Whether a replica runs vLLM's engine core and worker in its own process.

    On CPU this skips two process starts that each import vLLM (about 30 s here) and lets the engine compute
    on every core it is given; on GPU vLLM's separate engine-core process overlaps scheduling and output
    processing with the model's forward passes, which is worth more than its start-up.
    """
    return accelerator == "cpu" and tensor_parallel_size == 1


def replica_threads(accelerator: str, node_cpus: float, replicas_per_node: int) -> int | None:
    """Compute threads of each CPU replica: the node's cores shared between the replicas placed on it.

    Ray would set a replica's OMP_NUM_THREADS to its one-CPU request. The pipeline's other steps ask for a
    quarter CPU each and are mostly idle while the engines generate, so the cores are the engines' to use.
    """
    if accelerator != "cpu":
        return None
    return max(1, int(node_cpus // max(1, replicas_per_node)))


# ray.data.llm keeps this many batches in each engine replica at once (vLLMEngineProcessorConfig's default)
CONCURRENT_BATCHES = 8
# vLLM's sequence limit on CPU for offline use (the LLM class's default there)
CPU_MAX_NUM_SEQS = 256
# room per sequence for its prompt when the KV cache is sized to the job (prompts are not tokenized yet)
PROMPT_TOKENS_ALLOWANCE = 512
KV_HEADROOM, KV_SPARE_TOKENS = 1.25, 1024


def cpu_max_model_len(kv_bytes_per_token: int, context: int | None, memory_share_bytes: float) -> int | None:
    """The model's context, capped by the tokens a CPU replica's memory share holds as KV cache (in whole
    blocks of 16 tokens); None when the context is unknown."""
    if not context:
        return None
    fits = int((memory_share_bytes / kv_bytes_per_token - KV_SPARE_TOKENS) / KV_HEADROOM) // 16 * 16
    return max(16, min(context, fits))


def cpu_kv_cache_bytes(kv_bytes_per_token: int, max_model_len: int | None, max_tokens: int, rows: int,
                       batch_size: int, memory_share_bytes: float) -> int | None:
    """A CPU replica's KV cache sized to the rows it can hold at once, or None to keep the memory share.

    vLLM's CPU backend allocates (and touches) its whole KV cache before the first row, about 1.3 s per GiB
    here: at the default share of half the machine's RAM that is most of the engine's start. A job never has
    more than batch_size x CONCURRENT_BATCHES rows (and never more than its own rows) in a replica, each at
    most its prompt plus max_tokens long. A longer prompt than the allowance still runs: vLLM queues
    sequences until blocks free up.
    """
    seq_tokens = max_tokens + PROMPT_TOKENS_ALLOWANCE
    if max_model_len:
        seq_tokens = min(seq_tokens, max_model_len)
    sequences = max(1, min(rows, batch_size * CONCURRENT_BATCHES, CPU_MAX_NUM_SEQS))
    tokens = max(sequences * seq_tokens, max_model_len or 0)  # vLLM needs room for one longest sequence
    # vLLM keeps blocks for itself (given exactly max_model_len tokens it found room for 98% of them), and a
    # model's real per-token size may exceed the estimate from its config
    need = int(tokens * KV_HEADROOM + KV_SPARE_TOKENS) * kv_bytes_per_token
    if need >= memory_share_bytes:
        return None
    return int(need)
