"""A cluster run seen from the submitter's terminal, and its log read back.

The driver of a run on a cluster logs its events as JSON lines (Ray's and vLLM's own output, which its log
also holds, are plain lines). Read back here, the events become the live view on a terminal, or log lines as a
local run prints them; the driver's error report and summary come out as a local run's do."""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import click
import structlog

from llmbatch.jobs.error_report import ErrorReport, console_lines, report_from_json
from llmbatch.pipelines.progress_report import PassProgress

SUMMARY_EVENT = "run_summary"
PROGRESS_EVENT = "progress"
# A progress line's replica details are for a live view; as a console line they would only make it long.
NOT_IN_CONSOLE_LINES = ("replicas", "replicas_seen", "generating_s")
_CONSOLE = structlog.dev.ConsoleRenderer(colors=False)


def read_event(line: str) -> dict[str, Any] | None:
    """The event a log line holds, when it is one of the driver's JSON lines."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("event"), str) else None


def console_text(event: dict[str, Any]) -> str:
    """An event as the console log line a local run prints; an error report as its `error:` lines; the run's
    summary as its text."""
    report = report_from_json(event)
    if report is not None:
        return "\n".join(console_lines(report))
    if event["event"] == SUMMARY_EVENT:
        return str(event.get("text", "")).rstrip("\n")
    fields = {k: v for k, v in event.items() if k not in NOT_IN_CONSOLE_LINES or event["event"] != PROGRESS_EVENT}
    level = str(fields.get("level", "info"))
    fields["timestamp"] = _local_clock(fields.get("timestamp"))
    return _CONSOLE(None, level, fields)


def shown_line(line: str, log_format: str) -> str:
    """A line of a cluster run's log as `llmbatch logs` prints it: events in the chosen format, other lines as
    they are."""
    event = read_event(line) if log_format == "console" else None
    return line if event is None else console_text(event)


def _local_clock(timestamp: Any) -> Any:
    try:
        return datetime.fromisoformat(str(timestamp)).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return timestamp


class LineSplitter:
    """A log stream, which arrives in chunks that end anywhere, cut into whole lines."""

    def __init__(self, take: Callable[[str], None]):
        self._take = take
        self._rest = ""

    def __call__(self, chunk: str) -> None:
        *lines, self._rest = (self._rest + chunk).split("\n")
        for line in lines:
            self._take(line)

    def close(self) -> None:
        if self._rest:
            rest, self._rest = self._rest, ""
            self._take(rest)


@dataclass
class Outcome:
    status: str                     # the Ray job's: SUCCEEDED, FAILED, STOPPED
    error: ErrorReport | None       # the driver's own report of why it stopped
    summary: str | None             # the run's summary, as a local run prints it


class DriverLines:
    """Takes the driver's log lines: events to the live view (or printed with `echo`), the error report and
    the summary kept for the end; Ray's and vLLM's lines printed only when `worker_lines`."""

    def __init__(self, echo: Callable[[str], None], *, view=None, log_format: str = "console",
                 worker_lines: bool = False):
        self.view, self.echo, self.log_format, self.worker_lines = view, echo, log_format, worker_lines
        self.error: ErrorReport | None = None
        self.summary: str | None = None

    def __call__(self, line: str) -> None:
        event = read_event(line)
        if event is None:
            if self.worker_lines and line.strip():
                self.echo(line)
            return
        report = report_from_json(event)
        if report is not None:
            self.error = report
        elif event["event"] == SUMMARY_EVENT:
            self.summary = str(event.get("text", "")).rstrip("\n")
        elif self.view is not None:
            if event["event"] == PROGRESS_EVENT:
                self.view.show(PassProgress.from_event(event))
            self.view.observe(None, str(event.get("level", "info")), event)
        else:
            self.echo(line if self.log_format == "json" else console_text(event))


def watch_run(address: str, run_id: str, submission_id: str, *, job: str, dashboard: str | None,
              logs_command: str, log_format: str, show_worker_logs: bool) -> Outcome:
    """Follow a submitted run until it ends: a live view when standard output is a terminal (not with
    --log-format json or --show-worker-logs), its events as log lines otherwise."""
    from llmbatch.jobs.remote import wait_for
    from llmbatch.jobs.run_view import RunView

    live = sys.stdout.isatty() and log_format != "json" and not show_worker_logs
    with ExitStack() as stack:
        view = None
        if live:
            view = stack.enter_context(RunView(sys.stdout, run_id, job, logs_command, dashboard=dashboard,
                                               phase="waiting for the cluster to start the run"))
        lines = DriverLines(click.echo, view=view, log_format=log_format, worker_lines=show_worker_logs)
        splitter = LineSplitter(lines)
        status = wait_for(address, run_id, splitter, submission_id)
        splitter.close()
        if view is not None:
            view.ended(f"ended: {status}")
    return Outcome(status, lines.error, lines.summary)
