"""The runs this machine started: `<llmbatch home>/runs/<run_id>/run.json`, one record per run id, read by
`llmbatch runs` and by `llmbatch results latest`.

The index only remembers runs; the run folder (output.path/RUN_ID) stays the record of what a run wrote.
run_dir and the record_* functions raise nothing but OSError, so a caller can keep a failing index from
failing a run.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmbatch.cluster.home import llmbatch_home
from llmbatch.errors import UserError
from llmbatch.storage import is_s3, write_local

RECORD_NAME = "run.json"
RUNNING = "running"
REFUSED = "refused"      # the submit stopped before it started (a bad input, say): no run folder to show
ENDED_WITHOUT_RECORD = "ended without a record"  # a running record whose process is gone


def runs_root() -> Path:
    return llmbatch_home() / "runs"


def run_dir(run_id: str) -> Path:
    """The index folder of `run_id` (not created); a run id that would leave the index is refused."""
    if not run_id or run_id in (".", "..") or any(c in run_id for c in "/\\\0") or ".." in run_id:
        raise OSError(errno.EINVAL, f"run id {run_id!r} would leave the run index {runs_root()}")
    return runs_root() / run_id


def record_started(run_id: str, *, job: str, model: str, run_uri: str, log_path: str | None) -> None:
    _write(run_id, {
        "run_id": run_id,
        "job": job,
        "model": model,
        "status": RUNNING,
        "started_at": _now(),
        "run_uri": _absolute(run_uri),
        "log_path": _absolute(log_path) if log_path else None,
        "pid": os.getpid(),
        "process_started": _process_start(os.getpid()),
        "host": socket.gethostname(),
    })


def record_finished(run_id: str, *, status: str, rows_ok: int | None, rows_error: int | None,
                    wall_seconds: float | None, cost_usd: float | None) -> None:
    """Complete the run's record (status: the manifest's, or interrupted / crashed / refused)."""
    record = _read(run_dir(run_id) / RECORD_NAME) or {"run_id": run_id}
    record.update(status=status, finished_at=_now(), rows_ok=rows_ok, rows_error=rows_error,
                  wall_seconds=wall_seconds, cost_usd=cost_usd)
    _write(run_id, record)


def record_of(run_id: str) -> dict[str, Any] | None:
    """The run's record as it is now, None when there is none."""
    return _read(run_dir(run_id) / RECORD_NAME)


def put_back(run_id: str, record: dict[str, Any]) -> None:
    """Write an earlier record again (a submit refused while another driver runs the run keeps its record)."""
    _write(run_id, record)


def list_runs(job: str | None = None) -> list[dict[str, Any]]:
    """Every recorded run (of `job`), newest first."""
    root = runs_root()
    try:
        folders = list(root.iterdir())
    except FileNotFoundError:
        return []
    runs = []
    for folder in folders:
        try:
            record = _read(folder / RECORD_NAME)
        except OSError:  # one unreadable record hides only itself
            continue
        if record is None or record.get("run_id") != folder.name or (job is not None and record.get("job") != job):
            continue
        if record.get("status") == RUNNING and not _still_running(record):
            record["status"] = ENDED_WITHOUT_RECORD
        runs.append(record)
    return newest_first(runs)


