"""The run lock: one driver at a time writes a run folder.

A driver takes the lock by creating the next generation's record, `_lock/g<N>.json`, with a conditional create
(S3 `If-None-Match: *`; locally a hard link, which fails when the name exists): of two drivers racing for one
generation exactly one succeeds. The generation is the fencing token. Every part a driver writes carries it in
its name, and before the deletes, each part, the cache entries and the manifest the writer checks that no later
generation exists; a driver that finds one has lost the run and stops without writing.

The latest generation is live while its holder renews it. Whether it went stale is judged by the storage's own
clock (the record's age against a probe written now), never by comparing the clocks of two machines. On the
holder's own machine (same boot, same process namespace) a holder process that is gone, or whose pid now
belongs to a newer process, frees the run at once, so a killed local driver can be resumed right away.
Records are never deleted while a run may be taken: released ones are marked, so generations only grow.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmbatch.errors import JobFailed, UserError
from llmbatch.pipelines.run_files import LOCK_DIR
from llmbatch.storage import create_once, filesystem_for, join, storage_errors, write_whole

EXPIRY_ENV = "LLMBATCH_LOCK_EXPIRY_SECONDS"
DEFAULT_EXPIRY_SECONDS = 90.0
FENCE_EVERY_SECONDS = 2.0   # a write task looks for a later generation at most this often


def expiry_seconds() -> float:
    """How long a holder that stopped renewing keeps the run (LLMBATCH_LOCK_EXPIRY_SECONDS, default 90)."""
    try:
        return max(2.0, float(os.environ.get(EXPIRY_ENV, DEFAULT_EXPIRY_SECONDS)))
    except ValueError:
        return DEFAULT_EXPIRY_SECONDS


def renew_every_seconds() -> float:
    return expiry_seconds() / 4.5


class RunLockLost(JobFailed):
    """Another driver took this run (or the lock could not be renewed): this driver must not write."""


def record_name(generation: int) -> str:
    return f"g{generation:06d}.json"


def _generation_of(path: str) -> int | None:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("g") and name.endswith(".json") and name[1:-5].isdigit():
        return int(name[1:-5])
    return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def this_machine() -> dict[str, Any]:
    """What tells this machine's processes apart from another's: the host name, the boot, the pid namespace."""
    try:
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": pid_namespace}


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None when there is no such process here."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def gone_from_this_machine(record: dict[str, Any]) -> bool:
    """Whether the record's holder ran on this very machine and its process is gone (or its pid reused). False
    whenever that cannot be known for sure: another machine, another boot, another pid namespace."""
    here = this_machine()
    if here["boot_id"] is None or here["pid_namespace"] is None:
        return False
    if any(record.get(key) != here[key] for key in ("host", "boot_id", "pid_namespace")):
        return False
    started = process_start(int(record.get("pid", -1)))
    return started is None or started != record.get("pid_start")


class _Folder:
    """The `_lock/` folder on local disk or S3."""

    def __init__(self, run_uri: str):
        self.uri = join(run_uri, LOCK_DIR)
        self.fs, self.inner = filesystem_for(self.uri)
        self.local = bool(getattr(self.fs, "local_file", False))

    def generations(self) -> list[int]:
        with storage_errors(self.uri, "read the run lock at"):
            try:
                listed = self.fs.ls(self.inner, detail=False)
            except FileNotFoundError:
                return []
        return sorted(g for g in map(_generation_of, listed) if g is not None)

    def read(self, generation: int) -> dict[str, Any] | None:
        path = f"{self.inner}/{record_name(generation)}"
        with storage_errors(self.uri, "read the run lock at"):
            try:
                return json.loads(self.fs.cat_file(path))
            except FileNotFoundError:
                return None
            except ValueError:
                return {}

    def create(self, generation: int, body: bytes) -> bool:
        """Create the generation's record unless it exists; whether this call created it (a retried request
        whose first try went through finds its own record: the same token)."""
        if self._create(generation, body):
            return True
        mine = json.loads(body).get("token")
        return (self.read(generation) or {}).get("token") == mine

    def _create(self, generation: int, body: bytes) -> bool:
        with storage_errors(self.uri, "take the run lock at"):
            return create_once(self.fs, f"{self.inner}/{record_name(generation)}", body)

    def overwrite(self, generation: int, body: bytes) -> None:
        with storage_errors(self.uri, "renew the run lock at"):
            write_whole(self.fs, f"{self.inner}/{record_name(generation)}", body)

    def age_seconds(self, generation: int) -> float | None:
        """Seconds since the record was last written, by the storage's clock: its modification time against
        that of a probe written now."""
        path = f"{self.inner}/{record_name(generation)}"
        probe = f"{self.inner}/.clock-{uuid.uuid4().hex}"
        with storage_errors(self.uri, "read the run lock at"):
            try:
                written = self._modified(path)
            except FileNotFoundError:
                return None
            write_whole(self.fs, probe, b"")
            try:
                return max(0.0, self._modified(probe) - written)
            finally:
                self.fs.rm_file(probe)

    def _modified(self, path: str) -> float:
        if self.local:
            return os.stat(path).st_mtime
        return self.fs.info(path)["LastModified"].timestamp()


def live_holder(folder: _Folder, generations: list[int]) -> dict[str, Any] | None:
    """The latest of `generations` (one listing of the folder) while its holder still works on the run, else
    None."""
    if not generations:
        return None
    record = folder.read(generations[-1])
    if record is None or record.get("released"):
        return None
    if gone_from_this_machine(record):
        return None
    age = folder.age_seconds(generations[-1])
    if age is None or age > expiry_seconds():
        return None
    return {**record, "generation": generations[-1], "age_seconds": round(age, 1)}


def _refusal(run_id: str, folder: _Folder, holder: dict[str, Any]) -> UserError:
    return UserError(
        f"run {run_id} is still running: its driver (pid {holder.get('pid')} on {holder.get('host')}) renewed "
        f"{folder.uri} {holder['age_seconds']:g} s ago; wait for it to end or cancel it, or submit under another "
        f"--run-id (the lock of a driver that died frees after {expiry_seconds():g} s)")


@dataclass
class RunLock:
    """Held by a driver from before its first write to the run until it commits or fails."""
    run_uri: str
    run_id: str
    generation: int
    log: Any = None
    lost: str | None = None
    _record: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_uri: str, run_id: str, log=None) -> "RunLock":
        """Take the run, or raise a UserError naming the driver that holds it."""
        folder = _Folder(run_uri)
        generations = folder.generations()  # one listing: the run is judged and taken as it was then
        holder = live_holder(folder, generations)
        if holder is not None:
            raise _refusal(run_id, folder, holder)
        generation = (generations[-1] if generations else 0) + 1
        record = {"run_id": run_id, "generation": generation, "token": uuid.uuid4().hex, **this_machine(),
                  "pid": os.getpid(),
                  "pid_start": process_start(os.getpid()), "renewals": 0, "released": False}
        if not folder.create(generation, json.dumps(record).encode()):
            raise UserError(f"run {run_id}: another driver took this run a moment ago (lock generation "
                            f"{generation} at {folder.uri}); wait for it to end, or submit under another --run-id")
        lock = cls(run_uri, run_id, generation, log, _record=record)
        lock._thread = threading.Thread(target=lock._renew, name="llmbatch-run-lock", daemon=True)
        lock._thread.start()
        if log is not None:
            log.info("run_lock_taken", generation=generation, lock=folder.uri)
        return lock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def fence(self) -> "Fence":
        return Fence(self.run_uri, self.generation)

    def check(self, before: str) -> None:
        """Raise RunLockLost when this driver no longer holds the run; `before` names the write it guards."""
        if self.lost is None:
            later = self.fence.later_generation()
            if later is not None:
                self.lost = f"another driver took the run (lock generation {later} after this one's {self.generation})"
        if self.lost is not None:
            raise RunLockLost(f"run {self.run_id}: {self.lost}; stopped before {before} without writing it")

    def _renew(self) -> None:
        folder = _Folder(self.run_uri)
        last_renewed = time.monotonic()
        while not self._stop.wait(renew_every_seconds()):
            try:
                later = self.fence.later_generation()
                if later is not None:
                    self.lost = f"another driver took the run (lock generation {later} after this one's " \
                                f"{self.generation})"
                    return
                self._record["renewals"] += 1
                folder.overwrite(self.generation, json.dumps(self._record).encode())
                last_renewed = time.monotonic()
            except (UserError, OSError) as exc:
                silent = time.monotonic() - last_renewed
                if silent > expiry_seconds() - renew_every_seconds():
                    self.lost = f"the run lock could not be renewed for {silent:.0f} s ({exc})"
                    return
                if self.log is not None:
                    self.log.warning("run_lock_renewal_failed", error=str(exc), retry_in_s=renew_every_seconds())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost is not None:
            return
        try:
            if self.fence.later_generation() is None:
                _Folder(self.run_uri).overwrite(self.generation, json.dumps({**self._record, "released": True})
                                                .encode())
        except (UserError, OSError):
            pass  # an unreleased lock frees itself when it expires


_last_fence_check: dict[tuple[str, int], float] = {}


@dataclass(frozen=True)
class Fence:
    """What a write task carries to check that its driver still holds the run."""
    run_uri: str
    generation: int

    def later_generation(self) -> int | None:
        generations = _Folder(self.run_uri).generations()
        return generations[-1] if generations and generations[-1] > self.generation else None

    def check(self) -> None:
        """Raise RunLockLost when a later generation exists; looks at most every FENCE_EVERY_SECONDS."""
        key = (self.run_uri, self.generation)
        now = time.monotonic()
        if now - _last_fence_check.get(key, -FENCE_EVERY_SECONDS) < FENCE_EVERY_SECONDS:
            return
        later = self.later_generation()
        if later is not None:
            raise RunLockLost(f"{self.run_uri}: another driver took this run (lock generation {later} after "
                              f"{self.generation}); this write stopped")
        _last_fence_check[key] = now
