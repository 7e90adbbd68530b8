"""`make bench` (resume): a cold run, then the same job killed at about half its rows and resumed;
how many rows the resume computed again and what it cost in wall time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("llmbatch"))
ROWS = 256  # two waves of in-flight rows (16 batches of 8 per replica): the kill lands after the first


def rows_written(run: Path) -> int:
    total = 0
    for part in run.glob("*.parquet"):
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:
            pass
    return total


def submit(job: Path, *args: str) -> dict:
    proc = subprocess.run([CLI, "submit", str(job), *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"llmbatch submit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    run_id = args[args.index("--run-id" if "--run-id" in args else "--resume") + 1]
    return json.loads((job.parent / "out" / run_id / "_manifest.json").read_text())


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="llmbatch-resume-"))
    prompts = [json.loads(line)["prompt"] for line in (REPO / "jobs/data/calibration.jsonl").read_text().splitlines()]
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{prompts[i % len(prompts)]} (variant {i})"}) + "\n"
                            for i in range(ROWS)))
    job = work / "job.yaml"
    job.write_text(json.dumps({"name": "resume-bench", "model": {"source": "smollm2-135m-instruct"},
                               "input": {"path": str(data)}, "sampling": {"max_tokens": 64},
                               "output": {"path": str(work / "out"), "rows_per_part": 16},
                               "resources": {"replicas": 1, "batch_size": 8}}))
    print(f"resume bench: smollm2-135m-instruct, CPU, 1 replica, {ROWS} rows, max_tokens 64, "
          "parts of 16 rows", flush=True)
    cold = submit(job, "--run-id", "cold")
    print(f"  cold run                 {cold['wall_seconds']:7.1f} s", flush=True)

    proc = subprocess.Popen([CLI, "submit", str(job), "--run-id", "killed"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    while rows_written(work / "out" / "killed") < ROWS // 2 and proc.poll() is None:
        time.sleep(0.5)
    killed_after = time.time() - started
    written = rows_written(work / "out" / "killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    subprocess.run(["pkill", "-9", "-s", str(proc.pid)], capture_output=True)
    resumed = submit(job, "--resume", "killed")
    skipped = resumed["resumed"]["rows_skipped"]
    print(f"  killed after             {killed_after:7.1f} s with {written} of {ROWS} rows written")
    print(f"  resume                   {resumed['wall_seconds']:7.1f} s; skipped {skipped} rows, "
          f"computed {ROWS - skipped} ({(ROWS - skipped) / ROWS:.0%}); rows written twice: "
          f"{resumed['rows']['out'] - ROWS}")
    print(f"  killed + resumed / cold  x{(killed_after + resumed['wall_seconds']) / cold['wall_seconds']:.2f}")


if __name__ == "__main__":
    main()
