"""The live view of a run on a terminal: phase, rows, speed, time left, engine replicas; warnings above it.

It reads the run's log events (as a structlog processor, or read back from a cluster run's log) and the
progress of each pass; it changes nothing in the run."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from llmbatch.pipelines.progress_report import PassProgress, ReplicaState

SHOWN_REPLICAS = 8
PHASES_BY_EVENT = {
    "run_lock_taken": "preparing the run folder",
    "model_prepare_started": "preparing the model",
    "ray_starting": "starting Ray",
    "ray_started": "pre-pass: scanning the input",
    "input_scanned": "starting engines",
    "run_started": "starting engines",
    "nothing_left": "committing",
    "committing": "committing",
    "run_finished": "finished",
}


@dataclass
class ViewState:
    run_id: str
    job: str
    log_path: str                   # where the run's whole log is: a file, or the command that prints it
    phase: str = "resolving the job"
    model: str = ""
    accelerator: str = ""
    replicas_planned: int = 0
    rows_total: int | None = None
    dashboard: str | None = None
    judge: str | None = None
    progress: PassProgress | None = None
    progress_at: float = 0.0        # when it came
    started: float = field(default_factory=time.time)
    status: str | None = None


def eta_seconds(state: ViewState, now: float) -> float | None:
    """Time left at the measured rate, counted down since the progress came."""
    left = state.progress.seconds_left() if state.progress else None
    return None if left is None else max(0.0, left - (now - state.progress_at))


def terminal_width(terminal: TextIO) -> int | None:
    """Columns of the terminal `terminal` writes to; None (rich's own guess) when it has none."""
    try:
        columns = os.get_terminal_size(terminal.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None
    return columns or None   # a terminal that reports no size (a bare pty) leaves it to COLUMNS


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunView:
    """A rich Live region on the terminal, redrawn a few times a second."""

    def __init__(self, terminal: TextIO, run_id: str, job: str, log_path: str, *, phase: str | None = None,
                 dashboard: str | None = None):
        # the width of the terminal itself: descriptors 1 and 2, where rich looks, now lead to the run's log file
        self.console = Console(file=terminal, force_terminal=True, highlight=False, soft_wrap=False,
                               width=terminal_width(terminal))
        self.state = ViewState(run_id=run_id, job=job, log_path=log_path, dashboard=dashboard)
        if phase:
            self.state.phase = phase
        self._lock = threading.Lock()
        self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4,
                          transient=False, redirect_stdout=False, redirect_stderr=False)

    def __enter__(self) -> "RunView":
        self._live.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            if exc_info[0] is not None and self.state.status is None:
                self.state.phase = "stopped"
        try:
            self._live.refresh()
        finally:
            self._live.__exit__(*exc_info)

    # ---- inputs -------------------------------------------------------------------------------

    def observe(self, _logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        """structlog processor: follows the run's phases from its events; shows warnings and errors above."""
        name = event.get("event")
        with self._lock:
            self._follow(name, event)
        if method in ("warning", "error", "critical", "exception"):
            details = "  ".join(f"{k}={v}" for k, v in event.items()
                                if k not in ("event", "level", "timestamp", "job", "run_id"))
            self.console.print(Text(f"{method}: {name}  {details}".rstrip(),
                                    style="yellow" if method == "warning" else "red"))
        return event

    def _follow(self, name: str | None, event: dict[str, Any]) -> None:
        state = self.state
        if name in PHASES_BY_EVENT:
            state.phase = PHASES_BY_EVENT[name]
        if name == "ray_starting" and event.get("cluster"):
            state.phase = "joining the cluster"
        if name == "ray_started" and event.get("dashboard") and not state.dashboard:
            state.dashboard = event["dashboard"]
        elif name == "run_started":
            state.rows_total = event.get("rows")
            state.replicas_planned = int(event.get("replicas") or 0)
            state.model = str(event.get("model") or "")
            state.accelerator = str(event.get("accelerator") or "")
        elif name == "judge_pass_started":
            state.judge = str(event.get("scorer"))
            state.phase = f"judging ({state.judge})"
            state.replicas_planned = int(event.get("replicas") or state.replicas_planned)
            state.progress = None
        elif name == "run_finished":
            state.status = str(event.get("status"))
            state.phase = f"finished: {state.status}"
            ok, failed = event.get("rows_ok"), event.get("rows_error")
            if isinstance(ok, int) and isinstance(failed, int):
                state.progress = (state.progress or PassProgress(rows_total=ok + failed)).finished(ok, failed)

    def show(self, progress: PassProgress) -> None:
        """A pass's progress: from this machine's counter every second or so, or read back from a cluster run's
        log."""
        with self._lock:
            state = self.state
            state.progress, state.progress_at = progress, time.time()
            state.rows_total = progress.rows_total
            done = progress.rows_done
            if state.judge is None and state.phase.startswith("starting engines"):
                ready = progress.replicas_ready
                if done:
                    state.phase = "generating"
                elif ready:
                    state.phase = f"starting engines ({ready}/{max(ready, state.replicas_planned)} ready)"
            if state.judge is None and state.phase == "generating" and done >= progress.rows_total > 0:
                state.phase = "writing"

    def ended(self, phase: str) -> None:
        """The run ended without a `run_finished` event of its own (its driver stopped)."""
        with self._lock:
            if self.state.status is None:
                self.state.phase = phase

    # ---- output -------------------------------------------------------------------------------

    def render(self) -> Group:
        with self._lock:
            return self._render(time.time())

    def _render(self, now: float) -> Group:
        state = self.state
        progress = state.progress
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("run", f"{state.run_id}  (job {state.job})")
        if state.model:
            grid.add_row("model", f"{state.model} on {state.replicas_planned or '?'} x {state.accelerator} replica(s)")
        grid.add_row("phase", Text(state.phase, style="cyan"))
        done = progress.rows_done if progress else 0
        if state.rows_total:
            errors = progress.rows_error if progress else 0
            bar = ProgressBar(total=state.rows_total, completed=min(done, state.rows_total), width=30)
            counts = Text(f"  {done}/{state.rows_total} rows  ({100 * done / state.rows_total:.0f}%)  "
                          f"{errors} error(s)")
            grid.add_row("rows", _bar_line(bar, counts))
        rate = progress.output_tok_s if progress else None
        eta = eta_seconds(state, now)
        speed = f"{rate:.1f} output tok/s" if rate is not None else "-"
        grid.add_row("speed", speed + (f"   about {clock(eta)} left" if eta is not None else ""))
        grid.add_row("elapsed", clock(now - state.started))
        replicas = progress.replicas if progress else ()
        for replica in replicas[:SHOWN_REPLICAS]:
            grid.add_row("replica", _replica_line(replica))
        hidden = max(len(replicas), progress.replicas_seen if progress else 0) - min(len(replicas), SHOWN_REPLICAS)
        if hidden > 0:
            grid.add_row("", f"and {hidden} more replica(s)")
        if state.dashboard:
            grid.add_row("dashboard", state.dashboard)
        grid.add_row("log", state.log_path)
        return Group(grid)


def _bar_line(bar: ProgressBar, counts: Text) -> Table:
    line = Table.grid()
    line.add_column(no_wrap=True)
    line.add_column(no_wrap=True)
    line.add_row(bar, counts)
    return line


def _replica_line(replica: ReplicaState) -> str:
    rate = f", {replica.output_tok_s:.1f} tok/s" if replica.output_tok_s else ""
    return f"{replica.replica} on node {replica.node}: {replica.state}, {replica.rows} rows{rate}"
