"""Turn a failed Ray execution into one line that names the root cause and what to change."""
from __future__ import annotations

import re
from pathlib import Path

ERROR_LINE = re.compile(r"\b([A-Z]\w*(?:Error|Exception)): (.+)$")
WRAPPERS = ("Engine core initialization failed", "The actor died", "ActorDiedError", "RayTaskError",
            "Failed to apply UDF", "Dataset execution")
HINTS = [
    ("memory utilization", "lower model.engine.gpu_memory_utilization, e.g. --set model.engine.gpu_memory_utilization=0.3"),
    ("out of memory", "lower model.engine.max_model_len or resources.batch_size, or use fewer replicas per node"),
    ("head_dim", "this model's attention shape is not supported on this device"),
    ("not supported", "see which architectures the installed vLLM supports"),
]


def ray_logs_dir() -> Path | None:
    try:
        from ray._private import worker

        node = worker._global_node
        return Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:
        return None


def root_cause(logs_dir: Path | None, since: float) -> str | None:
    """The first specific error line that a worker logged after `since` (epoch seconds)."""
    if logs_dir is None or not logs_dir.is_dir():
        return None
    files = sorted((p for p in logs_dir.glob("worker-*") if p.suffix in (".out", ".err")
                    and p.stat().st_mtime >= since), key=lambda p: p.stat().st_mtime)
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            match = ERROR_LINE.search(line)
            if match and not any(w in line for w in WRAPPERS):
                return f"{match.group(1)}: {match.group(2).strip()}"[:500]
    return None


def orphaned_engine_pids(proc: Path = Path("/proc")) -> list[int]:
    """vLLM engine processes (named `VLLM::...`) whose parent died: left by an earlier run that was killed,
    they keep its KV cache memory. Linux only; elsewhere none are found."""
    pids = []
    for entry in proc.glob("[0-9]*"):
        try:
            name = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = stat.rsplit(")", 1)[-1].split()[1] if ")" in stat else ""
        if name.startswith("VLLM::") and parent == "1":
            pids.append(int(entry.name))
    return sorted(pids)


def explain_failure(exc: BaseException, since: float) -> str:
    logs_dir = ray_logs_dir()
    cause = root_cause(logs_dir, since)
    if cause is None:
        text = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = (text[-1] if text else type(exc).__name__)[:500]
    message = f"the pipeline failed: {cause}"
    hint = next((h for key, h in HINTS if key in cause.lower()), None)
    orphans = orphaned_engine_pids() if "memory" in cause.lower() else []
    if orphans:
        listed = " ".join(str(p) for p in orphans)
        orphan_hint = (f"vLLM engine processes left by an earlier, interrupted run still hold memory: "
                       f"stop them with `kill {listed}`")
        hint = f"{hint}; {orphan_hint}" if hint else orphan_hint
    if hint:
        message += f" ({hint})"
    if logs_dir is not None:
        message += f"; worker logs: {logs_dir}"
    return message
