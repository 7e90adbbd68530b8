"""Schedules with an injected clock: slots across DST changes, catch-up, deadlines, concurrency, pause, and
exactly one run per slot across restarts and racing schedulers (the state store is a real local folder)."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from llmbatch.errors import SpecError
from llmbatch.jobs.schedule_store import ScheduleStore
from llmbatch.jobs.scheduler import Scheduler, job_for_slot
from llmbatch.jobs.slots import slot_at, slots_between
from llmbatch.jobs.spec import validate_spec

UTC = timezone.utc


def _stamps(slots):
    return [s.stamp for s in slots]


def test_a_daily_slot_in_berlin_comes_once_a_day_across_both_dst_changes():
    autumn = slots_between("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 23, tzinfo=UTC),
                           datetime(2026, 10, 27, 12, tzinfo=UTC))
    # 02:30 came twice on the 25th (CEST, then CET): one slot; the 26th's is an hour later in UTC
    assert _stamps(autumn) == ["20261023T0030Z", "20261024T0030Z", "20261025T0030Z", "20261026T0130Z",
                               "20261027T0130Z"]
    assert [s.values()["ds"] for s in autumn] == ["2026-10-22", "2026-10-23", "2026-10-24", "2026-10-25",
                                                  "2026-10-26"]
    assert autumn[3].interval_start == autumn[2].due          # the interval spans the 25-hour day
    assert slot_at("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 25, 1, 30, tzinfo=UTC)) is None
    spring = slots_between("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 27, tzinfo=UTC),
                           datetime(2026, 3, 30, 12, tzinfo=UTC))
    # 02:30 did not exist on the 29th: that day's slot is due when the clocks jumped, 03:00 CEST
    assert _stamps(spring) == ["20260327T0130Z", "20260328T0130Z", "20260329T0100Z", "20260330T0030Z"]
    values = spring[2].values()
    assert values["data_interval_end"] == "2026-03-29T03:00:00+02:00" and values["slot"] == "20260329T0100Z"


def test_schedule_fields_are_checked_with_their_yaml_paths():
    base = {"name": "n", "model": {"source": "m"}, "input": {"path": "s3://in/{ds}/"}, "output": {"path": "/o"}}
    with pytest.raises(SpecError) as plain:
        validate_spec(base)
    assert plain.value.lines == ["input.path: {ds} is filled in per slot by a schedule; add a schedule section, "
                                 "or write the path out"]
    with pytest.raises(SpecError) as bad:
        validate_spec({**base, "schedule": {"cron": "0 25 * * *", "timezone": "Mars/Base", "catchup": "some",
                                            "starting_deadline": "soon", "concurrency": "queue"}})
    assert [line.split(":")[0] for line in bad.value.lines] == [
        "schedule.cron", "schedule.timezone", "schedule.catchup", "schedule.starting_deadline",
        "schedule.concurrency"]


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeCluster:
    """The runner's side of the Jobs API: runs by id, their Ray status, and manifests once committed."""

    def __init__(self):
        self.submitted: list[str] = []
        self.ray: dict[str, str] = {}
        self.committed: dict[str, dict] = {}
        self.stopped: list[str] = []
        self.lock = threading.Lock()

    def submit(self, spec, run_id, metadata, overwrite=False):
        from llmbatch.errors import UserError

        with self.lock:
            if self.ray.get(run_id) in ("PENDING", "RUNNING"):   # as the Jobs API: one live submission per run
                raise UserError(f"run {run_id} is still RUNNING on the cluster")
            self.submitted.append(run_id)
            self.ray[run_id] = "RUNNING"
            self.metadata = metadata
            self.spec = spec
        return run_id

    def status(self, run_id):
        return self.ray.get(run_id), None

    def stop(self, run_id):
        self.stopped.append(run_id)
        self.ray[run_id] = "STOPPED"

    def outcome(self, run_uri):
        return self.committed.get(run_uri.rsplit("/", 1)[-1])

    def finish(self, run_id, ok=10, error=0):
        self.ray[run_id] = "SUCCEEDED"
        self.committed[run_id] = {"status": "succeeded" if not error else "succeeded_with_errors",
                                  "rows_ok": ok, "rows_error": error, "wall_seconds": 42.0, "cost_usd": 0.01}


