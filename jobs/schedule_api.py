"""The scheduler's HTTP API, as one function of (method, path, body, bearer token): the Serve app
(jobs/scheduler_app.py) hands every request here. Every route needs the token; a wrong or missing one gets 401
and a log line without it.

    GET    /schedules                        every schedule, with its next slot and last outcome
    POST   /schedules              {job}     apply a job file with a schedule (insert or update by name)
    GET    /schedules/NAME                   the applied job file, with its schedule
    DELETE /schedules/NAME                   forget a schedule (its history stays)
    POST   /schedules/NAME/pause | resume
    POST   /schedules/NAME/trigger           run a slot now, out of schedule
    GET    /schedules/NAME/history           every slot's record, newest first
    POST   /schedules/NAME/backfill {from, to, reprocess, max_active, dry_run}
"""
from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

from llmbatch.errors import UserError
from llmbatch.jobs.schedule_store import TERMINAL, ScheduleStore
from llmbatch.jobs.scheduler import Scheduler
from llmbatch.jobs.slots import Slot, fire_times, previous_time, slots_between
from llmbatch.jobs.spec import validate_spec

TOKEN_FILE = "api-token"
REPROCESS = ("none", "failed", "completed")
ROUTE = re.compile(r"^/schedules(?:/(?P<name>[a-z0-9][a-z0-9-]*)(?:/(?P<verb>[a-z]+))?)?/?$")


def ensure_token(store: ScheduleStore) -> str:
    """The API's bearer token, kept in the scheduler's state (made once, at the first deploy)."""
    store.create_file(TOKEN_FILE, secrets.token_urlsafe(32).encode())
    return store.read_file(TOKEN_FILE).decode().strip()


