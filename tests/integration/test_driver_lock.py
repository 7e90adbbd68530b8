"""One driver per run, with real drivers: on S3 a second driver is refused while the first starts and while it
runs, and storage failures mid-run (revoked credentials, a 503 storm during the resume, a read-only result cache)
lose nothing; a driver
paused past its lock and superseded writes nothing when it continues. (The lock's own cases
are in tests/unit/test_run_lock.py; a killed local driver and its resume are in test_resume.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flaky_s3 import FlakyS3Proxy
from support import CLI, REPO, kill_session, read_output, run_cli, write_job

ROWS = 24


def _prompts(tmp_path: Path) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i:02d}", "prompt": f"Count from {i} to {i + 5}."}) + "\n"
                            for i in range(ROWS)), encoding="utf-8")
    return data


def _start(job: Path, run_id: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A driver in the background, its log in a file (a pipe nobody reads would stall it)."""
    with open(log, "w") as sink:
        return subprocess.Popen([CLI, "submit", str(job), "--run-id", run_id], cwd=REPO,
                                env={**os.environ, **(env or {})}, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=sink)


@contextmanager
def _held_still(proc: subprocess.Popen) -> Iterator[None]:
    """The driver process paused for a moment, well within its lock's expiry (its Ray workers keep going)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the first driver ended before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _parts(s3, run: str) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p in s3.ls(run) if p.rsplit("/", 1)[-1].startswith("part-g")}


def test_a_second_driver_on_an_s3_run_is_refused_and_storage_failures_lose_nothing(tmp_path: Path, s3,
                                                                                   s3_server: str, demo_model: str):
    """On S3, through a proxy that can fail on cue: a second driver is refused while the first starts and while
    it runs; then the first driver's credentials are revoked mid-run, and a resubmission meets a 503 storm on
    the parts. Neither commits or deletes a complete part; once access returns, the run finishes with every row
    exactly once. Its result cache is read-only throughout: the run says so and commits without adding to it."""
    s3.mkdir("results")
    job = write_job(tmp_path / "job.yaml", name="locked", model={"source": demo_model},
                    input={"path": str(_prompts(tmp_path)), "id_column": "qid"}, sampling={"max_tokens": 24},
                    output={"path": "s3://results/nightly", "rows_per_part": 4}, resources={"batch_size": 4},
                    cache={"path": "s3://results/cache"})
    run = "results/nightly/s3-lock"
    log = tmp_path / "first.log"
    with FlakyS3Proxy(s3_server) as proxy:
        proxy.read_only = "/results/cache/"
        through_proxy = {"AWS_ENDPOINT_URL_S3": proxy.url}
        first = _start(job, "s3-lock", log, through_proxy)
        try:
            _wait_for(lambda: s3.exists(f"{run}/_lock/g000001.json"), first, log, "it took the lock")
            with _held_still(first):  # so that it is surely still starting while the second driver tries
                starting = run_cli("submit", str(job), "--run-id", "s3-lock")
            assert starting.returncode == 2 and "run s3-lock is still running" in starting.stderr, starting.stderr
            _wait_for(lambda: any(p.startswith("part-g000001-") for p in _parts(s3, run)), first, log,
                      "it wrote a part")
            with _held_still(first):  # its engine goes on writing rows; the driver cannot commit meanwhile
                running = run_cli("submit", str(job), "--run-id", "s3-lock", "--overwrite")
            assert running.returncode == 2 and "run s3-lock is still running" in running.stderr, running.stderr
            proxy.outage = 403  # its credentials revoked mid-run
            assert first.wait(timeout=600) != 0
        finally:
            kill_session(first)
        revoked = log.read_text()
        assert "Traceback" not in revoked and "results" in revoked, revoked[-4000:]
        written = _parts(s3, run)
        assert written and not s3.exists(f"{run}/_manifest.json")

        proxy.outage, proxy.outage_match = 503, "/part-g"  # the resume lists the run, then its parts fail to read
        storm = run_cli("submit", str(job), "--run-id", "s3-lock", env=through_proxy)
        assert storm.returncode != 0 and "Traceback" not in storm.stderr, storm.stderr[-4000:]
        assert not s3.exists(f"{run}/_manifest.json") and _parts(s3, run) >= written

        proxy.outage = proxy.outage_match = None
        done = run_cli("submit", str(job), "--run-id", "s3-lock", env=through_proxy, check=True)
    rows, manifest = read_output(f"s3://{run}", s3)
    assert sorted(r.id for r in rows) == [f"q{i:02d}" for i in range(ROWS)] and manifest["status"] == "succeeded"
    assert "cache_read_only" in done.stderr and "cache_write_failed" in done.stderr, done.stderr[-4000:]
    assert "access denied to bucket 'results'" in manifest["cache"]["write_error"]
    s3.invalidate_cache()
    assert manifest["cache"]["entries_written"] == 0 and not s3.find("results/cache")
    assert manifest["resumed"]["rows_skipped"] >= 4 and manifest["resumed"]["parts_removed"] == []
    records = [json.loads(s3.cat_file(p)) for p in sorted(s3.ls(f"{run}/_lock"))]
    assert [r["generation"] for r in records] == [1, 2, 3] and records[-1]["released"]


def test_a_driver_paused_past_its_lock_and_superseded_writes_nothing_when_it_continues(tmp_path: Path,
                                                                                      demo_model: str):
    fast_expiry = {"LLMBATCH_LOCK_EXPIRY_SECONDS": "6"}
    job = write_job(tmp_path / "job.yaml", name="paused", model={"source": demo_model},
                    input={"path": str(_prompts(tmp_path)), "id_column": "qid"}, sampling={"max_tokens": 16},
                    output={"path": str(tmp_path / "out"), "rows_per_part": 8}, resources={"batch_size": 8})
    run = tmp_path / "out" / "paused-1"
    record = run / "_lock" / "g000001.json"
    log = tmp_path / "paused.log"
    paused = _start(job, "paused-1", log, fast_expiry)
    try:
        _wait_for(record.exists, paused, log, "it took the lock")
        os.kill(paused.pid, signal.SIGSTOP)
        stopped_at = time.time()
        refused = run_cli("submit", str(job), "--run-id", "paused-1", env=fast_expiry)
        assert refused.returncode == 2 and "run paused-1 is still running" in refused.stderr, refused.stderr
        while time.time() - record.stat().st_mtime <= 7:  # its renewals stopped: the lock goes stale
            assert time.time() - stopped_at < 120, "the paused driver's lock record kept changing"
            time.sleep(0.2)
        run_cli("submit", str(job), "--run-id", "paused-1", env=fast_expiry, check=True)
        rows, manifest = read_output(str(run))
        os.kill(paused.pid, signal.SIGCONT)
        assert paused.wait(timeout=300) == 1
        message = log.read_text()
    finally:
        if paused.poll() is None:
            os.killpg(paused.pid, signal.SIGKILL)
    assert "another driver took the run (lock generation 2 after this one's 1)" in message, message[-3000:]
    assert sorted(r.id for r in rows) == [f"q{i:02d}" for i in range(ROWS)]
    assert read_output(str(run)) == (rows, manifest)   # the continued driver changed nothing
    assert not list(run.glob("part-g000001-*")) and all(n.startswith("part-g000002-")
                                                         for n in manifest["output"]["files"])
    records = [json.loads(p.read_text()) for p in sorted((run / "_lock").glob("g*.json"))]
    assert [(r["generation"], r["released"]) for r in records] == [(1, False), (2, True)]
