"""A run's lease: the driver writing a run renews `_lease.json` while it works, so a second submit of the same
run id (a resume, a rerun, an --overwrite) can tell a live run from one whose driver died.

A lease is live while it was renewed within EXPIRY_SECONDS, unless its holder is a process on this host that
no longer exists (then it is stale at once: a killed local driver can be resumed right away).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmbatch.errors import UserError
from llmbatch.pipelines.run_files import LEASE_NAME, RunFolder
RENEW_EVERY_SECONDS = 20.0
EXPIRY_SECONDS = 90.0


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_holder(lease: dict[str, Any] | None, now: float | None = None) -> dict[str, Any] | None:
    """The lease record when its holder is still working on the run, else None."""
    if not lease:
        return None
    age = (now if now is not None else time.time()) - float(lease.get("renewed_at", 0))
    if age > EXPIRY_SECONDS:
        return None
    if lease.get("host") == socket.gethostname() and not _process_exists(int(lease.get("pid", -1))):
        return None
    return {**lease, "age_seconds": round(max(0.0, age), 1)}


def check_not_running(run_uri: str, run_id: str) -> None:
    """Refuse to touch a run whose driver is still renewing its lease."""
    folder = RunFolder(run_uri)
    holder = live_holder(folder.read_json(LEASE_NAME))
    if holder is not None:
        raise UserError(f"run {run_id} is still running: its driver (pid {holder.get('pid')} on "
                        f"{holder.get('host')}) renewed {folder.path(LEASE_NAME)} {holder['age_seconds']:g} s ago; "
                        f"wait for it to end or cancel it, or submit under another --run-id "
                        f"(a lease whose driver died expires after {EXPIRY_SECONDS:g} s)")


@dataclass
class RunLease:
    """Held by the driver from its first write to the run until it commits or fails."""
    run_uri: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_uri: str) -> "RunLease":
        lease = cls(run_uri)
        lease._write()
        lease._thread = threading.Thread(target=lease._renew, name="llmbatch-lease", daemon=True)
        lease._thread.start()
        return lease

    def _write(self) -> None:
        RunFolder(self.run_uri).write_json(LEASE_NAME, {**_holder(), "token": self.token, "renewed_at": time.time()})

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_SECONDS):
            try:
                self._write()
            except UserError:
                continue  # a storage hiccup: the next renewal tries again, well before the lease expires

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        folder = RunFolder(self.run_uri)
        try:
            current = folder.read_json(LEASE_NAME)
            if current and current.get("token") == self.token:
                folder.remove(LEASE_NAME)
        except (UserError, OSError):
            pass  # an expired lease is as good as a removed one
