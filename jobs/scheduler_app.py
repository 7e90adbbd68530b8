"""The scheduler as a Ray Serve application: a loop that ticks (jobs/scheduler.py) and the HTTP API
(jobs/schedule_api.py) in one deployment. It holds nothing that matters in memory: schedules, slot records and
the API token live in the state store, so a replica that restarts, or a second replica, picks up where it was.
Its health check fails when the loop has died or stopped ticking, and Serve replaces the replica."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

from ray import serve

APP_NAME = "llmbatch-scheduler"
ROUTE_PREFIX = "/llmbatch-scheduler"
DEFAULT_TICK_SECONDS = 15.0
STALE_TICKS = 10          # the health check fails when the loop has not ticked for this many intervals


@serve.deployment(name="scheduler", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  health_check_period_s=10, health_check_timeout_s=30)
class SchedulerApp:
    def __init__(self, state: str, jobs_address: str, tick_seconds: float = DEFAULT_TICK_SECONDS):
        import structlog

        from llmbatch.jobs.logs import configure_logging
        from llmbatch.jobs.remote import JobsApiRunner
        from llmbatch.jobs.schedule_api import ScheduleApi, ensure_token
        from llmbatch.jobs.schedule_store import ScheduleStore
        from llmbatch.jobs.scheduler import Scheduler

        configure_logging("json")
        self.log = structlog.get_logger().bind(app=APP_NAME)
        store = ScheduleStore(state)
        self.scheduler = Scheduler(store, JobsApiRunner(jobs_address), log=self.log)
        self.api = ScheduleApi(store, self.scheduler, ensure_token(store), self.log)
        self.tick_seconds = tick_seconds
        self.last_tick = time.monotonic()
        self.loop_error: str | None = None
        self.stopping = threading.Event()
        self.loop = threading.Thread(target=self._run, name="scheduler-loop", daemon=True)
        self.loop.start()
        self.log.info("scheduler_started", state=state, jobs_address=jobs_address, tick_s=tick_seconds)

    def _run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.scheduler.tick()
            except Exception as exc:   # the next tick tries again; the health check watches the gap
                self.log.error("scheduler_tick_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                self.last_tick = time.monotonic()
            self.stopping.wait(max(0.0, self.tick_seconds - (time.monotonic() - started)))

    def check_health(self) -> None:
        if not self.loop.is_alive():
            raise RuntimeError("the scheduler loop has stopped")
        idle = time.monotonic() - self.last_tick
        if idle > STALE_TICKS * self.tick_seconds:
            raise RuntimeError(f"the scheduler loop has not ticked for {idle:.0f} s")

    def __del__(self) -> None:
        self.stopping.set()

    async def __call__(self, request) -> Any:
        from starlette.responses import JSONResponse

        body: dict[str, Any] | None = None
        raw = await request.body()
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return JSONResponse({"error": ["the request body is not JSON"]}, status_code=400)
        path = request.url.path
        if path.startswith(ROUTE_PREFIX):
            path = path[len(ROUTE_PREFIX):] or "/"
        status, answer = self.api.handle(request.method, path, body, request.headers.get("authorization"))
        return JSONResponse(answer, status_code=status)


def build(args: dict[str, Any]):
    """The app from a Serve config's `args` (state, jobs_address, tick_seconds): how a KubeRay RayService
    declares it (cluster/deploy/kuberay/rayservice-scheduler.yaml)."""
    return SchedulerApp.bind(str(args["state"]), str(args["jobs_address"]),
                             float(args.get("tick_seconds", DEFAULT_TICK_SECONDS)))


def deploy(state: str, jobs_address: str, tick_seconds: float, http_host: str, http_port: int) -> None:
    """Start (or update) the app on the cluster this process is connected to."""
    serve.start(http_options={"host": http_host, "port": http_port})
    serve.run(SchedulerApp.bind(state, jobs_address, tick_seconds), name=APP_NAME, route_prefix=ROUTE_PREFIX,
              blocking=False)
