"""A run's lease tells a live run from one whose driver died; a plain rerun of a crashed run id resumes it."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from llmbatch.errors import UserError
from llmbatch.pipelines import lease as leases
from llmbatch.pipelines.lease import RunLease, check_not_running, live_holder
from llmbatch.pipelines.run_files import LEASE_NAME


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
