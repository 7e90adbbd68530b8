"""A run's lease tells a live run from one whose driver died; a plain rerun of a crashed run id resumes it."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import structlog

from llmbatch.errors import UserError
from llmbatch.jobs.run import resumes_automatically
from llmbatch.pipelines import lease as leases
from llmbatch.pipelines.lease import LEASE_NAME, RunLease, check_not_running, live_holder
from llmbatch.pipelines.resume import write_attempt


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lease_is_live_while_renewed_unless_its_local_process_is_gone():
    now = time.time()
    here = socket.gethostname()
    assert live_holder(None) is None
    assert live_holder({"host": "other-node", "pid": 1, "renewed_at": now - 5}, now)["age_seconds"] == 5
    assert live_holder({"host": "other-node", "pid": 1, "renewed_at": now - leases.EXPIRY_SECONDS - 1}, now) is None
    import os

    assert live_holder({"host": here, "pid": os.getpid(), "renewed_at": now}, now) is not None
    assert live_holder({"host": here, "pid": _dead_pid(), "renewed_at": now}, now) is None


def test_a_live_lease_refuses_a_second_driver_and_names_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LEASE_NAME).write_text(json.dumps({"host": "node-7", "pid": 4242, "renewed_at": time.time()}))
    with pytest.raises(UserError) as refused:
        check_not_running(str(run), "nightly-1")
    message = str(refused.value)
    assert "run nightly-1 is still running" in message and "pid 4242 on node-7" in message
    assert "cancel" in message and "--run-id" in message
    (run / LEASE_NAME).write_text(json.dumps({"host": "node-7", "pid": 4242, "renewed_at": time.time() - 3600}))
    check_not_running(str(run), "nightly-1")
    check_not_running(str(tmp_path / "never-ran"), "x")


def test_a_lease_is_renewed_while_held_and_removed_on_release(tmp_path, monkeypatch):
    monkeypatch.setattr(leases, "RENEW_EVERY_SECONDS", 0.05)
    run = tmp_path / "run"
    held = RunLease.acquire(str(run))
    first = json.loads((run / LEASE_NAME).read_text())
    assert first["pid"] > 0 and first["host"] == socket.gethostname()
    time.sleep(0.3)
    assert json.loads((run / LEASE_NAME).read_text())["renewed_at"] > first["renewed_at"]
    with pytest.raises(UserError):
        check_not_running(str(run), "r")
    held.release()
    assert not (run / LEASE_NAME).exists()


def test_release_leaves_a_lease_another_driver_took_over(tmp_path):
    run = tmp_path / "run"
    held = RunLease.acquire(str(run))
    held._stop.set()
    (run / LEASE_NAME).write_text(json.dumps({"host": "h", "pid": 1, "renewed_at": time.time(), "token": "other"}))
    held.release()
    assert json.loads((run / LEASE_NAME).read_text())["token"] == "other"


def _attempt(path="a.jsonl", size=10, tokens=8, replicas=1):
    return {"spec": {"name": "j", "sampling": {"max_tokens": tokens}, "resources": {"replicas": replicas}},
            "input_files": [[path, size]]}


def test_a_plain_rerun_continues_an_uncommitted_attempt_of_the_same_job(tmp_path):
    run = str(tmp_path / "run")
    log = structlog.get_logger()
    assert resumes_automatically(run, _attempt(), log) is False
    write_attempt(run, _attempt())
    assert resumes_automatically(run, _attempt(), log) is True
    assert resumes_automatically(run, _attempt(replicas=4), log) is True


@pytest.mark.parametrize("changed", [dict(tokens=16), dict(size=11), dict(path="b.jsonl")])
def test_a_plain_rerun_of_a_changed_job_starts_over_and_says_why(tmp_path, changed):
    run = str(tmp_path / "run")
    write_attempt(run, _attempt())
    with structlog.testing.capture_logs() as logs:
        assert resumes_automatically(run, _attempt(**changed), structlog.get_logger()) is False
    assert logs[0]["event"] == "earlier_attempt_restarted"
    assert logs[0]["changed"] == (["sampling.max_tokens"] if "tokens" in changed else ["input files"])
