"""The scheduler's state, in object storage or a local folder: nothing that matters lives in its memory.

    {state}/schedules/{name}.json         the applied job file (with its schedule) and whether it is paused
    {state}/slots/{name}/{slot}.json      one record per slot, created once (a conditional create claims the
                                          slot: of two schedulers racing for it exactly one wins), then updated
                                          whole as its run goes on
    {state}/slots/{name}/{slot}.rerun-ID  created once when backfill request ID runs the slot again
    {state}/backfills/{name}/{ID}.json    a backfill's slots still to run
    {state}/api-token                     the HTTP API's bearer token
"""
from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from llmbatch.errors import UserError
from llmbatch.storage import create_once, filesystem_for, storage_errors, write_whole

STATE_ENV = "LLMBATCH_SCHEDULER_STATE"
TERMINAL = ("succeeded", "succeeded_with_errors", "failed", "skipped", "replaced", "missed", "stopped")
ACTIVE = ("submitted", "running")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SlotRecord:
    schedule: str
    slot: str                       # the slot's stamp, YYYYmmddTHHMMZ (UTC)
    run_id: str
    status: str                     # submitted | running | one of TERMINAL
    decided_at: str
    reason: str | None = None       # why skipped, missed, replaced or failed
    trigger: str = "schedule"       # schedule | catchup | manual | backfill
    submission_id: str | None = None
    finished_at: str | None = None
    rows_ok: int | None = None
    rows_error: int | None = None
    wall_seconds: float | None = None
    cost_usd: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)   # earlier statuses, with when

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def moved_to(self, status: str, at: str, **changes: Any) -> "SlotRecord":
        """The record in `status` from `at` on, the status it leaves kept in its history."""
        record = SlotRecord(**{**asdict(self), **changes})
        record.history = [*self.history, {"status": self.status, "until": at}]
        record.status = status
        return record


class ScheduleStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.inner = filesystem_for(self.root)

    def _path(self, *parts: str) -> str:
        return "/".join([self.inner, *parts])

    # ---- schedules ----
    def put_schedule(self, name: str, job: dict[str, Any], created_at: str | None = None) -> None:
        """Apply a schedule (insert or update by name); it counts slots from when it was first applied."""
        if created_at is None:
            try:
                created_at = self.schedule(name).get("created_at")
            except UserError:
                created_at = None
        body = json.dumps({"name": name, "job": job, "created_at": created_at or now_iso(),
                           "applied_at": now_iso()}, indent=2).encode()
        with storage_errors(self.root, "write the scheduler's state at"):
            write_whole(self.fs, self._path("schedules", f"{name}.json"), body)

    def schedule(self, name: str) -> dict[str, Any]:
        with storage_errors(self.root, "read the scheduler's state at"):
            try:
                return json.loads(self.fs.cat_file(self._path("schedules", f"{name}.json")))
            except FileNotFoundError:
                known = ", ".join(self.schedule_names()) or "none"
                raise UserError(f"no schedule named {name} (applied: {known})") from None

    def schedule_names(self) -> list[str]:
        with storage_errors(self.root, "read the scheduler's state at"):
            try:
                listed = self.fs.ls(self._path("schedules"), detail=False)
            except FileNotFoundError:
                return []
        return sorted(p.rsplit("/", 1)[-1][:-5] for p in listed if p.endswith(".json"))

    def delete_schedule(self, name: str) -> None:
        """Forget a schedule; its slot records stay as its history."""
        with storage_errors(self.root, "write the scheduler's state at"):
            try:
                self.fs.rm_file(self._path("schedules", f"{name}.json"))
            except FileNotFoundError:
                pass

    # ---- slots ----
    def claim(self, record: SlotRecord) -> bool:
        """Create the slot's record; False when it exists (another firing decided this slot)."""
        body = json.dumps(asdict(record), indent=2).encode()
        with storage_errors(self.root, "claim a slot in the scheduler's state at"):
            return create_once(self.fs, self._path("slots", record.schedule, f"{record.slot}.json"), body)

    def update(self, record: SlotRecord) -> None:
        body = json.dumps(asdict(record), indent=2).encode()
        with storage_errors(self.root, "write the scheduler's state at"):
            write_whole(self.fs, self._path("slots", record.schedule, f"{record.slot}.json"), body)

    def record(self, name: str, slot: str) -> SlotRecord | None:
        with storage_errors(self.root, "read the scheduler's state at"):
            try:
                return SlotRecord(**json.loads(self.fs.cat_file(self._path("slots", name, f"{slot}.json"))))
            except FileNotFoundError:
                return None

    def records(self, name: str) -> list[SlotRecord]:
        """Every slot record of the schedule, oldest slot first."""
        with storage_errors(self.root, "read the scheduler's state at"):
            try:
                listed = self.fs.ls(self._path("slots", name), detail=False)
            except FileNotFoundError:
                return []
            found = []
            for path in sorted(p for p in listed if p.endswith(".json")):
                try:
                    found.append(SlotRecord(**json.loads(self.fs.cat_file(path))))
                except FileNotFoundError:
                    continue
        return found


    # ---- backfills ----
    def add_backfill(self, name: str, request: dict[str, Any]) -> str:
        request_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        self.put_backfill(name, request_id, request)
        return request_id

    def put_backfill(self, name: str, request_id: str, request: dict[str, Any]) -> None:
        path = self._path("backfills", name, f"{request_id}.json")
        with storage_errors(self.root, "write the scheduler's state at"):
            if request.get("slots"):
                write_whole(self.fs, path, json.dumps(request, indent=2).encode())
            else:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass

    def backfills(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        with storage_errors(self.root, "read the scheduler's state at"):
            try:
                listed = sorted(p for p in self.fs.ls(self._path("backfills", name), detail=False)
                                if p.endswith(".json"))
            except FileNotFoundError:
                return []
            found = []
            for path in listed:
                try:
                    found.append((path.rsplit("/", 1)[-1][:-5], json.loads(self.fs.cat_file(path))))
                except FileNotFoundError:
                    continue
        return found

    def claim_rerun(self, name: str, slot: str, request_id: str) -> bool:
        with storage_errors(self.root, "claim a slot in the scheduler's state at"):
            return create_once(self.fs, self._path("slots", name, f"{slot}.rerun-{request_id}"), b"")

    # ---- files ----
    def create_file(self, name: str, body: bytes) -> bool:
        with storage_errors(self.root, "write the scheduler's state at"):
            return create_once(self.fs, self._path(name), body)

    def read_file(self, name: str) -> bytes:
        with storage_errors(self.root, "read the scheduler's state at"):
            return self.fs.cat_file(self._path(name))


def state_root(given: str | None) -> str:
    import os

    root = given or os.environ.get(STATE_ENV)
    if not root:
        raise UserError(f"no scheduler state: pass --state (an s3:// prefix or a folder every scheduler replica "
                        f"sees) or set {STATE_ENV}")
    return root if root.startswith("s3://") else os.path.abspath(os.path.expanduser(root))
