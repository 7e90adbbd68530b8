"""The live view follows a run's events and progress snapshots; library output goes to the run's log file."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

from llmbatch.jobs.run_view import RunView, eta_seconds, rows_done


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
    view.progress(snapshot(replicas=[replica(), replica(ready=False)]), 100)
    assert view.state.phase == "starting engines (1/2 ready)"
    view.progress(snapshot(replicas=[replica(rows=32, tokens=640, first_batch_at=time.time() - 4)]), 100)
    assert view.state.phase == "generating"
    text = screen(view)
    assert "32/100 rows" in text and "generating" in text and "output tok/s" in text and "left" in text
    assert "http://127.0.0.1:8265" in text and "/tmp/runs/job-1/llmbatch.log" in text
    assert "on node n0d3aaaa: generating, 32 rows" in text
    view.progress(snapshot(rows_written=0, replicas=[replica(rows=100, first_batch_at=time.time() - 5)]), 100)
    assert view.state.phase == "writing"
    observe("judge_pass_started", scorer="helpful", replicas=1)
    assert view.state.phase == "judging (helpful)" and view.state.snapshot == {}
    observe("committing")
    observe("run_finished", status="succeeded")
    assert view.state.phase == "finished: succeeded"


def test_rows_finished_by_the_engines_count_before_they_are_written():
    """An engine's rows reach the writer a read task at a time: the view counts the engines' batches too."""
    assert rows_done(snapshot(rows_written=0, replicas=[replica(rows=64), replica(rows=32)])) == 96
    assert rows_done(snapshot(rows_written=120, replicas=[replica(rows=64)])) == 120


def test_time_left_comes_from_the_measured_rate():
    view = RunView(FakeTerminal(), "r", "j", "log")
    view.state.rows_total = 1000
    view.state.rate_since = (100.0, 0)
    assert eta_seconds(view.state, 100, 110.0) == 90.0   # 10 rows/s, 900 rows left
    assert eta_seconds(view.state, 0, 110.0) is None


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
