"""`llmbatch scheduler ...` (the Serve app on a cluster) and `llmbatch schedule ...` (its schedules, over its
HTTP API)."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

import click

from llmbatch.errors import UserError

URL_ENV = "LLMBATCH_SCHEDULER_URL"
TOKEN_ENV = "LLMBATCH_SCHEDULER_TOKEN"
DEFAULT_HTTP_PORT = 8000
DEPLOY_TIMEOUT_SECONDS = 300.0
STATE_HELP = "Where the scheduler keeps its state: an s3:// prefix or a folder every node sees " \
             "(default: $LLMBATCH_SCHEDULER_STATE)."
ADDRESS_HELP = "Ray Jobs API address of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)."


def _jobs_address(address: str | None) -> str:
    from llmbatch.cluster.jobs_api import required_address

    return required_address(address, "the scheduler runs on a Ray cluster; `ray start --head` makes a local one")


def _store(state: str | None):
    from llmbatch.jobs.schedule_store import ScheduleStore, state_root

    return ScheduleStore(state_root(state))


def latest_slot(spec):
    """A job with a schedule, as `validate`, `plan` and `submit` take it: its paths filled in for the slot due
    most recently (said on stderr); the schedule itself runs only on the scheduler."""
    if spec.schedule is None:
        return spec
    from datetime import datetime, timedelta, timezone

    from llmbatch.jobs.scheduler import job_for_slot
    from llmbatch.jobs.slots import previous_time, slot_at

    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    due = previous_time(spec.schedule.cron, spec.schedule.timezone, now + timedelta(minutes=1))
    slot = slot_at(spec.schedule.cron, spec.schedule.timezone, due)
    if slot is None:
        return spec
    filled = job_for_slot(spec, slot)
    click.echo(f"note: {spec.name} has a schedule; this runs it once, for its latest slot {slot.stamp} "
               f"(ds {slot.values()['ds']}): input {filled.input.path}", err=True)
    return filled


@click.group("scheduler")
def scheduler() -> None:
    """The scheduler: a Ray Serve app that runs applied schedules (deploy, status, delete)."""


@scheduler.command("deploy")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--state", help=STATE_HELP)
@click.option("--jobs-address", help="The Jobs API address as the cluster's nodes reach it (default: --address).")
@click.option("--tick-seconds", type=float, default=15.0, show_default=True, help="How often slots are checked.")
@click.option("--http-host", default="0.0.0.0", show_default=True, help="Where Serve's HTTP proxy listens.")
@click.option("--http-port", type=int, default=DEFAULT_HTTP_PORT, show_default=True)
def deploy(address: str | None, state: str | None, jobs_address: str | None, tick_seconds: float, http_host: str,
           http_port: int) -> None:
    """Start the scheduler on a Ray cluster, or update it (a Ray job deploys the Serve app and ends)."""
    from llmbatch.jobs.remote import submit_command, wait_until_done
    from llmbatch.jobs.schedule_api import ensure_token
    from llmbatch.jobs.scheduler_app import ROUTE_PREFIX
    from llmbatch.redact import strip_url_credentials

    target = _jobs_address(address)
    store = _store(state)
    ensure_token(store)
    submission = f"llmbatch-scheduler-deploy-{int(time.time())}"
    submit_command(target, ["scheduler", "serve", "--state", store.root, "--jobs-address", jobs_address or target,
                            "--tick-seconds", str(tick_seconds), "--http-host", http_host,
                            "--http-port", str(http_port)],
                   submission, {"llmbatch": "scheduler"})
    status, logs = wait_until_done(target, submission, DEPLOY_TIMEOUT_SECONDS)
    if status != "SUCCEEDED":
        tail = "\n".join(logs.strip().splitlines()[-15:])
        raise UserError(f"the scheduler's deploy job {submission} ended {status}:\n{tail}")
    host = urlparse(target).hostname or "127.0.0.1"
    click.echo(f"scheduler deployed; its API: http://{host}:{http_port}{ROUTE_PREFIX} "
               f"(bearer token: {store.root}/api-token); state: {strip_url_credentials(store.root)}")


@scheduler.command("serve", hidden=True)
@click.option("--state", required=True)
@click.option("--jobs-address", required=True)
@click.option("--tick-seconds", type=float, required=True)
@click.option("--http-host", required=True)
@click.option("--http-port", type=int, required=True)
def serve_app(state: str, jobs_address: str, tick_seconds: float, http_host: str, http_port: int) -> None:
    """Runs on the cluster, in the deploy job: starts the Serve app."""
    import ray

    from llmbatch.jobs.scheduler_app import deploy as deploy_app

    ray.init(address="auto")
    deploy_app(state, jobs_address, tick_seconds, http_host, http_port)
    click.echo("scheduler app deployed")


@scheduler.command("undeploy", hidden=True)
def undeploy_app() -> None:
    """Runs on the cluster, in the delete job: removes the Serve app."""
    import ray
    from ray import serve

    from llmbatch.jobs.scheduler_app import APP_NAME

    ray.init(address="auto")
    serve.delete(APP_NAME)
    click.echo("scheduler app deleted")


@scheduler.command("status")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--url", help=f"The scheduler's API (default: ${URL_ENV}, else port {DEFAULT_HTTP_PORT} of --address's host).")
@click.option("--state", help=STATE_HELP)
def status(address: str | None, url: str | None, state: str | None) -> None:
    """Whether the scheduler answers, and its schedules."""
    schedules = _client(address, url, state).call("GET", "/schedules")
    click.echo(f"scheduler: answering; {len(schedules)} schedule(s)")
    _print_schedules(schedules)


@scheduler.command("delete")
@click.option("--address", help=ADDRESS_HELP)
def delete(address: str | None) -> None:
    """Remove the scheduler from the cluster (its state, schedules and history stay in the state store)."""
    from llmbatch.jobs.remote import submit_command, wait_until_done

    target = _jobs_address(address)
    submission = f"llmbatch-scheduler-delete-{int(time.time())}"
    submit_command(target, ["scheduler", "undeploy"], submission, {"llmbatch": "scheduler"})
    status, logs = wait_until_done(target, submission, DEPLOY_TIMEOUT_SECONDS)
    if status != "SUCCEEDED":
        raise UserError(f"the scheduler's delete job {submission} ended {status}: {logs.strip()[-2000:]}")
    click.echo("scheduler deleted; its state store keeps the schedules and their history")


class ScheduleClient:
    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                lines = json.loads(exc.read()).get("error") or [str(exc)]
            except (ValueError, AttributeError):
                lines = [f"no scheduler answers at {self.url} (HTTP {exc.code}: Serve has no such app); deploy it "
                         "with `llmbatch scheduler deploy`, or pass --url"]
            if exc.code == 401:
                lines = [f"the scheduler at {self.url} refused the token; use its state's api-token (--state) or "
                         f"set {TOKEN_ENV}"]
            raise UserError(lines[0], lines=lines) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"no scheduler answers at {self.url} ({reason}); deploy it with `llmbatch scheduler "
                            f"deploy`, or pass --url") from None


def _client(address: str | None, url: str | None, state: str | None) -> ScheduleClient:
    from llmbatch.jobs.scheduler_app import ROUTE_PREFIX

    url = url or os.environ.get(URL_ENV)
    if not url:
        host = urlparse(_jobs_address(address)).hostname or "127.0.0.1"
        url = f"http://{host}:{DEFAULT_HTTP_PORT}{ROUTE_PREFIX}"
    token = os.environ.get(TOKEN_ENV)
    if not token:
        from llmbatch.jobs.schedule_api import TOKEN_FILE

        try:
            token = _store(state).read_file(TOKEN_FILE).decode().strip()
        except FileNotFoundError:
            raise UserError(f"no api-token in the scheduler's state; deploy the scheduler first, or set "
                            f"{TOKEN_ENV}") from None
    return ScheduleClient(url, token)


def _print_schedules(schedules: list[dict[str, Any]]) -> None:
    for s in schedules:
        state = "paused" if s["paused"] else "active"
        click.echo(f"{s['name']:<24} {s['cron']:<14} {s['timezone']:<16} {state:<7} next {s['next_slot'] or '-'}  "
                   f"last {s['last_slot'] or '-'} {s['last_status'] or ''}")


def _api_options(fn):
    for option in reversed([
        click.option("--address", help=ADDRESS_HELP),
        click.option("--url", help=f"The scheduler's API (default: ${URL_ENV}, else port {DEFAULT_HTTP_PORT} of "
                                   "--address's host)."),
        click.option("--state", help=STATE_HELP + " Its api-token is the bearer token, unless "
                                                  f"${TOKEN_ENV} is set."),
    ]):
        fn = option(fn)
    return fn


@click.group("schedule")
def schedule() -> None:
    """Schedules on the deployed scheduler: apply, list, pause, resume, trigger, history, backfill, export."""


@schedule.command("apply")
@click.argument("job_file", type=click.Path(dir_okay=False))
@_api_options
def apply(job_file: str, address: str | None, url: str | None, state: str | None) -> None:
    """Add a job file with a `schedule:` section, or update the schedule of that name."""
    from llmbatch.jobs.spec import load_spec

    spec = load_spec(job_file)
    if spec.schedule is None:
        raise UserError(f"{job_file}: schedule: the job file has no schedule section (see `llmbatch spec`)")
    answer = _client(address, url, state).call("POST", "/schedules", {"job": spec.model_dump(mode="json")})
    click.echo(f"schedule {answer['name']} {answer['applied']}: {spec.schedule.cron} ({spec.schedule.timezone})")


@schedule.command("list")
@_api_options
def list_schedules(address: str | None, url: str | None, state: str | None) -> None:
    """Every schedule: cron, timezone, paused or not, next slot, last outcome."""
    _print_schedules(_client(address, url, state).call("GET", "/schedules"))


def _verb(verb: str, summary: str):
    @schedule.command(verb, help=summary)
    @click.argument("name")
    @_api_options
    def command(name: str, address: str | None, url: str | None, state: str | None) -> None:
        answer = _client(address, url, state).call("POST", f"/schedules/{name}/{verb}")
        if verb == "trigger":
            click.echo(f"triggered {name}: slot {answer['slot']}, run {answer['run_id']} ({answer['status']})")
        else:
            click.echo(f"schedule {name} {'paused' if answer['paused'] else 'resumed'}")

    return command


_verb("pause", "Stop firing NAME's slots (they are recorded missed) until resumed.")
_verb("resume", "Fire NAME's slots again, from the next one due.")
_verb("trigger", "Run a slot of NAME now, out of schedule (run id NAME-<this minute>).")


@schedule.command("history")
@click.argument("name")
@click.option("--limit", type=int, default=30, show_default=True)
@_api_options
def history(name: str, limit: int, address: str | None, url: str | None, state: str | None) -> None:
    """NAME's slots, newest first: run id, status, rows ok/error, duration, cost."""
    records = _client(address, url, state).call("GET", f"/schedules/{name}/history")[:limit]
    click.echo(f"{'slot':<16} {'run id':<40} {'status':<22} {'ok/error':<12} {'duration':<10} {'cost':<9} trigger")
    for r in records:
        rows = f"{r['rows_ok']}/{r['rows_error']}" if r["rows_ok"] is not None else "-"
        took = f"{r['wall_seconds']:.0f}s" if r["wall_seconds"] is not None else "-"
        cost = f"${r['cost_usd']:.4f}" if r["cost_usd"] is not None else "-"
        click.echo(f"{r['slot']:<16} {r['run_id']:<40} {r['status']:<22} {rows:<12} {took:<10} {cost:<9} "
                   f"{r['trigger']}{'  (' + r['reason'] + ')' if r['reason'] else ''}")