def latest(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record `latest` names among `runs` (newest first): the newest with a run folder that was not refused."""
    return next((r for r in runs if r.get("run_uri") and r.get("status") != REFUSED), None)


def locate(ref: str) -> str:
    """The run folder `ref` names: `latest` (the newest run in the index that was not refused, committed or not),
    a run id in the index, or a path (absolute when local) or s3:// URI."""
    root = runs_root()
    if ref == "latest":
        newest = latest(list_runs())
        if newest is None:
            raise UserError(f"latest: no run is recorded in the run index {root}; give the run folder "
                            "(output.path/RUN_ID) instead")
        return newest["run_uri"]
    if is_s3(ref):
        return ref.rstrip("/")
    looks_like_id = "/" not in ref and "\\" not in ref
    if looks_like_id:
        try:
            record = _read(run_dir(ref) / RECORD_NAME)
        except OSError:
            record = None
        if record and record.get("run_uri"):
            return record["run_uri"]
    path = os.path.abspath(os.path.expanduser(ref))
    if os.path.isdir(path):
        return path
    looked = f"no run with that id in the run index {root}, and no folder {path}" if looks_like_id \
        else f"no folder {path}"
    raise UserError(f"{ref}: {looked}; `llmbatch runs` lists the runs this machine started")


def unfinished(ref: str) -> str | None:
    """Why the run `ref` names in the index (`latest` or a run id) has no results to show, when its record says
    it never committed: still running, or stopped before its end. None otherwise."""
    try:
        runs = list_runs()
    except OSError:
        return None
    if ref == "latest":
        record = latest(runs)
    else:
        record = next((r for r in runs if r.get("run_id") == ref), None)
    status = record.get("status") if record else None
    if status not in (RUNNING, ENDED_WITHOUT_RECORD, "interrupted", "crashed"):
        return None
    log = f"; its log: {record['log_path']}" if record.get("log_path") else ""
    if status == RUNNING:
        return (f"run {record['run_id']} is still running (started {record.get('started_at')}{log}); "
                "its results show once it commits")
    return (f"run {record['run_id']} {status} before it committed{log}; `llmbatch submit JOB --resume "
            f"{record['run_id']}` finishes it")


def _write(run_id: str, record: dict[str, Any]) -> None:
    write_local(run_dir(run_id) / RECORD_NAME, json.dumps(record, indent=2, default=str).encode())


def _read(path: Path) -> dict[str, Any] | None:
    """The record at `path`; None when it is missing or not a record (a half-copied or hand-edited file)."""
    try:
        record = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _absolute(path: str) -> str:
    if is_s3(path):
        return "s3://" + path.split("://", 1)[1].rstrip("/")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _still_running(record: dict[str, Any]) -> bool:
    """Whether the process that started the run is alive; a record from another host is taken at its word."""
    pid = record.get("pid")
    if record.get("host") not in (None, socket.gethostname()) or not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = record.get("process_started")
    return recorded is None or _process_start(pid) in (None, recorded)


def _process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux); tells a reused pid from the run's."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def cluster_run(run: dict[str, Any], where: str) -> dict[str, Any]:
    """A row of jobs.remote.list_runs in the shape of the index's records."""
    started = run.get("start_ms")
    return {
        "run_id": run.get("run_id"),
        "job": run.get("job"),
        "model": run.get("model"),
        "status": run.get("run_status") or str(run.get("status") or "").lower(),
        "started_at": datetime.fromtimestamp(started / 1000, timezone.utc).isoformat() if started else None,
        "rows_ok": run.get("rows_ok"),
        "rows_error": run.get("rows_error"),
        "wall_seconds": run.get("wall_seconds"),
        "cost_usd": run.get("cost_usd"),
        "run_uri": run.get("output"),
        "attempts": run.get("attempts"),
        "where": where,
    }


def newest_first(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(runs, key=lambda r: _moment(r.get("started_at")) or datetime.min.replace(tzinfo=timezone.utc),
                  reverse=True)


def render_runs(runs: list[dict[str, Any]]) -> str:
    """The runs as a table, one line each."""
    from llmbatch.jobs.results import printable

    with_where = any(r.get("where", "local") != "local" for r in runs)
    head = (f"{'RUN_ID':<40} {'JOB':<16} {'STATUS':<22} {'ROWS OK/ERR':<11} {'WALL':>8} {'COST':>9} "
            f"{'STARTED (UTC)':<19} " + ("WHERE  " * with_where) + "OUTPUT")
    lines = [head]
    for run in runs:
        counts = f"{run['rows_ok']}/{run['rows_error']}" if run.get("rows_ok") is not None else "-"
        cost = f"${run['cost_usd']:.4f}" if isinstance(run.get("cost_usd"), (int, float)) else "-"
        where = f"{run.get('where', 'local')}  " if with_where else ""
        line = (f"{run.get('run_id') or '-':<40} {run.get('job') or '-':<16} {run.get('status') or '-':<22} "
                f"{counts:<11} {_duration(run.get('wall_seconds')):>8} {cost:>9} {_when(run.get('started_at')):<19} "
                f"{where}{run.get('run_uri') or '-'}")
        lines.append(re.sub(r"\s", " ", printable(line)))
    return "\n".join(lines)


def _moment(text: Any) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _when(text: Any) -> str:
    moment = _moment(text)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
