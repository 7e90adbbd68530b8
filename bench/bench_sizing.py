"""`make bench` (sizing): profile the demo model, then plan and run jobs of several sizes; predicted vs measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("llmbatch"))
SIZES = (16, 64, 160)


def cli(*args: str, env: dict) -> str:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"llmbatch {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="llmbatch-sizing-"))
    env = {**os.environ, "LLMBATCH_PROFILE_STORE": str(work / "profiles")}
    prompts = [json.loads(line)["prompt"] for line in (REPO / "jobs/data/calibration.jsonl").read_text().splitlines()]
    print("sizing bench: smollm2-135m-instruct, CPU, 1 replica, max_tokens 64; profile = 64 calibration prompts",
          flush=True)
    cli("profile", "smollm2-135m-instruct", "--samples", "64", "--max-tokens", "64", env=env)
    print(f"\n{'rows':>6} {'predicted s':>12} {'measured s':>11} {'error':>7}")
    for size in SIZES:
        data = work / f"prompts-{size}.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{prompts[i % len(prompts)]} (variant {i})"}) + "\n"
                                for i in range(size)))
        job = work / f"job-{size}.yaml"
        job.write_text(json.dumps({"name": "sizing", "model": {"source": "smollm2-135m-instruct"},
                                   "input": {"path": str(data)}, "sampling": {"max_tokens": 64},
                                   "output": {"path": str(work / "out")}, "resources": {"replicas": 1}}))
        predicted = json.loads(cli("plan", str(job), "--json", env=env))["wall_seconds"]
        cli("submit", str(job), "--run-id", f"n{size}", env=env)
        measured = json.loads((work / "out" / f"n{size}" / "_manifest.json").read_text())["wall_seconds"]
        print(f"{size:>6} {predicted:>12.1f} {measured:>11.1f} {(predicted - measured) / measured:>+7.0%}", flush=True)


if __name__ == "__main__":
    main()