@schedule.command("backfill")
@click.argument("name")
@click.option("--from", "start", required=True, help="First slot time: 2026-11-01 or 2026-11-01T02:00 (UTC "
                                                     "unless it has an offset).")
@click.option("--to", "end", required=True, help="Last slot time (a date alone: to that day's end).")
@click.option("--reprocess", type=click.Choice(["none", "failed", "completed"]), default="none", show_default=True,
              help="Slots that have a record: none = keep them, failed = run failed, missed and skipped ones "
                   "again, completed = run every one again (overwriting committed runs).")
@click.option("--max-active", type=int, default=1, show_default=True, help="Backfill runs at once.")
@click.option("--dry-run", is_flag=True, help="Print the slots and what would happen to each; run nothing.")
@_api_options
def backfill(name: str, start: str, end: str, reprocess: str, max_active: int, dry_run: bool,
             address: str | None, url: str | None, state: str | None) -> None:
    """Run NAME's slots between two times (the scheduler starts them, at most --max-active at once)."""
    answer = _client(address, url, state).call("POST", f"/schedules/{name}/backfill", {
        "from": start, "to": end, "reprocess": reprocess, "max_active": max_active, "dry_run": dry_run})
    for s in answer["slots"]:
        click.echo(f"{s['slot']:<16} {s['status'] or 'no run':<22} {s['action']}")
    runs = sum(1 for s in answer["slots"] if s["action"] != "keep")
    if dry_run:
        click.echo(f"dry run: {runs} slot(s) would run")
    else:
        click.echo(f"backfill {answer['backfill'] or '-'}: {runs} slot(s) to run, {max_active} at once")


