"""A cluster run's log read back by its submitter: the driver's JSON events drive the live view or become
console lines; its error report and summary come out as a local run's; Ray's own lines stay in the log."""
from __future__ import annotations

import io
import time

import structlog

from llmbatch.errors import UserError
from llmbatch.jobs.cluster_watch import DriverLines, LineSplitter, console_text, read_event, shown_line
from llmbatch.jobs.error_report import json_line, report_for, report_from_json
from llmbatch.jobs.logs import configure_logging
from llmbatch.jobs.run_view import RunView
from llmbatch.pipelines.progress_report import summarize


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def driver_log() -> str:
    """What a cluster run's driver writes: JSON events (as `--log-format json` renders them), Ray's and vLLM's
    plain lines between them, the summary event, then an error report."""
    out = io.StringIO()
    configure_logging("json", stream=out)
    log = structlog.get_logger().bind(job="cluster-job", run_id="cl-run")
    log.info("ray_starting", cluster=True)
    out.write("(EngineReplica pid=4242, ip=10.0.0.7) INFO vllm engine noise\n")
    log.info("ray_started", cpus=4, gpus=2, dashboard="http://10.0.0.1:8265")
    log.info("run_started", rows=24, replicas=2, model="demo", accelerator="gpu")
    replicas = [{"replica": "aaaaaaaaaa", "node_id": "node-one-xx", "rows": 8, "generated_tokens": 64,
                 "engine_ready_at": time.time() - 5, "first_batch_at": time.time() - 4,
                 "output_tokens_per_second": 16.0},
                {"replica": "bbbbbbbbbb", "node_id": "node-two-xx", "rows": 0, "generated_tokens": 0,
                 "engine_ready_at": time.time(), "first_batch_at": None, "output_tokens_per_second": None}]
    progress = summarize({"rows": 0, "errors": 0, "generated_tokens": 64, "replicas": replicas}, 24, time.time())
    log.info("progress", **progress.log_fields(replicas_shown=8), elapsed_s=30)
    log.warning("cache_not_used", reason="sampling is not repeatable")
    log.info("run_finished", status="succeeded", rows_ok=23, rows_error=1)
    log.info("run_summary", text="run cl-run: succeeded\n  rows: 23 ok, 1 error\n")
    out.write(json_line(report_for(UserError("input.path: not there", lines=["input.path: not there"]))) + "\n")
    return out.getvalue()


def feed(text: str, take, size: int = 7) -> None:
    lines = LineSplitter(take)
    for i in range(0, len(text), size):   # chunks that cut lines anywhere
        lines(text[i:i + size])
    lines.close()


def test_the_drivers_events_drive_the_live_view():
    terminal = FakeTerminal()
    view = RunView(terminal, "cl-run", "cluster-job", "llmbatch logs cl-run --address http://head:8265",
                   dashboard="http://head:8265/#/jobs/cl-run", phase="waiting for the cluster to start the run")
    lines = DriverLines(lambda line: terminal.write(line + "\n"), view=view)
    feed(driver_log(), lines)
    state = view.state
    assert state.phase == "finished: succeeded" and state.model == "demo" and state.replicas_planned == 2
    assert state.dashboard == "http://head:8265/#/jobs/cl-run"        # the driver's own address is not shown
    assert [(r.node, r.state, r.rows) for r in state.progress.replicas] == [("node-one", "generating", 8),
                                                                           ("node-two", "ready", 0)]
    assert (state.progress.rows_done, state.progress.rows_error) == (24, 1)
    view.console.print(view.render())
    shown = terminal.getvalue()
    assert "warning: cache_not_used" in shown and "sampling is not repeatable" in shown
    assert "aaaaaaaa on node node-one: generating, 8 rows, 16.0 tok/s" in shown
    assert "llmbatch logs cl-run --address http://head:8265" in shown
    assert "vllm engine noise" not in shown and "input.path" not in shown and "rows: 23 ok" not in shown
    assert lines.summary == "run cl-run: succeeded\n  rows: 23 ok, 1 error"
    assert lines.error.exit_code == 2 and lines.error.problems == ["input.path: not there"]


def test_without_a_terminal_the_events_become_console_lines():
    printed: list[str] = []
    feed(driver_log(), DriverLines(printed.append))
    text = "\n".join(printed)
    assert "[info     ] run_started" in text and "rows=24" in text
    assert "[warning  ] cache_not_used" in text
    progress = next(line for line in printed if "] progress" in line)
    assert "rows_done=8" in progress and "replicas=" not in progress
    assert "vllm engine noise" not in text and "{" not in text

    with_workers: list[str] = []
    feed(driver_log(), DriverLines(with_workers.append, worker_lines=True))
    assert "(EngineReplica pid=4242, ip=10.0.0.7) INFO vllm engine noise" in with_workers

    as_json: list[str] = []
    feed(driver_log(), DriverLines(as_json.append, log_format="json"))
    assert all(read_event(line) for line in as_json) and read_event(as_json[0])["event"] == "ray_starting"


def test_logs_shows_every_line_and_the_report_as_error_lines():
    shown = [shown_line(line, "console") for line in driver_log().splitlines()]
    assert "error: input.path: not there" in shown
    assert "(EngineReplica pid=4242, ip=10.0.0.7) INFO vllm engine noise" in shown
    assert "run cl-run: succeeded\n  rows: 23 ok, 1 error" in shown
    raw = driver_log().splitlines()
    assert [shown_line(line, "json") for line in raw] == raw


def test_an_error_report_reads_back_as_it_was_written():
    from llmbatch.errors import JobFailed, SpecError

    for exc in (UserError("no bucket", lines=["no bucket", "set AWS_PROFILE"]), JobFailed("3 of 4 rows failed"),
                SpecError(["model.source: required"], source="job.yaml"), SpecError(["name: empty"]),
                RuntimeError("boom")):
        report = report_for(exc, "Traceback ..." if isinstance(exc, RuntimeError) else None)
        assert report_from_json(read_event(json_line(report))) == report
    assert report_from_json({"event": "progress", "exit_code": 2, "error": "x"}) is None
    assert console_text(read_event(json_line(report_for(UserError("bad"))))) == "error: bad"
