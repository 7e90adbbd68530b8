"""A schedule's slots: when each is due, its data interval, its run id and the values its templates take.

A slot is one time the schedule's cron expression names, in the schedule's timezone. Its data interval runs from
the slot before it to the slot itself (Airflow's convention): a nightly job at 02:00 on the 5th covers the 4th,
and `{ds}` is the 4th. When the clocks go back, a wall-clock time that comes twice is one slot (cron's rule);
when they go forward, a time that does not exist is due at the first minute after the change.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterator
from zoneinfo import ZoneInfo

from croniter import croniter

UTC = timezone.utc
STAMP = "%Y%m%dT%H%MZ"
TEMPLATE_FIELDS = ("ds", "slot", "data_interval_start", "data_interval_end")


@dataclass(frozen=True)
class Slot:
    due: datetime               # when the slot is due (UTC)
    interval_start: datetime    # the slot before it (UTC): its data interval is [interval_start, due)
    zone: str                   # the schedule's IANA timezone

    @property
    def stamp(self) -> str:
        return self.due.astimezone(UTC).strftime(STAMP)

    def values(self) -> dict[str, str]:
        """What `{ds}`, `{slot}`, `{data_interval_start}` and `{data_interval_end}` become for this slot."""
        local = ZoneInfo(self.zone)
        return {
            "ds": self.interval_start.astimezone(local).strftime("%Y-%m-%d"),
            "slot": self.stamp,
            "data_interval_start": self.interval_start.astimezone(local).isoformat(),
            "data_interval_end": self.due.astimezone(local).isoformat(),
        }


def run_id_for(name: str, slot: Slot) -> str:
    """The slot's run id: the Ray submission id and the llmbatch run id of every attempt at it."""
    return f"{name}-{slot.stamp}"


def slot_of_stamp(stamp: str) -> datetime:
    return datetime.strptime(stamp, STAMP).replace(tzinfo=UTC)


def fire_times(cron: str, zone: str, after: datetime, until: datetime) -> Iterator[datetime]:
    """The schedule's times in (after, until], in UTC, oldest first."""
    local = ZoneInfo(zone)
    times = croniter(cron, after.astimezone(local))
    while True:
        moment = times.get_next(datetime)
        if moment.astimezone(UTC) > until:
            return
        if not _repeats_wall_time(cron, moment):
            yield moment.astimezone(UTC)


def _repeats_wall_time(cron: str, moment: datetime) -> bool:
    """Whether the schedule's time before `moment` (local, aware) had the same wall-clock time: the clocks went
    back and this time came again."""
    before = croniter(cron, moment).get_prev(datetime)
    return before.replace(tzinfo=None) == moment.replace(tzinfo=None) and before.astimezone(UTC) != moment.astimezone(UTC)


def previous_time(cron: str, zone: str, moment: datetime) -> datetime:
    """The schedule's time before `moment` (UTC), not counting a wall-clock time that came again."""
    earlier = croniter(cron, moment.astimezone(ZoneInfo(zone))).get_prev(datetime)
    while _repeats_wall_time(cron, earlier):
        earlier = croniter(cron, earlier).get_prev(datetime)
    return earlier.astimezone(UTC)


def slots_between(cron: str, zone: str, after: datetime, until: datetime) -> list[Slot]:
    """Every slot due in (after, until], oldest first."""
    slots = []
    before = None
    for due in fire_times(cron, zone, after, until):
        slots.append(Slot(due, before or previous_time(cron, zone, due), zone))
        before = due
    return slots


def slot_at(cron: str, zone: str, due: datetime) -> Slot | None:
    """The slot due exactly at `due` (UTC), if the schedule has one then."""
    found = next(fire_times(cron, zone, due - timedelta(seconds=1), due), None)
    return Slot(due, previous_time(cron, zone, due), zone) if found == due else None


def fill_templates(text: str, slot: Slot) -> str:
    """`text` with each `{field}` of TEMPLATE_FIELDS replaced by the slot's value; other braces stay."""
    for field, value in slot.values().items():
        text = text.replace("{" + field + "}", value)
    return text