@schedule.command("export")
@click.argument("name_or_job_file")
@click.option("--kuberay", is_flag=True, required=True, help="As a KubeRay RayCronJob manifest.")
@click.option("--image", default="llmbatch:latest", show_default=True, help="The container image with llmbatch.")
@click.option("--cluster", default="llmbatch", show_default=True, help="The RayCluster the runs go to (its name).")
@_api_options
def export(name_or_job_file: str, kuberay: bool, image: str, cluster: str, address: str | None, url: str | None,
           state: str | None) -> None:
    """Print a KubeRay RayCronJob manifest for a schedule (NAME, as applied to the scheduler) or a job file's,
    for teams that schedule on KubeRay."""
    from llmbatch.jobs.kuberay_export import raycronjob_manifest
    from llmbatch.jobs.spec import load_spec, validate_spec

    if os.path.isfile(name_or_job_file):
        spec = load_spec(name_or_job_file)
    else:
        spec = validate_spec(_client(address, url, state).call("GET", f"/schedules/{name_or_job_file}")["job"])
    if spec.schedule is None:
        raise UserError(f"{name_or_job_file}: schedule: the job file has no schedule section")
    click.echo(raycronjob_manifest(spec, image, cluster), nl=False)


@schedule.command("run-slot", hidden=True)
@click.option("--job-base64", required=True)
def run_slot(job_base64: str) -> None:
    """Runs in a RayJob a RayCronJob made: the slot due now, under its own run id, on this cluster."""
    import base64
    from datetime import datetime, timedelta, timezone

    import structlog
    import yaml

    from llmbatch.jobs.run import run_job
    from llmbatch.jobs.scheduler import job_for_slot
    from llmbatch.jobs.slots import previous_time, run_id_for, slot_at
    from llmbatch.jobs.spec import validate_spec

    spec = validate_spec(yaml.safe_load(base64.b64decode(job_base64)))
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    due = previous_time(spec.schedule.cron, spec.schedule.timezone, now + timedelta(minutes=1))
    slot = slot_at(spec.schedule.cron, spec.schedule.timezone, due)
    result = run_job(job_for_slot(spec, slot), run_id_for(spec.name, slot), log=structlog.get_logger(),
                     on_cluster=True)
    click.echo(f"slot {slot.stamp}: {result.status}")
