"""The scheduler's tick: for each applied schedule, bring its active runs' records up to date with the cluster,
then decide the slots that came due (jobs/scheduling.py) and act: claim each slot's record, then submit its run.

Exactly one run per slot: a slot's record is created once (ScheduleStore.claim), so of two ticks racing (two
scheduler replicas, or one restarted mid-tick) one decides the slot; the run id is the slot's, so submitting it
again (a scheduler that died between claim and submit, a cluster that lost the job) resumes or finds the run
committed rather than starting a second one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from llmbatch.jobs.schedule_store import ACTIVE, ScheduleStore, SlotRecord
from llmbatch.jobs.scheduling import decide
from llmbatch.jobs.slots import (
    Slot, fill_templates, previous_time, run_id_for, slot_at, slot_of_stamp, slots_between,
)
from llmbatch.jobs.spec import JobSpec, validate_spec

UTC = timezone.utc
RESUBMIT_AFTER_SECONDS = 120.0   # a claimed slot the cluster does not know after this long is submitted again


class Runner(Protocol):
    """Where runs go: the Jobs API of a cluster (JobsApiRunner), or a stand-in in tests."""

    def submit(self, spec: JobSpec, run_id: str, metadata: dict[str, str], overwrite: bool = False) -> str: ...
    def status(self, run_id: str) -> tuple[str | None, str | None]: ...   # (Ray status or None, message)
    def stop(self, run_id: str) -> None: ...
    def outcome(self, run_uri: str) -> dict[str, Any] | None: ...          # the committed manifest's figures


@dataclass
class Scheduler:
    store: ScheduleStore
    runner: Runner
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    log: Any = None

    def _now(self) -> str:
        return self.clock().isoformat(timespec="seconds")

    def tick(self) -> None:
        for name in self.store.schedule_names():
            try:
                self.tick_schedule(name)
            except Exception as exc:  # one broken schedule must not stop the others
                if self.log is not None:
                    self.log.error("schedule_tick_failed", schedule=name, error=f"{type(exc).__name__}: {exc}")

    def tick_schedule(self, name: str) -> None:
        entry = self.store.schedule(name)
        spec = validate_spec(entry["job"])
        schedule = spec.schedule
        assert schedule is not None
        records = self.store.records(name)
        for record in records:
            if record.status in ACTIVE:
                self.reconcile(spec, record)
        records = self.store.records(name)
        now = self.clock()
        active = [r for r in records if r.status in ACTIVE]
        decided = {r.slot for r in records}
        since = max([slot_of_stamp(r.slot) for r in records if r.trigger in ("schedule", "catchup")]
                    + [datetime.fromisoformat(entry.get("created_at") or entry["applied_at"])])
        due = [slot for slot in slots_between(schedule.cron, schedule.timezone, since, now)
               if slot.stamp not in decided]
        active_since = min((datetime.fromisoformat(r.decided_at) for r in active), default=None)
        decision = decide(schedule, due, now, len(active), active_since)
        for slot, why in decision.miss:
            self._record(spec, slot, "missed", why)
        for slot, why in decision.skip:
            self._record(spec, slot, "skipped", why)
        if decision.replace:
            for record in active:
                self.runner.stop(record.run_id)
                self.store.update(record.moved_to("replaced", self._now(), reason=decision.replace,
                                                  finished_at=self._now()))
        for slot, trigger in decision.fire:
            self.fire(spec, slot, trigger)
        for request_id, request in self.store.backfills(name):
            self.backfill_step(spec, request_id, request)

    def backfill_step(self, spec: JobSpec, request_id: str, request: dict[str, Any]) -> None:
        """Start the backfill's next slots, keeping at most its max_active backfill runs going."""
        records = {r.slot: r for r in self.store.records(spec.name)}
        running = sum(1 for r in records.values() if r.trigger == "backfill" and r.status in ACTIVE)
        remaining = list(request["slots"])
        while remaining and running < request["max_active"]:
            stamp = remaining.pop(0)
            slot = _slot_of(spec, stamp)
            record = records.get(stamp)
            if record is None:
                started = self.fire(spec, slot, "backfill") is not None
            elif record.status in ACTIVE:
                started = False
            elif self.store.claim_rerun(spec.name, stamp, request_id):
                committed = record.status in ("succeeded", "succeeded_with_errors")
                again = record.moved_to("submitted", self._now(), trigger="backfill", decided_at=self._now(),
                                        reason=None, finished_at=None, rows_ok=None, rows_error=None,
                                        wall_seconds=None, cost_usd=None)
                self._submit(spec, slot, again, overwrite=committed)
                started = True
            else:
                started = False
            running += started
        self.store.put_backfill(spec.name, request_id, {**request, "slots": remaining})

    def fire(self, spec: JobSpec, slot: Slot, trigger: str) -> SlotRecord | None:
        """Claim the slot and submit its run; None when another firing had claimed it."""
        record = SlotRecord(spec.name, slot.stamp, run_id_for(spec.name, slot), "submitted", self._now(),
                            trigger=trigger)
        if not self.store.claim(record):
            return None
        return self._submit(spec, slot, record)

    def _submit(self, spec: JobSpec, slot: Slot, record: SlotRecord, overwrite: bool = False) -> SlotRecord:
        try:
            submission = self.runner.submit(job_for_slot(spec, slot), record.run_id, slot_metadata(spec, slot),
                                            overwrite=overwrite)
        except Exception as exc:
            try:
                status, _ = self.runner.status(record.run_id)
            except Exception:
                status = None
            if status in ("PENDING", "RUNNING"):   # another scheduler replica submitted it meanwhile
                return record
            failed = record.moved_to("failed", self._now(), reason=f"could not submit: {exc}",
                                    finished_at=self._now())
            self.store.update(failed)
            if self.log is not None:
                self.log.error("slot_submit_failed", schedule=spec.name, slot=slot.stamp, error=str(exc))
            return failed
        if self.log is not None:
            self.log.info("slot_submitted", schedule=spec.name, slot=slot.stamp, run_id=record.run_id,
                          trigger=record.trigger)
        record.submission_id = submission
        self.store.update(record)
        return record

    def reconcile(self, spec: JobSpec, record: SlotRecord) -> SlotRecord:
        """Bring an active record up to date with its run; submit the run again when the cluster lost it."""
        slot = _slot_of(spec, record.slot)
        run_uri = job_for_slot(spec, slot).output.path.rstrip("/") + "/" + record.run_id
        outcome = self.runner.outcome(run_uri)
        if outcome is not None:   # committed, whatever the cluster remembers
            return self._finish(record, outcome)
        status, message = self.runner.status(record.run_id)
        if status is None:
            age = (self.clock() - datetime.fromisoformat(record.decided_at)).total_seconds()
            if age > RESUBMIT_AFTER_SECONDS:
                if self.log is not None:
                    self.log.warning("slot_resubmitted", schedule=spec.name, slot=record.slot, run_id=record.run_id,
                                     note="the cluster has no such run; the same run id resumes what it wrote")
                return self._submit(spec, slot, record.moved_to("submitted", self._now(), decided_at=self._now()))
            return record
        if status in ("PENDING", "RUNNING"):
            if record.status != "running" and status == "RUNNING":
                record = record.moved_to("running", self._now())
                self.store.update(record)
            return record
        if status == "STOPPED":
            stopped = record.moved_to("stopped", self._now(), reason=message or "stopped on the cluster",
                                      finished_at=self._now())
        else:   # FAILED, or SUCCEEDED without a manifest the scheduler can read
            stopped = record.moved_to("failed", self._now(),
                                      reason=message or f"the run ended {status} without a manifest",
                                      finished_at=self._now())
        self.store.update(stopped)
        return stopped

    def _finish(self, record: SlotRecord, outcome: dict[str, Any]) -> SlotRecord:
        done = record.moved_to(outcome.get("status") or "succeeded", self._now(), finished_at=self._now(),
                               rows_ok=outcome.get("rows_ok"), rows_error=outcome.get("rows_error"),
                               wall_seconds=outcome.get("wall_seconds"), cost_usd=outcome.get("cost_usd"))
        self.store.update(done)
        if self.log is not None:
            self.log.info("slot_finished", schedule=record.schedule, slot=record.slot, status=done.status,
                          rows_ok=done.rows_ok, rows_error=done.rows_error)
        return done

    def _record(self, spec: JobSpec, slot: Slot, status: str, why: str) -> None:
        if self.store.claim(SlotRecord(spec.name, slot.stamp, run_id_for(spec.name, slot), status, self._now(),
                                       reason=why)) and self.log is not None:
            self.log.info(f"slot_{status}", schedule=spec.name, slot=slot.stamp, reason=why)

    def run_forever(self, every: float, stop: Callable[[], bool]) -> None:
        while not stop():
            started = time.monotonic()
            self.tick()
            time.sleep(max(0.0, every - (time.monotonic() - started)))


def job_for_slot(spec: JobSpec, slot: Slot) -> JobSpec:
    """The job one slot runs: its paths' templates filled in with the slot's values, no schedule."""
    data = spec.model_dump(mode="json")
    data["schedule"] = None
    data["input"]["path"] = fill_templates(data["input"]["path"], slot)
    data["output"]["path"] = fill_templates(data["output"]["path"], slot)
    return validate_spec(data)


def slot_metadata(spec: JobSpec, slot: Slot) -> dict[str, str]:
    """What the Ray dashboard shows beside the run: the schedule and the slot."""
    assert spec.schedule is not None
    return {"schedule": spec.name, "slot": slot.stamp, "cron": spec.schedule.cron,
            "timezone": spec.schedule.timezone}


def _slot_of(spec: JobSpec, stamp: str) -> Slot:
    """The slot a record names; a manual slot off the schedule gets the interval since the schedule's slot
    before it."""
    assert spec.schedule is not None
    due = slot_of_stamp(stamp)
    found = slot_at(spec.schedule.cron, spec.schedule.timezone, due)
    return found or Slot(due, previous_time(spec.schedule.cron, spec.schedule.timezone, due), spec.schedule.timezone)
