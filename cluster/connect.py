"""Starting (or joining) the Ray that runs a job."""
from __future__ import annotations

import os

import ray
import ray.data


def start_local_ray(*, show_worker_logs: bool = False) -> dict:
    """An embedded single-machine Ray for this process; returns its resources."""
    # A RAY_ADDRESS in the environment means a cluster; the embedded runtime must not join it.
    if ray.is_initialized():
        return ray.cluster_resources()
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=show_worker_logs,
        logging_level="WARNING",
        configure_logging=True,
    )
    quiet_ray_data()
    return ray.cluster_resources()


def join_cluster(*, show_worker_logs: bool = True) -> dict:
    """Join the Ray cluster this process was submitted to (as a Jobs API entrypoint)."""
    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=show_worker_logs, logging_level="WARNING")
    quiet_ray_data()
    return ray.cluster_resources()


def alive_nodes() -> dict[str, dict[str, float]]:
    """Node id -> total resources, for each alive node."""
    return {node["NodeID"]: dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")}


def quiet_ray_data() -> None:
    """llmbatch reports progress itself; Ray Data's own bars and execution logs go to its log files."""
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.llm"):
        logging.getLogger(name).setLevel(logging.WARNING)

