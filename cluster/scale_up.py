"""Autoscaling clusters: a job whose replicas the cluster cannot hold yet asks Ray's autoscaler for their
bundles and waits for the nodes, instead of failing at once (or, with `accelerator: auto`, silently running on
CPU because the GPU worker group stands at zero)."""
from __future__ import annotations

import time
from typing import Any, Callable

from llmbatch.cluster.resources import ReplicaShape, check_fits
from llmbatch.errors import UserError

Nodes = dict[str, dict[str, float]]
DEFAULT_SCALE_UP_TIMEOUT = "15m"   # when the cluster publishes its node types and the job sets no timeout
POLL_SECONDS = 5.0
REPORT_SECONDS = 30.0


def node_groups() -> list[dict[str, float]] | None:
    """The resources of each node type the cluster's autoscaler may still add, from the cluster config published
    to Ray's GCS (as Ray Data and Ray Train read it); None when none is published, which is so on a fixed
    cluster and also on Ray 2.60's own autoscalers (v1 and v2), which act on requests all the same."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without the call: treated as a fixed cluster
        return None
    if config is None or not config.node_group_configs:
        return None
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def groups_can_host(shape: ReplicaShape, groups: list[dict[str, float]], accelerator_type: str | None) -> bool:
    """Whether a node of one of the autoscaler's types holds one replica."""
    from llmbatch.cluster.resources import can_host

    return any(can_host(shape, group, accelerator_type) for group in groups)


def accelerator_to_come(requested: str, cluster: dict[str, float], groups: list[dict[str, float]] | None) -> str | None:
    """For `accelerator: auto` on a cluster whose GPU nodes stand at zero but may be added: gpu."""
    if requested == "auto" and cluster.get("GPU", 0) < 1 and groups and any(g.get("GPU", 0) > 0 for g in groups):
        return "gpu"
    return None


def replica_bundles(shape: ReplicaShape, replicas: int, accelerator_type: str | None) -> list[dict[str, float]]:
    """What to ask the autoscaler for: one bundle per engine worker, on the pinned GPU type when there is one."""
    bundle = dict(shape.bundle)
    if accelerator_type:
        bundle[f"accelerator_type:{accelerator_type}"] = 0.001
    return [dict(bundle) for _ in range(shape.workers_per_replica * replicas)]


def totals(nodes: Nodes) -> dict[str, float]:
    summed: dict[str, float] = {}
    for resources in nodes.values():
        for key, amount in resources.items():
            summed[key] = summed.get(key, 0.0) + amount
    return summed


def wait_for_nodes(shape: ReplicaShape, replicas: int, accelerator_type: str | None, timeout_seconds: float, *,
                   nodes_now: Callable[[], Nodes], request: Callable[[list[dict[str, float]]], Any], log,
                   ask: int | None = None, sleep: Callable[[float], Any] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> tuple[Nodes, bool]:
    """(the alive nodes once they hold `replicas` replicas, whether the autoscaler was asked). Until they do,
    the autoscaler is asked for `ask` replicas (at least `replicas`) and progress is logged every
    REPORT_SECONDS. Raises UserError after `timeout_seconds`."""
    nodes = nodes_now()
    try:
        check_fits(shape, replicas, totals(nodes), list(nodes.values()), accelerator_type)
        return nodes, False
    except UserError as first:
        missing = str(first)
    request(replica_bundles(shape, max(replicas, ask or 0), accelerator_type))
    try:
        return _wait(shape, replicas, accelerator_type, timeout_seconds, missing, nodes_now, log, sleep, clock), True
    except BaseException:  # a run that will not use the nodes must not keep them asked for
        request([])
        raise


def _wait(shape: ReplicaShape, replicas: int, accelerator_type: str | None, timeout_seconds: float, missing: str,
          nodes_now: Callable[[], Nodes], log, sleep: Callable[[float], Any], clock: Callable[[], float]) -> Nodes:
    started = last_report = clock()
    log.info("waiting_for_nodes", replicas=replicas, why=missing, timeout_s=timeout_seconds,
             note="asked the autoscaler for the replicas' resources")
    while True:
        sleep(POLL_SECONDS)
        nodes = nodes_now()
        try:
            check_fits(shape, replicas, totals(nodes), list(nodes.values()), accelerator_type)
            log.info("nodes_ready", waited_s=round(clock() - started, 1), nodes=len(nodes))
            return nodes
        except UserError as exc:
            missing = str(exc)
        waited = clock() - started
        if waited >= timeout_seconds:
            raise UserError(f"resources.scale_up_timeout: the cluster did not grow to hold {replicas} replica(s) in "
                            f"{timeout_seconds:g} s ({missing}); check the autoscaler: the worker group's "
                            "max_workers, its instance type's GPUs, the cloud's quota or capacity")
        if clock() - last_report >= REPORT_SECONDS:
            last_report = clock()
            have = totals(nodes)
            log.info("waiting_for_nodes", waited_s=round(waited), gpus=have.get("GPU", 0), cpus=have.get("CPU", 0),
                     nodes=len(nodes), why=missing)


def ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ray's autoscaler request; an empty list withdraws it, so the nodes can scale down after the run."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
