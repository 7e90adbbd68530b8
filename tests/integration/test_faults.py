"""Faults a run survives: an engine replica's process (vLLM runs inside it) killed while it generates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from support import CLI, REPO, read_output, write_job

ENGINE_PROCESS = "MapBatches(LlmbatchEngineUDF)"  # the Ray actor of an engine replica, vLLM in-process


def _engine_processes(root: int) -> list[psutil.Process]:
    try:
        tree = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in tree:
        try:
            if ENGINE_PROCESS in proc.name() or ENGINE_PROCESS in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _parts(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*.parquet") if "_staging" not in p.parts] if run_dir.exists() else []


def test_a_killed_vllm_engine_is_replaced_and_no_row_is_lost_or_doubled(tmp_path: Path, demo_model: str):
    """The process of the only engine replica (vLLM's engine core runs inside it) is SIGKILLed once rows are
    being written: Ray starts a new replica and retries its batches. The run succeeds with every row exactly
    once and no row error."""
    # enough rows that generation outlasts the first parts by many seconds (the demo model makes ~500 tok/s here)
    rows_in = [{"qid": f"q{i:03d}", "prompt": f"Count from {i} to {i + 9}, separated by commas."} for i in range(192)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_in), encoding="utf-8")
    job = write_job(tmp_path / "job.yaml", name="engine-kill", model={"source": demo_model},
                    input={"path": str(data), "id_column": "qid"}, sampling={"max_tokens": 32},
                    output={"path": str(tmp_path / "out"), "rows_per_part": 16},
                    resources={"replicas": 1, "batch_size": 4})
    run_dir = tmp_path / "out" / "kill-1"
    proc = subprocess.Popen([CLI, "submit", str(job), "--run-id", "kill-1", "--set", "model.engine.max_model_len=512"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed: list[int] = []
    replacement: list[int] = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not killed:
            if _parts(run_dir):
                for engine in _engine_processes(proc.pid):
                    engine.send_signal(signal.SIGKILL)
                    killed.append(engine.pid)
            time.sleep(0.2)
        while time.time() < deadline and proc.poll() is None and not replacement:
            replacement = [p.pid for p in _engine_processes(proc.pid) if p.pid not in killed]
            time.sleep(0.5)
        stdout, stderr = proc.communicate(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert killed, "no engine process was found while the run was writing"
    assert replacement, "no new engine process started after the kill"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr[-6000:]}"
    rows, manifest = read_output(str(run_dir))
    assert sorted(r.id for r in rows) == [r["qid"] for r in rows_in]
    assert all(r.error is None and r.generated_text for r in rows)
    assert manifest["status"] == "succeeded"
    assert manifest["rows"] == {"in": 192, "out": 192, "ok": 192, "error": 0, "duplicate_ids": 0}
