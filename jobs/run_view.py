"""The live view of a run on a terminal: phase, rows, speed, time left, engine replicas; warnings above it.

It reads the run's log events (as a structlog processor) and the progress counter's snapshots; it changes
nothing in the run."""
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
    log_path: str
    phase: str = "resolving the job"
    model: str = ""
    accelerator: str = ""
    replicas_planned: int = 0
    rows_total: int | None = None
    dashboard: str | None = None
    judge: str | None = None
    snapshot: dict[str, Any] = field(default_factory=dict)
    rate_since: tuple[float, int] | None = None   # (time, rows) when rows first moved
    started: float = field(default_factory=time.time)
    status: str | None = None


def rows_done(snapshot: dict[str, Any]) -> int:
    """Rows finished: written ones, or the engines' finished ones when more (an engine's output reaches the
    writer a whole read task at a time, so on a large input the written count lags far behind)."""
    generated = sum(r.get("rows", 0) for r in snapshot.get("replicas", []))
    return max(snapshot.get("rows", 0), generated)


def output_tokens_per_second(snapshot: dict[str, Any], now: float) -> float | None:
    replicas = [r for r in snapshot.get("replicas", []) if r.get("first_batch_at")]
    if not replicas:
        return None
    first = min(r["first_batch_at"] for r in replicas)
    tokens = sum(r.get("generated_tokens", 0) for r in replicas)
    return tokens / max(1e-6, now - first)


def eta_seconds(state: ViewState, done: int, now: float) -> float | None:
    if not state.rows_total or state.rate_since is None or done <= state.rate_since[1]:
        return None
    since, rows_then = state.rate_since
    rate = (done - rows_then) / max(1e-6, now - since)
    return max(0.0, (state.rows_total - done) / rate)


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

    def __init__(self, terminal: TextIO, run_id: str, job: str, log_path: str):
        # the width of the terminal itself: descriptors 1 and 2, where rich looks, now lead to the run's log file
        self.console = Console(file=terminal, force_terminal=True, highlight=False, soft_wrap=False,
                               width=terminal_width(terminal))
        self.state = ViewState(run_id=run_id, job=job, log_path=log_path)
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
        if name == "ray_started" and event.get("dashboard"):
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
            state.snapshot, state.rate_since = {}, None
        elif name == "run_finished":
            state.status = str(event.get("status"))
            state.phase = f"finished: {state.status}"
            if isinstance(event.get("rows_ok"), int) and isinstance(event.get("rows_error"), int):
                state.snapshot = {**state.snapshot, "rows": event["rows_ok"] + event["rows_error"],
                                  "errors": event["rows_error"]}

    def progress(self, snapshot: dict[str, Any], total: int) -> None:
        """A progress counter's snapshot, every second or so while a pass runs."""
        now = time.time()
        with self._lock:
            state = self.state
            state.snapshot = snapshot
            state.rows_total = total
            done = rows_done(snapshot)
            if done and state.rate_since is None:
                batches = [r["first_batch_at"] for r in snapshot.get("replicas", []) if r.get("first_batch_at")]
                state.rate_since = (min(batches, default=now), 0)
            if state.judge is None and state.phase.startswith("starting engines"):
                ready = sum(1 for r in snapshot.get("replicas", []) if r.get("engine_ready_at"))
                if done:
                    state.phase = "generating"
                elif ready:
                    state.phase = f"starting engines ({ready}/{max(ready, state.replicas_planned)} ready)"
            if state.judge is None and state.phase == "generating" and done >= total > 0:
                state.phase = "writing"

    # ---- output -------------------------------------------------------------------------------

    def render(self) -> Group:
        with self._lock:
            return self._render(time.time())

    def _render(self, now: float) -> Group:
        state = self.state
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("run", f"{state.run_id}  (job {state.job})")
        if state.model:
            grid.add_row("model", f"{state.model} on {state.replicas_planned or '?'} x {state.accelerator} replica(s)")
        grid.add_row("phase", Text(state.phase, style="cyan"))
        done = rows_done(state.snapshot)
        if state.rows_total:
            errors = state.snapshot.get("errors", 0)
            bar = ProgressBar(total=state.rows_total, completed=min(done, state.rows_total), width=30)
            counts = Text(f"  {done}/{state.rows_total} rows  ({100 * done / state.rows_total:.0f}%)  "
                          f"{errors} error(s)")
            grid.add_row("rows", _bar_line(bar, counts))
        rate = output_tokens_per_second(state.snapshot, now)
        eta = eta_seconds(state, done, now)
        speed = f"{rate:.1f} output tok/s" if rate is not None else "-"
        grid.add_row("speed", speed + (f"   about {clock(eta)} left" if eta is not None else ""))
        grid.add_row("elapsed", clock(now - state.started))
        for replica in state.snapshot.get("replicas", [])[:SHOWN_REPLICAS]:
            grid.add_row("replica", _replica_line(replica))
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


def _replica_line(replica: dict[str, Any]) -> str:
    node = str(replica.get("node_id") or "?")[:8]
    name = str(replica.get("replica") or "?")[:8]
    state = "generating" if replica.get("first_batch_at") else ("ready" if replica.get("engine_ready_at")
                                                                 else "starting")
    rate = replica.get("output_tokens_per_second")
    shown_rate = f", {rate:.1f} tok/s" if rate else ""
    return f"{name} on node {node}: {state}, {replica.get('rows', 0)} rows{shown_rate}"
