"""Starting (or joining) the Ray that runs a job."""
from __future__ import annotations

import os

import ray
import ray.data
import structlog


OPEN_EMBEDDED_RAY = ("RAY_AUTH_MODE=disabled: this run's embedded Ray listens on every network interface (Ray has "
                     "no setting to bind it to loopback) and takes requests without a token, so anyone who can "
                     "reach this machine can run code in it; unset RAY_AUTH_MODE to keep Ray's token "
                     "authentication on")


def embedded_ray_warning(env: dict[str, str]) -> str | None:
    """What is unsafe about starting the embedded Ray under `env`."""
    return OPEN_EMBEDDED_RAY if env.get("RAY_AUTH_MODE", "").strip().lower() == "disabled" else None


_dashboard_url: str | None = None


def dashboard_url() -> str | None:
    """The embedded Ray's dashboard, when `start_local_ray` started one."""
    return _dashboard_url


def start_local_ray(*, show_worker_logs: bool = False, dashboard: bool = False) -> dict:
    """An embedded single-machine Ray for this process; returns its resources. Its servers listen on every
    interface, and, with Ray's token authentication (the default), refuse any client without this machine's
    token (~/.ray/auth_token). With `dashboard`, Ray's dashboard runs too (see `dashboard_url`)."""
    # A RAY_ADDRESS in the environment means a cluster; the embedded runtime must not join it.
    if ray.is_initialized():
        return ray.cluster_resources()
    warning = embedded_ray_warning(dict(os.environ))
    if warning:
        structlog.get_logger().warning("embedded_ray_open", note=warning)
    context = ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=dashboard,
        log_to_driver=show_worker_logs,
        logging_level="WARNING",
        configure_logging=True,
    )
    global _dashboard_url
    _dashboard_url = f"http://{context.dashboard_url}" if dashboard and context.dashboard_url else None
    quiet_ray_data()
    tolerate_replica_start_failures()
    return ray.cluster_resources()


def join_cluster(*, show_worker_logs: bool = True) -> dict:
    """Join the Ray cluster this process was submitted to (as a Jobs API entrypoint)."""
    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=show_worker_logs, logging_level="WARNING")
    quiet_ray_data()
    tolerate_replica_start_failures()
    return ray.cluster_resources()


def alive_nodes() -> dict[str, dict[str, float]]:
    """Node id -> total resources, for each alive node."""
    return {node["NodeID"]: dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")}


REPLICA_START_DEATHS_TOLERATED = 2


def tolerate_replica_start_failures() -> None:
    """A replica whose start fails (a node's driver, a flaky GPU, an OOM while loading) is replaced, up to
    REPLICA_START_DEATHS_TOLERATED times in a row per stage, instead of ending the run (Ray Data's default is 0);
    a start that fails every time still fails the run, with the last replica's error."""
    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = REPLICA_START_DEATHS_TOLERATED


def quiet_ray_data() -> None:
    """llmbatch reports progress itself; Ray Data's own bars and execution logs go to its log files."""
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.llm"):
        logging.getLogger(name).setLevel(logging.WARNING)

