"""`make bench` (result cache): a cold run that fills the cache, then the nightly rerun with 10% of its
prompts changed; rows the rerun inferred and what it cost against the cold run."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("llmbatch"))
ROWS = 256
CHANGED = ROWS // 10


def write_prompts(path: Path, prompts: list[str], changed: int) -> None:
    rows = []
    for i in range(ROWS):
        text = f"{prompts[i % len(prompts)]} (variant {i})"
        if i < changed:
            text += " Answer in one sentence."
        rows.append({"qid": f"q{i}", "prompt": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def submit(job: Path, run_id: str) -> dict:
    proc = subprocess.run([CLI, "submit", str(job), "--run-id", run_id], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"llmbatch submit --run-id {run_id} failed:\n{proc.stderr[-3000:]}")
    return json.loads((job.parent / "out" / run_id / "_manifest.json").read_text())


def inferred(manifest: dict) -> int:
    return sum(r["rows"] for r in manifest["replicas"])


def engine_busy(manifest: dict) -> float:
    """Seconds from a replica's first finished batch to its last (start-up excluded), summed over replicas."""
    return sum((r["last_batch_at"] or 0) - (r["first_batch_at"] or 0) for r in manifest["replicas"])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="llmbatch-cache-"))
    prompts = [json.loads(line)["prompt"] for line in (REPO / "jobs/data/calibration.jsonl").read_text().splitlines()]
    data = work / "prompts.jsonl"
    job = work / "job.yaml"
    job.write_text(json.dumps({"name": "cache-bench", "model": {"source": "smollm2-135m-instruct"},
                               "input": {"path": str(data), "id_column": "qid"}, "sampling": {"max_tokens": 64},
                               "output": {"path": str(work / "out")}, "cache": {"path": str(work / "cache")},
                               "resources": {"replicas": 1, "batch_size": 8}}))
    print(f"cache bench: smollm2-135m-instruct, CPU, 1 replica, {ROWS} rows, max_tokens 64; "
          f"rerun with {CHANGED} prompts ({CHANGED / ROWS:.0%}) changed", flush=True)
    write_prompts(data, prompts, 0)
    cold = submit(job, "cold")
    write_prompts(data, prompts, CHANGED)
    warm = submit(job, "rerun")
    for name, m in (("cold run", cold), ("rerun, 10% changed", warm)):
        cost = (m.get("cost") or {}).get("usd")
        print(f"  {name:<20} wall {m['wall_seconds']:7.1f} s  start-up {m['startup_seconds'] or 0:6.1f} s  "
              f"engine busy {engine_busy(m):6.1f} s  inferred {inferred(m):4d} rows  cache hits {m['cache']['hits']:4d}"
              + (f"  cost ${cost:.5f}" if cost is not None else ""))
    print(f"  rerun / cold: wall x{warm['wall_seconds'] / cold['wall_seconds']:.2f}, engine busy "
          f"x{engine_busy(warm) / max(1e-9, engine_busy(cold)):.2f}, rows inferred "
          f"x{inferred(warm) / inferred(cold):.2f}")


if __name__ == "__main__":
    main()
