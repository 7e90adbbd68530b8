"""How the command line reports an error: lines that start with `error: ` on stderr, or, with
--log-format json, one JSON object on one line. URL credentials never reach either."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import click

from llmbatch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, JobFailed, SpecError, UserError
from llmbatch.redact import redact_event, strip_url_credentials

INTERNAL_HINT = "an internal error in llmbatch; run with --debug for the traceback"
REPORT_EVENTS = ("invalid_job_spec", "user_error", "usage_error", "job_failed", "internal_error", "interrupted")


@dataclass
class ErrorReport:
    event: str                # invalid_job_spec, user_error, usage_error, job_failed, internal_error, interrupted
    message: str
    exit_code: int
    problems: list[str] = field(default_factory=list)  # one line each, under the message
    problems_are_errors: bool = False                   # each problem is an error line of its own
    usage: str | None = None
    exception: str | None = None
    hint: str | None = None
    traceback: str | None = None


class ReportedElsewhere(Exception):
    """An error another llmbatch process reported (a cluster run's driver, in its log): shown as it said it,
    with its exit code."""

    def __init__(self, report: ErrorReport):
        super().__init__(report.message)
        self.report = report
        self.exit_code = report.exit_code


def report_for(exc: BaseException, traceback_text: str | None = None) -> ErrorReport:
    """The report of an exception a command raised; `traceback_text` when it should be shown."""
    if isinstance(exc, ReportedElsewhere):
        return exc.report
    if isinstance(exc, SpecError):
        return ErrorReport("invalid_job_spec", str(exc), exc.exit_code, list(exc.lines),
                           problems_are_errors=not exc.source, traceback=traceback_text)
    if isinstance(exc, UserError):
        return ErrorReport("user_error", str(exc), exc.exit_code, list(exc.lines), problems_are_errors=True,
                           traceback=traceback_text)
    if isinstance(exc, JobFailed):
        return ErrorReport("job_failed", f"job failed: {exc}", exc.exit_code, list(exc.problems),
                           traceback=traceback_text)
    if isinstance(exc, KeyboardInterrupt):
        return ErrorReport("interrupted", "interrupted", EXIT_INTERRUPTED)
    return ErrorReport("internal_error", f"{type(exc).__name__}: {exc}", EXIT_INTERNAL,
                       exception=type(exc).__name__, hint=None if traceback_text else INTERNAL_HINT,
                       traceback=traceback_text)


def usage_report(exc: click.UsageError) -> ErrorReport:
    """A flag, argument or command click could not take."""
    usage = exc.ctx.get_usage().removeprefix("Usage: ") if exc.ctx is not None else None
    hint = f"see '{exc.ctx.command_path} --help'" if exc.ctx is not None else None
    return ErrorReport("usage_error", exc.format_message(), exc.exit_code, usage=usage, hint=hint)


def console_lines(report: ErrorReport) -> list[str]:
    if report.problems_are_errors:
        lines = [line for problem in report.problems for line in _error_line(problem)]
    else:
        lines = _error_line(report.message) + [f"  {problem}" for problem in report.problems]
    if report.usage:
        lines.append(f"  usage: {report.usage}")
    if report.hint:
        lines.append(f"  ({report.hint})")
    return lines


def _error_line(text: str) -> list[str]:
    """`error: ` before the first line of `text`; any further lines indented under it."""
    first, *rest = text.splitlines() or [""]
    return [f"error: {first}"] + [f"  {line}" for line in rest]


def json_line(report: ErrorReport) -> str:
    record = {"level": "error", "event": report.event, "error": report.message}
    if report.problems or report.event in ("invalid_job_spec", "user_error"):
        record["problems"] = report.problems
    for key in ("usage", "exception", "hint", "traceback"):
        if getattr(report, key):
            record[key] = getattr(report, key)
    record["exit_code"] = report.exit_code
    return json.dumps(redact_event(None, "error", record), ensure_ascii=False)


def report_from_json(record: dict) -> ErrorReport | None:
    """A report json_line wrote, read back; None when `record` is not one."""
    if not isinstance(record.get("exit_code"), int) or not isinstance(record.get("error"), str) \
            or record.get("event") not in REPORT_EVENTS:
        return None
    problems = [str(p) for p in record.get("problems") or []]
    message = record["error"]
    return ErrorReport(record["event"], message, record["exit_code"], problems,
                       problems_are_errors=record["event"] == "user_error" or (
                           record["event"] == "invalid_job_spec" and message == "invalid job spec"),
                       usage=record.get("usage"), exception=record.get("exception"), hint=record.get("hint"),
                       traceback=record.get("traceback"))


def emit(report: ErrorReport, log_format: str) -> None:
    """Write the report to stderr: console lines (after the traceback, if any), or one JSON line."""
    if log_format == "json":
        click.echo(json_line(report), err=True)
        return
    if report.traceback:
        click.echo(strip_url_credentials(report.traceback.rstrip("\n")), err=True)
    for line in console_lines(report):
        click.echo(strip_url_credentials(line), err=True)


def log_format_asked(args: list[str]) -> str:
    """The --log-format the command line asks for, read before click has parsed it."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--log-format" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--log-format="):
            return arg.partition("=")[2]
    return "console"
