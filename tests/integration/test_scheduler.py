"""The scheduler on a real local Ray cluster (token auth on): `scheduler deploy` starts the Serve app, a
per-minute schedule fires and runs the demo model through the Jobs API, the app is deleted and deployed again
while that run goes on, and the slot is neither lost nor run twice; the API refuses calls without the token."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from support import CLI, DEMO_MODEL, free_port, run_cli, write_job

RAY = str(Path(CLI).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory, demo_model):
    from llmbatch.cluster.home import llmbatch_home

    root = tmp_path_factory.mktemp("sched")
    token = secrets.token_hex(32)
    env = {**os.environ, "HOME": str(root / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "LLMBATCH_HOME": str(llmbatch_home()), "PATH": f"{Path(CLI).parent}:{os.environ['PATH']}"}
    (root / "home").mkdir()
    gcs, dashboard, serve_port = free_port(), free_port(), free_port()
    subprocess.run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dashboard), "--include-dashboard", "true", "--node-ip-address",
                    "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        yield {"address": address, "serve_port": serve_port, "root": root,
               "env": {"HOME": env["HOME"], "RAY_AUTH_TOKEN": token, "RAY_ADDRESS": address,
                       "LLMBATCH_SCHEDULER_STATE": str(root / "state"),
                       "LLMBATCH_SCHEDULER_URL": f"http://127.0.0.1:{serve_port}/llmbatch-scheduler"}}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _deploy(head) -> subprocess.CompletedProcess:
    return run_cli("scheduler", "deploy", "--http-host", "127.0.0.1", "--http-port", str(head["serve_port"]),
                   "--tick-seconds", "2", env=head["env"], check=True, timeout=600)


def _history(head, name: str) -> list[dict]:
    request = urllib.request.Request(f"{head['env']['LLMBATCH_SCHEDULER_URL']}/schedules/{name}/history",
                                     headers={"Authorization": f"Bearer {_token(head)}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _token(head) -> str:
    return (Path(head["env"]["LLMBATCH_SCHEDULER_STATE"]) / "api-token").read_text().strip()


def _wait(what, check, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_per_minute_schedule_runs_once_per_slot_across_a_restart_of_the_app(head, tmp_path: Path):
    deployed = _deploy(head)
    assert "scheduler deployed" in deployed.stdout and _token(head) not in deployed.stdout + deployed.stderr
    url = head["env"]["LLMBATCH_SCHEDULER_URL"]
    for auth in (None, "Bearer wrong"):
        request = urllib.request.Request(f"{url}/schedules", headers={"Authorization": auth} if auth else {})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401

    today = datetime.now(timezone.utc)
    for day in (today - timedelta(days=1), today, today + timedelta(days=1)):   # ds of any slot the test sees
        folder = tmp_path / "prompts" / day.strftime("%Y-%m-%d")
        folder.mkdir(parents=True)
        (folder / "part-0.jsonl").write_text("".join(json.dumps({"prompt": f"Count from {i} to {i + 3}."}) + "\n"
                                                     for i in range(6)))
    job = write_job(tmp_path / "nightly.yaml", name="minutely", model={
        "source": DEMO_MODEL, "engine": {"dtype": "float32", "enforce_eager": True, "max_model_len": 512}},
        input={"path": str(tmp_path / "prompts" / "{ds}")}, sampling={"max_tokens": 8},
        output={"path": str(tmp_path / "out" / "{ds}")},
        schedule={"cron": "* * * * *", "catchup": "none", "concurrency": "forbid"})
    applied = run_cli("schedule", "apply", str(job), env=head["env"], check=True)
    assert "schedule minutely created" in applied.stdout

    first = _wait("the first slot's run", lambda: [r for r in _history(head, "minutely")
                                                   if r["status"] in ("submitted", "running")], 150)[0]
    run_cli("schedule", "pause", "minutely", env=head["env"], check=True)   # no further run after this one
    status = run_cli("status", first["run_id"], env=head["env"], check=True).stdout
    assert "PENDING" in status or "RUNNING" in status                      # the app goes down mid-run
    run_cli("scheduler", "delete", env=head["env"], check=True, timeout=600)
    _deploy(head)                                                            # the app restarts mid-run

    done = _wait("the slot's outcome", lambda: [r for r in _history(head, "minutely")
                                                if r["slot"] == first["slot"] and r["status"] == "succeeded"], 420)[0]
    assert done["run_id"] == f"minutely-{first['slot']}" and (done["rows_ok"], done["rows_error"]) == (6, 0)
    runs = run_cli("list", env=head["env"], check=True).stdout
    assert runs.count(done["run_id"]) == 1                                # submitted once
    request = urllib.request.Request(f"{head['address']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        ours = [j for j in json.loads(response.read()) if j.get("submission_id") == done["run_id"]]
    assert len(ours) == 1 and ours[0]["metadata"]["slot"] == first["slot"]
    assert ours[0]["metadata"]["schedule"] == "minutely"
    history = run_cli("schedule", "history", "minutely", env=head["env"], check=True).stdout
    assert done["run_id"] in history and "succeeded" in history and "6/0" in history
    slots = [r["slot"] for r in _history(head, "minutely")]
    assert len(slots) == len(set(slots))                                   # one record per slot
    later = [r for r in _history(head, "minutely") if r["slot"] > first["slot"]]
    assert all(r["status"] in ("missed", "skipped") for r in later)       # paused, or forbid while it ran