class ScheduleApi:
    def __init__(self, store: ScheduleStore, scheduler: Scheduler, token: str, log=None):
        self.store = store
        self.scheduler = scheduler
        self.token = token
        self.log = log

    def handle(self, method: str, path: str, body: dict[str, Any] | None,
               authorization: str | None) -> tuple[int, Any]:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not authorization or not hmac.compare_digest(given.encode(), self.token.encode()):
            if self.log is not None:
                self.log.warning("scheduler_api_unauthorized", method=method, path=path,
                                 reason="no bearer token" if not authorization else "wrong bearer token")
            return 401, {"error": ["a bearer token is required: the scheduler's api-token"]}
        match = ROUTE.match(path)
        if not match:
            return 404, {"error": [f"no route {method} {path}"]}
        name, verb = match.group("name"), match.group("verb")
        try:
            if name is None and method == "GET":
                return 200, self.list()
            if name is None and method == "POST":
                return 200, self.apply((body or {}).get("job"))
            if verb is None and method == "GET":
                return 200, self.store.schedule(name)
            if verb is None and method == "DELETE":
                self.store.schedule(name)
                self.store.delete_schedule(name)
                return 200, {"deleted": name}
            if verb in ("pause", "resume") and method == "POST":
                return 200, self.set_paused(name, verb == "pause")
            if verb == "trigger" and method == "POST":
                return 200, self.trigger(name)
            if verb == "history" and method == "GET":
                return 200, [asdict(r) for r in reversed(self.store.records(name))]
            if verb == "backfill" and method == "POST":
                return 200, self.backfill(name, body or {})
        except UserError as exc:
            return (404 if str(exc).startswith("no schedule named") else 400), {"error": exc.lines}
        return 404, {"error": [f"no route {method} {path}"]}

    def list(self) -> list[dict[str, Any]]:
        now = self.scheduler.clock()
        found = []
        for name in self.store.schedule_names():
            job = validate_spec(self.store.schedule(name)["job"])
            schedule = job.schedule
            records = self.store.records(name)
            upcoming = next(fire_times(schedule.cron, schedule.timezone, now, now.replace(year=now.year + 2)), None)
            last = records[-1] if records else None
            found.append({"name": name, "cron": schedule.cron, "timezone": schedule.timezone,
                          "paused": schedule.paused, "concurrency": schedule.concurrency,
                          "next_slot": upcoming.isoformat() if upcoming else None,
                          "last_slot": last.slot if last else None, "last_status": last.status if last else None,
                          "active": sum(1 for r in records if r.status not in TERMINAL)})
        return found

    def apply(self, job: Any) -> dict[str, Any]:
        if not isinstance(job, dict):
            raise UserError("the request needs the job file as `job`")
        spec = validate_spec(job)
        if spec.schedule is None:
            raise UserError("schedule: the job file has no schedule section; add one (see `llmbatch spec`)")
        existed = spec.name in self.store.schedule_names()
        self.store.put_schedule(spec.name, spec.model_dump(mode="json"))
        return {"name": spec.name, "applied": "updated" if existed else "created"}

    def set_paused(self, name: str, paused: bool) -> dict[str, Any]:
        job = self.store.schedule(name)["job"]
        job["schedule"]["paused"] = paused
        self.store.put_schedule(name, job)
        return {"name": name, "paused": paused}

    def trigger(self, name: str) -> dict[str, Any]:
        """A slot at this minute, out of schedule: its data interval runs from the schedule's slot before."""
        spec = validate_spec(self.store.schedule(name)["job"])
        now = self.scheduler.clock().replace(second=0, microsecond=0)
        slot = Slot(now, previous_time(spec.schedule.cron, spec.schedule.timezone, now), spec.schedule.timezone)
        record = self.scheduler.fire(spec, slot, "manual")
        if record is None:
            raise UserError(f"slot {slot.stamp} of {name} has a run already; see its history")
        return asdict(record)

    def backfill(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = validate_spec(self.store.schedule(name)["job"])
        reprocess = body.get("reprocess") or "none"
        if reprocess not in REPROCESS:
            raise UserError(f"--reprocess: '{reprocess}' is not one of {', '.join(REPROCESS)}")
        try:
            start, end = (_instant(body.get(key), key) for key in ("from", "to"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if end < start:
            raise UserError(f"--to {body.get('to')} is before --from {body.get('from')}")
        max_active = int(body.get("max_active") or 1)
        if max_active < 1:
            raise UserError("--max-active: must be 1 or more")
        end = min(end, self.scheduler.clock())   # slots not due yet are the schedule's to run
        slots = slots_between(spec.schedule.cron, spec.schedule.timezone, start - timedelta(seconds=1), end)
        plan = []
        for slot in slots:
            record = self.store.record(name, slot.stamp)
            plan.append({"slot": slot.stamp, "status": record.status if record else None,
                         "action": _backfill_action(record.status if record else None, reprocess)})
        request = {"slots": [p["slot"] for p in plan if p["action"] != "keep"], "reprocess": reprocess,
                   "max_active": max_active}
        if not body.get("dry_run") and request["slots"]:
            request_id = self.store.add_backfill(name, request)
            return {"name": name, "backfill": request_id, "slots": plan}
        return {"name": name, "backfill": None, "slots": plan, "dry_run": bool(body.get("dry_run"))}


def _backfill_action(status: str | None, reprocess: str) -> str:
    if status is None:
        return "run"
    if status in ("submitted", "running"):
        return "keep"
    done = status in ("succeeded", "succeeded_with_errors")
    if reprocess == "completed" or (reprocess == "failed" and not done):
        return "rerun"
    return "keep"


def _instant(text: Any, field: str) -> datetime:
    """A date (2026-12-01: the day's start for --from, its end for --to) or a time (2026-12-01T02:00,
    2026-12-01T02:00+01:00); UTC unless it says otherwise."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"--{field}: a date or time is needed, e.g. 2026-12-01 or 2026-12-01T02:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{field}: '{text}' is not a date or time like 2026-12-01 or 2026-12-01T02:00") from None
    if field == "to" and len(text) == 10:
        moment += timedelta(days=1, seconds=-1)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