def _apply(store: ScheduleStore, applied: datetime, **schedule) -> None:
    job = validate_spec({"name": "nightly", "model": {"source": "m"},
                         "input": {"path": "s3://prompts/{ds}/"}, "output": {"path": "s3://results/{ds}"},
                         "schedule": {"cron": "0 2 * * *", **schedule}}).model_dump(mode="json")
    store.put_schedule("nightly", job, created_at=applied.isoformat())


def _setup(tmp_path, applied=datetime(2026, 12, 1, 12, tzinfo=UTC), **schedule):
    store = ScheduleStore(str(tmp_path / "state"))
    _apply(store, applied, **schedule)
    cluster = FakeCluster()
    clock = Clock(applied)
    return store, cluster, clock, Scheduler(store, cluster, clock)


def _statuses(store):
    return {r.slot: r.status for r in store.records("nightly")}


def test_a_slot_fires_once_with_its_templates_filled_and_its_outcome_lands_in_history(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path)
    clock.now = datetime(2026, 12, 2, 2, 0, 5, tzinfo=UTC)
    scheduler.tick()
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261202T0200Z"]
    assert cluster.spec.input.path == "s3://prompts/2026-12-01/" and cluster.spec.schedule is None
    assert cluster.spec.output.path == "s3://results/2026-12-01"
    assert cluster.metadata == {"schedule": "nightly", "slot": "20261202T0200Z", "cron": "0 2 * * *",
                                "timezone": "UTC"}
    cluster.finish("nightly-20261202T0200Z", ok=9, error=1)
    scheduler.tick()
    (record,) = store.records("nightly")
    assert (record.status, record.rows_ok, record.rows_error, record.cost_usd) == ("succeeded_with_errors", 9, 1,
                                                                                   0.01)
    assert [h["status"] for h in record.history] == ["submitted", "running"]


