"""The local run index (jobs/run_index.py) and `llmbatch runs`: records, listing, `latest`, refs (no Ray)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmbatch.errors import UserError
from llmbatch.jobs import run_index
from llmbatch.jobs.cli import main
from llmbatch.jobs.run_index import (ENDED_WITHOUT_RECORD, RECORD_NAME, cluster_run, list_runs, locate,
                                     record_finished, record_started, render_runs, run_dir)


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def started(run_id: str, job: str = "quickstart", run_uri: str | None = None, at: str | None = None) -> None:
    record_started(run_id, job=job, model="smollm2-135m-instruct", run_uri=run_uri or f"out/{job}/{run_id}",
                   log_path=f"logs/{run_id}.log")
    if at is not None:  # a start time of our choosing, to order runs without waiting
        record = json.loads((run_dir(run_id) / RECORD_NAME).read_text())
        (run_dir(run_id) / RECORD_NAME).write_text(json.dumps({**record, "started_at": at}))


def test_a_started_run_is_running_with_absolute_paths(home: Path, tmp_path: Path):
    started("r1")
    assert run_dir("r1") == home / "runs" / "r1"
    [run] = list_runs()
    assert run["run_id"] == "r1" and run["status"] == "running" and run["pid"] == os.getpid()
    assert run["run_uri"] == str(tmp_path / "out" / "quickstart" / "r1")
    assert run["log_path"] == str(tmp_path / "logs" / "r1.log")
    assert run["started_at"].endswith("+00:00")


def test_a_finished_run_keeps_its_start_and_adds_the_outcome(home: Path):
    started("r1")
    record_finished("r1", status="succeeded_with_errors", rows_ok=11, rows_error=1, wall_seconds=38.3,
                    cost_usd=0.0024)
    [run] = list_runs()
    assert run["status"] == "succeeded_with_errors" and (run["rows_ok"], run["rows_error"]) == (11, 1)
    assert run["wall_seconds"] == 38.3 and run["cost_usd"] == 0.0024 and run["job"] == "quickstart"
    assert run["finished_at"] >= run["started_at"]


def test_a_finish_without_a_start_is_still_recorded(home: Path):
    record_finished("r9", status="refused", rows_ok=None, rows_error=None, wall_seconds=None, cost_usd=None)
    assert [(r["run_id"], r["status"]) for r in list_runs()] == [("r9", "refused")]


def test_runs_are_listed_newest_first_and_by_job(home: Path):
    started("old", at="2026-12-01T10:00:00+00:00")
    started("new", at="2026-12-03T10:00:00+00:00")
    started("other", job="scored", at="2026-12-02T10:00:00+00:00")
    assert [r["run_id"] for r in list_runs()] == ["new", "other", "old"]
    assert [r["run_id"] for r in list_runs("quickstart")] == ["new", "old"]
    assert list_runs("nothing") == []


def test_an_empty_or_damaged_index_lists_what_it_can(home: Path):
    assert list_runs() == []
    started("good")
    (home / "runs" / "half").mkdir()
    (home / "runs" / "half" / RECORD_NAME).write_text('{"run_id": "ha')
    (home / "runs" / "moved").mkdir()
    (home / "runs" / "moved" / RECORD_NAME).write_text(json.dumps({"run_id": "elsewhere"}))
    (home / "runs" / "stray-file").write_text("x")
    assert [r["run_id"] for r in list_runs()] == ["good"]


def test_a_running_record_whose_process_is_gone_says_so(home: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    started("r1")
    record = json.loads((run_dir("r1") / RECORD_NAME).read_text())
    (run_dir("r1") / RECORD_NAME).write_text(json.dumps({**record, "pid": dead.pid}))
    assert list_runs()[0]["status"] == ENDED_WITHOUT_RECORD


def test_a_reused_pid_is_not_taken_for_the_run(home: Path):
    started("r1")
    record = json.loads((run_dir("r1") / RECORD_NAME).read_text())
    if record["process_started"] is None:
        pytest.skip("no /proc here")
    (run_dir("r1") / RECORD_NAME).write_text(json.dumps({**record, "process_started": record["process_started"] - 1}))
    assert list_runs()[0]["status"] == ENDED_WITHOUT_RECORD


def test_a_record_from_another_host_is_taken_at_its_word(home: Path):
    started("r1")
    record = json.loads((run_dir("r1") / RECORD_NAME).read_text())
    (run_dir("r1") / RECORD_NAME).write_text(json.dumps({**record, "host": "elsewhere", "pid": 2**22 + 1}))
    assert list_runs()[0]["status"] == "running"


@pytest.mark.parametrize("run_id", ["../x", "..", "a/b", "a\\b", "", ".", "a..b", "x\0"])
def test_a_run_id_cannot_leave_the_index(home: Path, run_id: str):
    with pytest.raises(OSError, match="would leave the run index"):
        run_dir(run_id)
    with pytest.raises(OSError):
        started(run_id)
    assert not (home / "x").exists() and not (home.parent / "x").exists()


def test_index_writes_fail_only_with_os_errors(home: Path):
    home.mkdir()
    (home / "runs").write_text("a file where the index folder should be")
    with pytest.raises(OSError):
        started("r1")
    with pytest.raises(OSError):
        record_finished("r1", status="failed", rows_ok=0, rows_error=3, wall_seconds=1.0, cost_usd=None)


def test_locate_latest_an_id_or_a_path(home: Path, tmp_path: Path):
    started("old", at="2026-12-01T10:00:00+00:00")
    started("new", at="2026-12-03T10:00:00+00:00")
    assert locate("latest") == str(tmp_path / "out" / "quickstart" / "new")
    assert locate("old") == str(tmp_path / "out" / "quickstart" / "old")
    (tmp_path / "out" / "q" / "r7").mkdir(parents=True)
    assert locate("out/q/r7/") == str(tmp_path / "out" / "q" / "r7")
    assert locate(str(tmp_path / "out" / "q" / "r7")) == str(tmp_path / "out" / "q" / "r7")
    assert locate("s3://bucket/out/r1/") == "s3://bucket/out/r1"


def test_latest_is_the_newest_run_committed_or_not(home: Path):
    started("done", at="2026-12-01T10:00:00+00:00")
    record_finished("done", status="succeeded", rows_ok=1, rows_error=0, wall_seconds=1.0, cost_usd=None)
    started("crashed", at="2026-12-02T10:00:00+00:00")
    record_finished("crashed", status="crashed", rows_ok=None, rows_error=None, wall_seconds=None, cost_usd=None)
    assert locate("latest").endswith("/crashed")


def test_an_unknown_ref_says_where_it_looked(home: Path, tmp_path: Path):
    with pytest.raises(UserError) as err:
        locate("nope")
    text = str(err.value)
    assert str(home / "runs") in text and str(tmp_path / "nope") in text and "llmbatch runs" in text
    with pytest.raises(UserError, match=f"no folder {tmp_path}/out/missing;.*llmbatch runs"):
        locate("out/missing")
    with pytest.raises(UserError, match="latest: no run is recorded in the run index"):
        locate("latest")
    with pytest.raises(UserError, match="no run with that id"):
        locate("a..b")


def test_cluster_runs_take_the_index_shape():
    run = {"run_id": "c1", "status": "SUCCEEDED", "job": "quickstart", "model": "m", "started": "x",
           "start_ms": 1796223238000, "attempts": 2, "rows_ok": 12, "rows_error": 0, "run_status": "succeeded",
           "wall_seconds": 61.5, "cost_usd": 0.02, "output": "s3://bucket/out/c1"}
    shaped = cluster_run(run, "http://head:8265")
    assert shaped["status"] == "succeeded" and shaped["where"] == "http://head:8265"
    assert (shaped["wall_seconds"], shaped["cost_usd"], shaped["run_uri"]) == (61.5, 0.02, "s3://bucket/out/c1")
    assert shaped["started_at"].startswith("2026-12-02T") and shaped["rows_ok"] == 12
    assert cluster_run({"run_id": "c2", "status": "RUNNING", "start_ms": 0}, "h")["status"] == "running"


def test_the_table_shows_one_line_per_run_without_escapes(home: Path):
    started("r1", at="2026-12-03T10:00:00+00:00")
    record_finished("r1", status="succeeded", rows_ok=12, rows_error=0, wall_seconds=3725.0, cost_usd=0.5)
    record = json.loads((run_dir("r1") / RECORD_NAME).read_text())
    (run_dir("r1") / RECORD_NAME).write_text(json.dumps({**record, "job": "evil\x1b[2J\nname"}))
    table = render_runs(list_runs())
    lines = table.splitlines()
    assert len(lines) == 2 and "\x1b" not in table and "evil name" in lines[1]
    assert "12/0" in lines[1] and "1h02m" in lines[1] and "$0.5000" in lines[1]
    assert "2026-12-03 10:00:00" in lines[1] and lines[1].endswith("/out/quickstart/r1")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_runs_json_lists_the_index(home: Path):
    started("r1", at="2026-12-01T10:00:00+00:00")
    started("r2", job="scored", at="2026-12-02T10:00:00+00:00")
    record_finished("r2", status="succeeded", rows_ok=3, rows_error=0, wall_seconds=2.0, cost_usd=None)
    result = invoke("runs", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert [(r["run_id"], r["where"]) for r in shown] == [("r2", "local"), ("r1", "local")]
    assert shown[0]["status"] == "succeeded" and shown[0]["rows_ok"] == 3
    assert [r["run_id"] for r in json.loads(invoke("runs", "--json", "--job", "quickstart").stdout)] == ["r1"]
    assert [r["run_id"] for r in json.loads(invoke("runs", "--json", "--limit", "1").stdout)] == ["r2"]


def test_runs_table_and_an_empty_index(home: Path):
    result = invoke("runs")
    assert result.exit_code == 0 and f"no runs in {home / 'runs'}" in result.output
    for number in range(3):
        started(f"r{number}", at=f"2026-12-0{number + 1}T10:00:00+00:00")
    result = invoke("runs", "--limit", "2")
    lines = result.output.splitlines()
    assert lines[0].startswith("RUN_ID") and "WHERE" not in lines[0]
    assert [line.split()[0] for line in lines[1:3]] == ["r2", "r1"]
    assert "1 older run not shown" in lines[3]


def test_runs_adds_the_clusters_runs_marked_by_where_they_ran(home: Path, monkeypatch):
    from llmbatch.jobs import remote

    started("local-1", at="2026-12-01T10:00:00+00:00")
    asked = []

    def cluster_runs(address):
        asked.append(address)
        return [{"run_id": "remote-1", "status": "RUNNING", "job": "quickstart", "model": "m",
                 "started": None, "start_ms": 1796223238000, "attempts": 1}]

    monkeypatch.setattr(remote, "list_runs", cluster_runs)
    shown = json.loads(invoke("runs", "--json", "--address", "http://head:8265").stdout)
    assert [(r["run_id"], r["where"], r["status"]) for r in shown] == [
        ("remote-1", "http://head:8265", "running"), ("local-1", "local", "running")]
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    table = invoke("runs").output
    assert "WHERE" in table.splitlines()[0] and "http://head:8265" in table
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a Ray node's own address asks no cluster
    assert [r["run_id"] for r in json.loads(invoke("runs", "--json").stdout)] == ["local-1"]
    assert asked == ["http://head:8265", "http://head:8265"]


def test_an_unreachable_cluster_from_ray_address_only_warns(home: Path, monkeypatch):
    from llmbatch.jobs import remote

    def unreachable(address):
        raise UserError(f"cannot reach the Ray Jobs API at {address}")

    started("local-1")
    monkeypatch.setattr(remote, "list_runs", unreachable)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 0 and "local-1" in result.stdout
    assert "cluster_runs_not_listed" in result.stderr and "cannot reach" in result.stderr
    result = CliRunner().invoke(main, ["runs", "--address", "http://head:8265"])
    assert result.exit_code == 2 and "error: cannot reach the Ray Jobs API" in result.output


def test_the_index_lives_under_the_llmbatch_home(home: Path):
    assert run_index.runs_root() == home / "runs"


def test_results_of_a_run_that_has_not_committed_says_why(home: Path, tmp_path: Path):
    started("r1")
    (tmp_path / "out" / "quickstart" / "r1").mkdir(parents=True)   # its folder exists; no manifest yet
    result = CliRunner().invoke(main, ["results", "latest"])
    assert result.exit_code == 2
    assert "run r1 is still running (started " in result.stderr and "logs/r1.log" in result.stderr
    record_finished("r1", status="interrupted", rows_ok=None, rows_error=None, wall_seconds=None, cost_usd=None)
    result = CliRunner().invoke(main, ["results", "r1"])
    assert result.exit_code == 2
    assert "run r1 interrupted before it committed" in result.stderr and "--resume r1" in result.stderr
