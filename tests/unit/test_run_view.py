"""The live view follows a run's events and progress snapshots; library output goes to the run's log file."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from llmbatch.jobs.run_view import RunView, eta_seconds
from llmbatch.pipelines.progress_report import PassProgress, summarize


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def snapshot(rows_written=0, replicas=(), errors=0):
    return {"rows": rows_written, "errors": errors, "generated_tokens": 0, "first_row_at": None,
            "replicas": list(replicas)}


def replica(rows=0, tokens=0, ready=True, first_batch_at=None):
    return {"replica": "a1b2c3d4e5", "node_id": "n0d3aaaaaaaa", "rows": rows, "generated_tokens": tokens,
            "engine_ready_at": time.time() if ready else None, "first_batch_at": first_batch_at,
            "output_tokens_per_second": 12.5 if rows else None}


def screen(view: RunView) -> str:
    view.console.print(view.render())
    return view.console.file.getvalue()


def test_the_view_moves_through_the_phases_from_events_and_snapshots():
    view = RunView(FakeTerminal(), "job-1", "job", "/tmp/runs/job-1/llmbatch.log")
    observe = lambda event, **fields: view.observe(None, "info", {"event": event, **fields})  # noqa: E731
    assert view.state.phase == "resolving the job"
    observe("ray_starting")
    assert view.state.phase == "starting Ray"
    observe("ray_started", dashboard="http://127.0.0.1:8265")
    assert view.state.phase.startswith("pre-pass")
    observe("run_started", rows=100, replicas=2, model="demo", accelerator="cpu")
    assert view.state.phase == "starting engines"
    view.show(summarize(snapshot(replicas=[replica(), replica(ready=False)]), 100, time.time()))
    assert view.state.phase == "starting engines (1/2 ready)"
    view.show(summarize(snapshot(replicas=[replica(rows=32, tokens=640, first_batch_at=time.time() - 4)]), 100,
                        time.time()))
    assert view.state.phase == "generating"
    text = screen(view)
    assert "32/100 rows" in text and "generating" in text and "output tok/s" in text and "left" in text
    assert "http://127.0.0.1:8265" in text and "/tmp/runs/job-1/llmbatch.log" in text
    assert "on node n0d3aaaa: generating, 32 rows" in text
    view.show(summarize(snapshot(rows_written=0, replicas=[replica(rows=100, first_batch_at=time.time() - 5)]), 100,
                        time.time()))
    assert view.state.phase == "writing"
    observe("judge_pass_started", scorer="helpful", replicas=1)
    assert view.state.phase == "judging (helpful)" and view.state.progress is None
    observe("committing")
    observe("run_finished", status="succeeded")
    assert view.state.phase == "finished: succeeded"


def test_rows_finished_by_the_engines_count_before_they_are_written():
    """An engine's rows reach the writer a read task at a time: the summary counts the engines' batches too."""
    now = time.time()
    assert summarize(snapshot(rows_written=0, replicas=[replica(rows=64), replica(rows=32)]), 100, now).rows_done == 96
    assert summarize(snapshot(rows_written=120, replicas=[replica(rows=64)]), 200, now).rows_done == 120


def test_time_left_comes_from_the_measured_rate_and_counts_down():
    view = RunView(FakeTerminal(), "r", "j", "log")
    view.show(PassProgress(rows_total=1000, rows_done=100, generating_s=10.0))   # 10 rows/s, 900 rows left
    arrived = view.state.progress_at
    assert eta_seconds(view.state, arrived) == 90.0
    assert eta_seconds(view.state, arrived + 30) == 60.0
    view.show(PassProgress(rows_total=1000, rows_done=0, generating_s=None))
    assert eta_seconds(view.state, time.time()) is None
    view.show(PassProgress(rows_total=1000, rows_done=1000, generating_s=100.0))   # none left: no time shown
    assert eta_seconds(view.state, time.time()) is None


def test_a_progress_line_carries_what_the_view_shows():
    """A cluster run's submitter builds its view from the driver's `progress` lines: the line's fields give
    back the same summary (replica states included when asked for)."""
    entries = [replica(rows=30, tokens=300, first_batch_at=time.time() - 10), replica(ready=True),
               replica(ready=False)]
    progress = summarize(snapshot(rows_written=12, errors=1, replicas=entries), 100, time.time())
    assert [r.state for r in progress.replicas] == ["generating", "ready", "starting"]
    read_back = PassProgress.from_event({"event": "progress", **progress.log_fields(replicas_shown=2)})
    assert read_back == PassProgress(**{**progress.__dict__, "replicas": progress.replicas[:2]})
    assert "replicas" not in progress.log_fields()
    assert PassProgress.from_event({"event": "progress", "rows_total": "x", "replicas": [None, {}]}).rows_total == 0


def test_the_view_shows_the_first_replicas_and_counts_the_others():
    view = RunView(FakeTerminal(), "r", "j", "log", dashboard="http://head:8265/#/jobs/r",
                   phase="waiting for the cluster to start the run")
    assert view.state.phase == "waiting for the cluster to start the run"
    entries = [dict(replica(rows=i), replica=f"r{i:02d}-abcdef") for i in range(10)]
    view.show(summarize(snapshot(replicas=entries), 100, time.time()))
    text = screen(view)
    assert "r07-abcd" in text and "r08-abcd" not in text and "and 2 more replica(s)" in text
    assert "http://head:8265/#/jobs/r" in text
    view.ended("ended: FAILED")
    assert view.state.phase == "ended: FAILED"


def test_warnings_show_above_the_view_and_the_event_goes_on():
    terminal = FakeTerminal()
    view = RunView(terminal, "r", "j", "log")
    event = {"event": "cache_not_used", "reason": "sampling is not repeatable", "run_id": "r"}
    assert view.observe(None, "warning", dict(event)) == event
    assert "warning: cache_not_used" in terminal.getvalue() and "sampling is not repeatable" in terminal.getvalue()


def test_native_and_python_output_go_to_the_log_file_and_the_terminal_keeps_its_own(tmp_path: Path):
    """Ray's core worker writes to descriptor 2 from C++: the redirect is of the descriptors themselves."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from llmbatch.jobs.worker_output import worker_output_to\n"
        f"with worker_output_to(Path({str(tmp_path / 'run.log')!r})) as t:\n"
        "    os.write(2, b'native noise\\n')\n"
        "    print('python noise')\n"
        "    sys.stderr.write('warning noise\\n')\n"
        "    t.err.write('ours on stderr\\n'); t.out.write('ours on stdout\\n')\n"
        "print('after')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    log = (tmp_path / "run.log").read_text()
    assert "native noise" in log and "python noise" in log and "warning noise" in log
    assert "noise" not in proc.stdout + proc.stderr
    assert proc.stdout == "ours on stdout\nafter\n" and proc.stderr == "ours on stderr\n"
    assert oct(os.stat(tmp_path / "run.log").st_mode & 0o777) == "0o600"
