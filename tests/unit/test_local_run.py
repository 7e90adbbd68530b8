"""A local run keeps the terminal for llmbatch's own lines and joins the run history; a refused resubmission
leaves the running attempt's record alone. The run itself is replaced here by a stand-in that logs like one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmbatch.jobs import run_index

SCRIPT = """
import os, sys, types
import structlog
from llmbatch.errors import UserError
from llmbatch.jobs import local_run
from llmbatch.jobs.logs import configure_logging
from llmbatch.jobs.spec import validate_spec

def stand_in(spec, run_id, **kwargs):
    os.write(2, b"native noise from a library\\n")
    print("python noise from a library")
    structlog.get_logger().info("run_started", rows=3, replicas=1, run_id=run_id)
    if os.environ.get("REFUSE"):
        raise UserError("another driver holds this run")
    manifest = types.SimpleNamespace(status="succeeded_with_errors", rows=types.SimpleNamespace(ok=2, error=1),
                                     wall_seconds=4.5, cost=types.SimpleNamespace(usd=0.01))
    return types.SimpleNamespace(status="succeeded_with_errors", manifest=manifest)

local_run.run_job = stand_in
configure_logging(sys.argv[1])
spec = validate_spec({"name": "demo", "model": {"source": "smollm2-135m-instruct"},
                      "input": {"path": "/data/in.jsonl"}, "output": {"path": "/data/out"}})
try:
    local_run.run_here(spec, "demo-1", local_run.Display(log_format=sys.argv[1]))
except UserError as exc:
    print(f"refused: {exc}", file=sys.stderr)
print("after the run")
"""


def run(tmp_path: Path, fmt: str = "console", **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, fmt], capture_output=True, text=True, check=True,
                          env={"LLMBATCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **env})


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_library_output_goes_to_the_log_and_llmbatch_lines_to_both(tmp_path: Path, fmt: str):
    proc = run(tmp_path, fmt)
    log = (tmp_path / "runs" / "demo-1" / "llmbatch.log").read_text()
    assert "native noise" in log and "python noise" in log and "run_started" in log
    assert "noise" not in proc.stdout + proc.stderr
    assert "run_started" in proc.stderr and "worker_logs" in proc.stderr
    assert str(tmp_path / "runs" / "demo-1" / "llmbatch.log") in proc.stderr
    assert proc.stdout == "after the run\n"
    if fmt == "json":
        assert all(json.loads(line) for line in proc.stderr.splitlines())


def test_the_run_joins_the_history(tmp_path: Path, monkeypatch):
    run(tmp_path)
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path))
    (record,) = run_index.list_runs()
    assert record["run_id"] == "demo-1" and record["status"] == "succeeded_with_errors"
    assert (record["rows_ok"], record["rows_error"], record["wall_seconds"]) == (2, 1, 4.5)
    assert record["run_uri"] == "/data/out/demo-1" and record["log_path"].endswith("demo-1/llmbatch.log")


def test_a_refused_resubmission_keeps_the_earlier_record(tmp_path: Path, monkeypatch):
    run(tmp_path)
    proc = run(tmp_path, REFUSE="1")
    assert "refused: another driver holds this run" in proc.stderr
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path))
    (record,) = run_index.list_runs()
    assert record["status"] == "succeeded_with_errors"
    (tmp_path / "runs" / "demo-1" / "run.json").unlink()
    run(tmp_path, REFUSE="1")
    assert run_index.list_runs()[0]["status"] == "refused"
