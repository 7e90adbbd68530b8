"""Never lose or redo work: a driver killed mid-run is continued by submitting its run id again; rows it
wrote are kept and not computed again, no row is lost or written twice; a live run is not touched by a second
driver; a committed run is replaced only with --overwrite. (`--resume` itself runs in test_cluster_jobs.)"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq

from support import CLI, REPO, kill_session, read_output, run_cli, write_job

ROWS = 40


def _parts(run: Path) -> list[Path]:
    return [p for p in run.glob("part-g*.parquet")]


def _lock_records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "_lock").glob("g*.json"))]


def _rows_written(run: Path) -> int:
    total = 0
    for part in _parts(run):
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:
            pass  # being written
    return total


def test_driver_killed_mid_run_then_resume_keeps_finished_rows(tmp_path: Path, demo_model: str):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i:03d}", "prompt": f"Write a short story about the number {i}."})
                            + "\n" for i in range(ROWS)), encoding="utf-8")
    job = write_job(tmp_path / "job.yaml", name="resumable", model={"source": demo_model},
                    input={"path": str(data), "id_column": "qid"}, sampling={"max_tokens": 48},
                    output={"path": str(tmp_path / "out"), "rows_per_part": 8}, resources={"batch_size": 4})
    run = tmp_path / "out" / "kill-1"

    proc = subprocess.Popen([CLI, "submit", str(job), "--run-id", "kill-1"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (run / "_lock").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        # the run is starting: a second driver for the same run id is refused
        live = run_cli("submit", str(job), "--run-id", "kill-1")
        assert live.returncode == 2 and "run kill-1 is still running" in live.stderr, live.stderr
        while _rows_written(run) < 8 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
        written_at_kill = _rows_written(run)
    finally:
        kill_session(proc)
    assert 8 <= written_at_kill < ROWS
    assert not (run / "_manifest.json").exists()  # a run that died never claims success

    refused = run_cli("submit", str(job), "--resume", "kill-1", "--set", "sampling.max_tokens=32")
    assert refused.returncode == 2 and "the job changed since the earlier attempt (sampling.max_tokens)" \
        in refused.stderr

    # files llmbatch did not write, in the run folder and below it, are neither deleted nor counted
    theirs = [run / "theirs.parquet", run / "sub" / _parts(run)[0].name]
    theirs[1].parent.mkdir()
    for path in theirs:
        path.write_bytes(_parts(run)[0].read_bytes())

    # a plain resubmission of the same run id (what a scheduled rerun does) continues it
    proc = run_cli("--log-format", "json", "submit", str(job), "--run-id", "kill-1", check=True)
    rows, manifest = read_output(str(run))
    assert all(path.exists() for path in theirs)
    assert all(name.startswith("part-g") and "/" not in name for name in manifest["output"]["files"])
    assert len(rows) == ROWS and sorted(r.id for r in rows) == [f"q{i:03d}" for i in range(ROWS)]
    assert all(r.error is None and r.generated_text for r in rows)
    assert manifest["status"] == "succeeded" and manifest["rows"]["out"] == ROWS
    resumed = manifest["resumed"]
    assert resumed["rows_skipped"] >= written_at_kill and resumed["parts_kept"] >= 1 and resumed["automatic"]
    records = _lock_records(run)  # the killed driver's, the refused --resume's, this one's
    assert [r["generation"] for r in records] == [1, 2, 3] and not records[0]["released"] and records[-1]["released"]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    started = next(e for e in events if e.get("event") == "run_started")
    assert started["rows"] == ROWS - resumed["rows_skipped"]    # only the rest was computed
    done = [e for e in events if e.get("event") == "progress"]
    assert all(e["rows_done"] <= ROWS - resumed["rows_skipped"] for e in done)

    # every row written but no manifest (a driver lost just before its commit): the rerun only commits
    (run / "_manifest.json").unlink()
    commit = run_cli("--log-format", "json", "submit", str(job), "--run-id", "kill-1", check=True)
    assert '"event": "nothing_left"' in commit.stderr
    rows_again, recommitted = read_output(str(run))
    assert recommitted["resumed"]["rows_skipped"] == ROWS and recommitted["rows"]["out"] == ROWS
    assert recommitted["replicas"] == []  # no engine was started for it
    assert sorted((r.id, r.generated_text) for r in rows_again) == sorted((r.id, r.generated_text) for r in rows)

    again = run_cli("submit", str(job), "--run-id", "kill-1")
    assert again.returncode == 2 and "already holds a committed run" in again.stderr and "--overwrite" in again.stderr
    nothing = run_cli("submit", str(job), "--resume", "kill-1")
    assert nothing.returncode == 2 and "already committed, so there is nothing to resume" in nothing.stderr
    missing = run_cli("submit", str(job), "--resume", "never-ran")
    assert missing.returncode == 2 and "no earlier attempt at" in missing.stderr
