"""What a schedule does with the slots that are due and not decided yet: fire, skip, record missed, or wait.

Pure: the time is given, nothing is read or written here (jobs/scheduler.py acts on the decision).

- `paused`: every due slot is missed.
- `starting_deadline`: a slot later than that is missed.
- `catchup` (slots due before the newest, after an outage or a slow run): `latest` runs only the newest, `all`
  runs each, oldest first (at most `max_catchup`, the newest), `none` runs only slots seen on time (within
  ON_TIME_SECONDS, or the starting deadline).
- `concurrency` with runs of the schedule active: `allow` runs up to `max_active` at once, the rest wait;
  `forbid` skips a slot that came due after the active run started (slots older than it wait their turn, and
  newer ones behind them); `replace`
  stops the active runs and runs the newest slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from llmbatch.jobs.slots import Slot
from llmbatch.jobs.spec import ScheduleSpec, parse_duration

ON_TIME_SECONDS = 300.0


@dataclass
class Decision:
    fire: list[tuple[Slot, str]] = field(default_factory=list)     # (slot, trigger: schedule | catchup)
    skip: list[tuple[Slot, str]] = field(default_factory=list)     # (slot, why)
    miss: list[tuple[Slot, str]] = field(default_factory=list)     # (slot, why)
    replace: str | None = None                                     # why the active runs stop, if they do
    waiting: list[Slot] = field(default_factory=list)


def decide(schedule: ScheduleSpec, due: list[Slot], now: datetime, active: int,
           active_since: datetime | None) -> Decision:
    """`due`: the slots due by `now` and not decided yet, oldest first; `active`: runs of the schedule not ended,
    the oldest submitted at `active_since`."""
    decision = Decision()
    if not due:
        return decision
    if schedule.paused:
        decision.miss = [(slot, "the schedule was paused") for slot in due]
        return decision
    deadline = parse_duration(schedule.starting_deadline) if schedule.starting_deadline else None
    candidates = []
    for slot in due:
        late = (now - slot.due).total_seconds()
        if deadline is not None and late > deadline:
            decision.miss.append((slot, f"not started within its starting_deadline ({schedule.starting_deadline})"))
        elif schedule.catchup == "none" and late > (deadline or ON_TIME_SECONDS):
            decision.miss.append((slot, "catchup: none, and the slot was not seen on time"))
        else:
            candidates.append(slot)
    if candidates and schedule.catchup == "latest":
        decision.miss += [(slot, f"catchup: latest, and slot {candidates[-1].stamp} is newer")
                          for slot in candidates[:-1]]
        candidates = candidates[-1:]
    elif candidates and schedule.catchup == "all" and len(candidates) > schedule.max_catchup:
        kept = candidates[-schedule.max_catchup:]
        decision.miss += [(slot, f"catchup: all runs at most max_catchup ({schedule.max_catchup}) missed slots")
                          for slot in candidates[:-schedule.max_catchup]]
        candidates = kept
    if not candidates:
        return decision
    newest = candidates[-1]

    def trigger(slot: Slot) -> str:
        return "schedule" if slot is newest and (now - slot.due).total_seconds() <= ON_TIME_SECONDS else "catchup"

    if schedule.concurrency == "replace":
        decision.miss += [(slot, f"concurrency: replace, and slot {newest.stamp} is newer") for slot in candidates[:-1]]
        if active:
            decision.replace = f"replaced by slot {newest.stamp} (concurrency: replace)"
        decision.fire = [(newest, trigger(newest))]
        return decision
    if schedule.concurrency == "forbid":
        if active:
            older = [slot for slot in candidates if active_since is None or slot.due <= active_since]
            if older:   # slots due before the active run began wait their turn; so do newer ones behind them
                decision.waiting = candidates
            else:
                decision.skip = [(slot, "concurrency: forbid, and a run of this schedule was active")
                                 for slot in candidates]
            return decision
        decision.fire = [(candidates[0], trigger(candidates[0]))]
        decision.waiting = candidates[1:]
        return decision
    room = max(0, schedule.max_active - active)
    decision.fire = [(slot, trigger(slot)) for slot in candidates[:room]]
    decision.waiting = candidates[room:]
    return decision