def test_after_an_outage_catchup_latest_runs_the_newest_slot_and_records_the_rest_missed(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, catchup="latest")
    clock.now = datetime(2026, 12, 5, 9, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261205T0200Z"]
    assert _statuses(store) == {"20261202T0200Z": "missed", "20261203T0200Z": "missed", "20261204T0200Z": "missed",
                                "20261205T0200Z": "submitted"}
    assert store.records("nightly")[-1].trigger == "catchup"


def test_catchup_all_runs_missed_slots_one_after_another_at_most_max_catchup(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, catchup="all", max_catchup=2, concurrency="forbid")
    clock.now = datetime(2026, 12, 5, 9, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261204T0200Z"]
    assert _statuses(store) == {"20261202T0200Z": "missed", "20261203T0200Z": "missed",
                                "20261204T0200Z": "submitted"}
    scheduler.tick()                                  # the first replay still runs: the next waits its turn
    assert cluster.submitted == ["nightly-20261204T0200Z"]
    cluster.finish("nightly-20261204T0200Z")
    clock.now += timedelta(minutes=30)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261204T0200Z", "nightly-20261205T0200Z"]


def test_catchup_none_runs_only_slots_seen_on_time(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, catchup="none")
    clock.now = datetime(2026, 12, 3, 9, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == [] and set(_statuses(store).values()) == {"missed"}
    clock.now = datetime(2026, 12, 4, 2, 1, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261204T0200Z"]


def test_a_slot_past_its_starting_deadline_is_missed(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, catchup="all", starting_deadline="3h")
    clock.now = datetime(2026, 12, 3, 4, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261203T0200Z"]
    record = store.record("nightly", "20261202T0200Z")
    assert record.status == "missed" and "starting_deadline (3h)" in record.reason


def test_forbid_skips_a_slot_that_comes_due_while_a_run_is_active(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, concurrency="forbid")
    clock.now = datetime(2026, 12, 2, 2, 1, tzinfo=UTC)
    scheduler.tick()
    clock.now = datetime(2026, 12, 3, 2, 1, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261202T0200Z"]
    record = store.record("nightly", "20261203T0200Z")
    assert record.status == "skipped" and "concurrency: forbid" in record.reason


def test_replace_stops_the_active_run_and_records_it_replaced(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, concurrency="replace")
    clock.now = datetime(2026, 12, 2, 2, 1, tzinfo=UTC)
    scheduler.tick()
    clock.now = datetime(2026, 12, 3, 2, 1, tzinfo=UTC)
    scheduler.tick()
    assert cluster.stopped == ["nightly-20261202T0200Z"]
    assert _statuses(store) == {"20261202T0200Z": "replaced", "20261203T0200Z": "submitted"}


def test_allow_runs_up_to_max_active_at_once_and_later_slots_wait(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, concurrency="allow", max_active=2, catchup="all")
    clock.now = datetime(2026, 12, 4, 3, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261202T0200Z", "nightly-20261203T0200Z"]
    assert store.record("nightly", "20261204T0200Z") is None           # waiting, not decided
    cluster.finish("nightly-20261202T0200Z")
    scheduler.tick()
    assert cluster.submitted[-1] == "nightly-20261204T0200Z"


def test_slots_of_a_paused_schedule_are_missed_and_resuming_goes_on_from_the_next(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path, paused=True)
    clock.now = datetime(2026, 12, 3, 3, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == [] and set(_statuses(store).values()) == {"missed"}
    assert store.record("nightly", "20261203T0200Z").reason == "the schedule was paused"
    _apply(store, datetime(2026, 12, 1, 12, tzinfo=UTC), paused=False)
    scheduler.tick()
    assert cluster.submitted == []
    clock.now = datetime(2026, 12, 4, 2, 1, tzinfo=UTC)
    scheduler.tick()
    assert cluster.submitted == ["nightly-20261204T0200Z"]


def test_a_restarted_scheduler_neither_repeats_nor_loses_a_slot(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path)
    clock.now = datetime(2026, 12, 2, 2, 1, tzinfo=UTC)
    scheduler.tick()
    restarted = Scheduler(ScheduleStore(str(tmp_path / "state")), cluster, clock)
    restarted.tick()
    assert cluster.submitted == ["nightly-20261202T0200Z"]
    # the cluster lost the run (a new head): after a grace period the same run id is submitted again
    del cluster.ray["nightly-20261202T0200Z"]
    restarted.tick()
    assert cluster.submitted == ["nightly-20261202T0200Z"]
    clock.now += timedelta(minutes=5)
    restarted.tick()
    assert cluster.submitted == ["nightly-20261202T0200Z", "nightly-20261202T0200Z"]
    # committed while the scheduler was away: the record takes the manifest's outcome, nothing is resubmitted
    cluster.finish("nightly-20261202T0200Z")
    del cluster.ray["nightly-20261202T0200Z"]
    restarted.tick()
    assert store.record("nightly", "20261202T0200Z").status == "succeeded" and len(cluster.submitted) == 2


def test_a_scheduler_that_submits_a_run_another_replica_just_submitted_keeps_its_record(tmp_path):
    store, cluster, clock, scheduler = _setup(tmp_path)
    clock.now = datetime(2026, 12, 2, 2, 1, tzinfo=UTC)
    scheduler.tick()
    record = store.record("nightly", "20261202T0200Z")
    spec = validate_spec(store.schedule("nightly")["job"])
    again = scheduler._submit(spec, slot_at("0 2 * * *", "UTC", datetime(2026, 12, 2, 2, tzinfo=UTC)), record)
    assert again.status == "submitted" and store.record("nightly", "20261202T0200Z").status == "submitted"
    assert cluster.submitted == ["nightly-20261202T0200Z"]


def test_two_schedulers_racing_on_one_state_fire_each_slot_once(tmp_path):
    store, cluster, clock, _ = _setup(tmp_path, catchup="all", concurrency="allow", max_active=10)
    clock.now = datetime(2026, 12, 6, 3, tzinfo=UTC)
    schedulers = [Scheduler(ScheduleStore(str(tmp_path / "state")), cluster, clock) for _ in range(4)]
    threads = [threading.Thread(target=s.tick) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(cluster.submitted) == [f"nightly-202612{d:02d}T0200Z" for d in range(2, 7)]


def test_a_slots_job_has_its_templates_filled_and_no_schedule():
    spec = validate_spec({"name": "nightly", "model": {"source": "m"}, "input": {"path": "/p/{ds}/{slot}.jsonl"},
                          "output": {"path": "/r/{data_interval_end}"},
                          "schedule": {"cron": "0 2 * * *", "timezone": "America/New_York"}})
    slot = slot_at("0 2 * * *", "America/New_York", datetime(2026, 12, 2, 7, tzinfo=UTC))
    job = job_for_slot(spec, slot)
    assert job.input.path == "/p/2026-12-01/20261202T0700Z.jsonl"
    assert job.output.path == "/r/2026-12-02T02:00:00-05:00" and job.schedule is None


class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, event, **kw):
        self.lines.append((event, kw))

    info = error = warning


def _api(tmp_path, clock_at=datetime(2026, 12, 5, 9, tzinfo=UTC)):
    from llmbatch.jobs.schedule_api import ScheduleApi, ensure_token

    store = ScheduleStore(str(tmp_path / "state"))
    cluster = FakeCluster()
    clock = Clock(clock_at)
    log = _Log()
    token = ensure_token(store)
    assert ensure_token(store) == token                   # made once
    return ScheduleApi(store, Scheduler(store, cluster, clock), token, log), token, cluster, clock, log


NIGHTLY = {"name": "nightly", "model": {"source": "m"}, "input": {"path": "s3://prompts/{ds}/"},
           "output": {"path": "s3://results/{ds}"}, "schedule": {"cron": "0 2 * * *"}}


def test_every_route_needs_the_bearer_token_and_a_refusal_is_logged_without_it(tmp_path):
    api, token, _, _, log = _api(tmp_path)
    for method, path in [("GET", "/schedules"), ("POST", "/schedules"), ("POST", "/schedules/nightly/trigger"),
                         ("GET", "/schedules/nightly/history"), ("DELETE", "/schedules/nightly")]:
        assert api.handle(method, path, {}, None)[0] == 401
        assert api.handle(method, path, {}, "Bearer not-the-token")[0] == 401
    assert len(log.lines) == 10 and token not in repr(log.lines) and "not-the-token" not in repr(log.lines)
    assert api.handle("GET", "/schedules", None, f"Bearer {token}") == (200, [])


def test_apply_list_pause_resume_trigger_and_history_through_the_api(tmp_path):
    api, token, cluster, clock, _ = _api(tmp_path)
    auth = f"Bearer {token}"
    assert api.handle("POST", "/schedules", {"job": NIGHTLY}, auth) == (200, {"name": "nightly",
                                                                              "applied": "created"})
    assert api.handle("POST", "/schedules", {"job": NIGHTLY}, auth)[1]["applied"] == "updated"
    status, applied = api.handle("GET", "/schedules/nightly", None, auth)
    assert status == 200 and applied["job"]["schedule"]["cron"] == "0 2 * * *"
    status, bad = api.handle("POST", "/schedules", {"job": {**NIGHTLY, "schedule": {"cron": "nope"}}}, auth)
    assert status == 400 and bad["error"][0].startswith("schedule.cron:")
    status, listed = api.handle("GET", "/schedules", None, auth)
    assert listed[0]["name"] == "nightly" and listed[0]["next_slot"] == "2026-12-06T02:00:00+00:00"
    assert api.handle("POST", "/schedules/nightly/pause", None, auth)[1] == {"name": "nightly", "paused": True}
    assert api.handle("GET", "/schedules", None, auth)[1][0]["paused"] is True
    api.handle("POST", "/schedules/nightly/resume", None, auth)
    status, fired = api.handle("POST", "/schedules/nightly/trigger", None, auth)
    assert status == 200 and fired["run_id"] == "nightly-20261205T0900Z" and fired["trigger"] == "manual"
    assert cluster.spec.input.path == "s3://prompts/2026-12-05/"     # since the schedule's slot before
    assert api.handle("POST", "/schedules/nightly/trigger", None, auth)[0] == 400   # the same minute: once
    status, history = api.handle("GET", "/schedules/nightly/history", None, auth)
    assert [r["slot"] for r in history] == ["20261205T0900Z"]
    assert api.handle("GET", "/schedules/other/history", None, auth)[0] == 200   # no records yet
    assert api.handle("POST", "/schedules/other/trigger", None, auth)[0] == 404


def test_backfill_runs_each_slot_of_a_range_at_most_max_active_at_once_and_reprocesses_on_request(tmp_path):
    api, token, cluster, clock, _ = _api(tmp_path)
    auth = f"Bearer {token}"
    api.handle("POST", "/schedules", {"job": NIGHTLY}, auth)
    status, plan = api.handle("POST", "/schedules/nightly/backfill",
                              {"from": "2026-11-01", "to": "2026-11-03T23:59", "dry_run": True}, auth)
    assert status == 200 and [s["slot"] for s in plan["slots"]] == ["20261101T0200Z", "20261102T0200Z",
                                                                    "20261103T0200Z"]
    assert plan["backfill"] is None and cluster.submitted == []
    api.handle("POST", "/schedules/nightly/backfill",
               {"from": "2026-11-01", "to": "2026-11-03T23:59", "max_active": 2}, auth)
    api.scheduler.tick()
    assert cluster.submitted[:2] == ["nightly-20261101T0200Z", "nightly-20261102T0200Z"]
    backfilled = [r for r in api.store.records("nightly") if r.trigger == "backfill"]
    assert len(backfilled) == 2
    cluster.finish("nightly-20261101T0200Z")
    api.scheduler.tick()
    assert "nightly-20261103T0200Z" in cluster.submitted and api.store.backfills("nightly") == []
    for run_id in ("nightly-20261102T0200Z", "nightly-20261103T0200Z"):
        cluster.finish(run_id)
    api.scheduler.tick()
    before = len(cluster.submitted)
    _, kept = api.handle("POST", "/schedules/nightly/backfill", {"from": "2026-11-01", "to": "2026-11-01"}, auth)
    assert [s["action"] for s in kept["slots"]] == ["keep"] and kept["backfill"] is None
    _, again = api.handle("POST", "/schedules/nightly/backfill",
                          {"from": "2026-11-01", "to": "2026-11-01", "reprocess": "completed"}, auth)
    assert [s["action"] for s in again["slots"]] == ["rerun"]
    api.scheduler.tick()
    api.scheduler.tick()
    assert cluster.submitted[before:] == ["nightly-20261101T0200Z"]     # once, however many ticks
    status, bad = api.handle("POST", "/schedules/nightly/backfill", {"from": "yesterday", "to": "2026-11-01"}, auth)
    assert status == 400 and bad["error"][0].startswith("--from:")


def test_the_nightly_example_is_a_valid_schedule_whose_paths_fill_per_slot():
    from pathlib import Path

    from llmbatch.jobs.spec import load_spec

    spec = load_spec(Path(__file__).parents[2] / "jobs" / "nightly-example.yaml")
    assert spec.schedule.cron == "0 2 * * *" and spec.cache is not None
    slot = slot_at("0 2 * * *", "Europe/Berlin", datetime(2026, 12, 5, 1, tzinfo=UTC))
    job = job_for_slot(spec, slot)
    assert job.input.path == "s3://my-bucket/prompts/2026-12-04/"


def test_a_raycronjob_export_carries_the_cron_the_zone_and_its_gaps():
    import base64

    import yaml

    from llmbatch.jobs.kuberay_export import raycronjob_manifest

    spec = validate_spec(NIGHTLY)
    text = raycronjob_manifest(spec, "llmbatch:1", "prod")
    assert text.startswith("# Exported by `llmbatch schedule export --kuberay`")
    assert "feature gate is off by default" in text and "kuberay#4849" in text
    manifest = yaml.safe_load(text)
    assert (manifest["kind"], manifest["spec"]["schedule"], manifest["spec"]["timeZone"]) == ("RayCronJob",
                                                                                             "0 2 * * *", "UTC")
    template = manifest["spec"]["jobTemplate"]
    assert template["clusterSelector"] == {"ray.io/cluster": "prod"}
    shipped = template["entrypoint"].split("--job-base64 ", 1)[1]
    assert validate_spec(yaml.safe_load(base64.b64decode(shipped))).name == "nightly"


def test_validate_plan_and_submit_take_a_scheduled_job_at_its_latest_slot(capsys):
    from llmbatch.jobs.schedule_cli import latest_slot

    spec = validate_spec({**NIGHTLY, "schedule": {"cron": "* * * * *"}})
    filled = latest_slot(spec)
    now = datetime.now(UTC)
    assert filled.schedule is None and filled.input.path in {
        f"s3://prompts/{(now - timedelta(minutes=k)).strftime('%Y-%m-%d')}/" for k in (0, 1, 2)}
    assert "has a schedule; this runs it once, for its latest slot" in capsys.readouterr().err
    plain = validate_spec({**NIGHTLY, "input": {"path": "s3://p/"}, "output": {"path": "s3://r"},
                           "schedule": None})
    assert latest_slot(plain) is plain
