"""A run on the embedded Ray, as `llmbatch submit` shows it: a live view on a terminal (plain log lines
otherwise), library output in the run's log file, and the run in the local history."""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import structlog

from llmbatch.errors import JobFailed, UserError
from llmbatch.jobs import run_index
from llmbatch.jobs.logs import configure_logging
from llmbatch.jobs.run import RunResult, progress_listener, run_job
from llmbatch.jobs.spec import JobSpec
from llmbatch.jobs.worker_output import Tee, worker_output_to

LOG_NAME = "llmbatch.log"


@dataclass(frozen=True)
class Display:
    log_format: str = "console"     # console | json
    level: str = "info"
    show_worker_logs: bool = False  # library output on the terminal, and no live view
    dashboard: bool = False


def run_here(spec: JobSpec, run_id: str, display: Display, *, overwrite: bool = False,
             resume: bool = False) -> RunResult:
    """Run `spec` on the embedded Ray and keep it in the run history."""
    from llmbatch.storage import join

    log_path = run_index.run_dir(run_id) / LOG_NAME
    earlier = _earlier_record(run_id)
    _remember(run_index.record_started, run_id, job=spec.name, model=spec.model.source,
              run_uri=join(spec.output.path, run_id), log_path=None if display.show_worker_logs else str(log_path))
    try:
        if display.show_worker_logs:
            result = _run(spec, run_id, display, overwrite, resume)
        else:
            result = _run_quietly(spec, run_id, display, log_path, overwrite, resume)
        _record_manifest(run_id, result.manifest)
        return result
    except BaseException as exc:
        if isinstance(exc, UserError) and earlier is not None:  # e.g. refused while another driver runs it
            _remember(run_index.put_back, run_id, record=earlier)
        elif isinstance(exc, JobFailed) and exc.manifest is not None:
            _record_manifest(run_id, exc.manifest)
        else:
            status = ("failed" if isinstance(exc, JobFailed) else run_index.REFUSED if isinstance(exc, UserError)
                      else "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed")
            _remember(run_index.record_finished, run_id, status=status, rows_ok=None, rows_error=None,
                      wall_seconds=None, cost_usd=None)
        raise


def _record_manifest(run_id: str, manifest) -> None:
    _remember(run_index.record_finished, run_id, status=manifest.status, rows_ok=manifest.rows.ok,
              rows_error=manifest.rows.error, wall_seconds=manifest.wall_seconds,
              cost_usd=manifest.cost.usd if manifest.cost else None)


def _run(spec: JobSpec, run_id: str, display: Display, overwrite: bool, resume: bool) -> RunResult:
    return run_job(spec, run_id, log=structlog.get_logger(), show_worker_logs=display.show_worker_logs,
                   overwrite=overwrite, resume=resume, dashboard=display.dashboard)


def _run_quietly(spec: JobSpec, run_id: str, display: Display, log_path, overwrite: bool,
                 resume: bool) -> RunResult:
    from llmbatch.jobs.run_view import RunView

    with ExitStack() as stack:
        try:
            terminal = stack.enter_context(worker_output_to(log_path))
        except OSError as exc:
            structlog.get_logger().warning("run_log_not_opened", path=str(log_path), error=str(exc),
                                           note="Ray's and vLLM's output stays on the terminal")
            return _run(spec, run_id, display, overwrite, resume)
        stack.callback(configure_logging, display.log_format, display.level)
        live = terminal.out.isatty() and display.log_format != "json"
        if live:
            view = RunView(terminal.out, run_id, spec.name, str(log_path))
            configure_logging(display.log_format, display.level, stream=terminal.log, observers=(view.observe,),
                              colors=False)
            token = progress_listener.set(view.show)
            stack.callback(progress_listener.reset, token)
            stack.enter_context(view)
        else:
            configure_logging(display.log_format, display.level, stream=Tee(terminal.err, terminal.log),
                              colors=False)
            structlog.get_logger().info("worker_logs", path=str(log_path), run_id=run_id)
        return _run(spec, run_id, display, overwrite, resume)


def _earlier_record(run_id: str) -> dict | None:
    try:
        return run_index.record_of(run_id)
    except OSError:
        return None


def _remember(write, run_id: str, **fields) -> None:
    """Keep the run in the local history; a history that cannot be written never fails the run."""
    try:
        write(run_id, **fields)
    except OSError as exc:
        structlog.get_logger().warning("run_history_not_written", run_id=run_id, error=str(exc))
