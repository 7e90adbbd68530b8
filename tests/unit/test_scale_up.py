"""Autoscaling clusters: what is asked of the autoscaler, how long the run waits, and when it gives up."""
from __future__ import annotations

import pytest
from structlog.testing import capture_logs

import structlog
from llmbatch.cluster.resources import replica_shape
from llmbatch.cluster.scale_up import (POLL_SECONDS, accelerator_to_come, groups_can_host, replica_bundles,
                                       wait_for_nodes)
from llmbatch.errors import UserError

CPU_HEAD = {"head": {"CPU": 8, "memory": 3e10}}
GPU_NODE = {"CPU": 16, "GPU": 8, "accelerator_type:H100": 1}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_bundles_ask_for_every_engine_worker_on_the_pinned_type():
    bundles = replica_bundles(replica_shape("gpu", 2), 3, "H100")
    assert len(bundles) == 6 and bundles[0] == {"GPU": 1.0, "CPU": 1.0, "accelerator_type:H100": 0.001}
    assert replica_bundles(replica_shape("gpu", 1), 1, None) == [{"GPU": 1.0, "CPU": 1.0}]


def test_auto_on_a_cluster_whose_gpu_nodes_stand_at_zero_waits_for_gpus_not_cpu():
    assert accelerator_to_come("auto", {"CPU": 8}, [{"CPU": 16, "GPU": 8}]) == "gpu"
    assert accelerator_to_come("auto", {"CPU": 8}, [{"CPU": 16}]) is None
    assert accelerator_to_come("auto", {"CPU": 8}, None) is None              # no autoscaler: CPU, as before
    assert accelerator_to_come("auto", {"CPU": 8, "GPU": 2}, [GPU_NODE]) is None  # GPUs are here: auto picks them
    assert accelerator_to_come("cpu", {"CPU": 8}, [GPU_NODE]) is None


def test_a_replica_no_node_type_holds_is_known_before_waiting():
    assert groups_can_host(replica_shape("gpu", 8), [GPU_NODE], "H100")
    assert not groups_can_host(replica_shape("gpu", 8), [GPU_NODE], "A10G")
    assert not groups_can_host(replica_shape("gpu", 16), [GPU_NODE], None)


def test_the_run_asks_then_waits_until_the_nodes_hold_its_replicas():
    clock, asked = Clock(), []
    answers = iter([CPU_HEAD, CPU_HEAD, CPU_HEAD, {**CPU_HEAD, "gpu1": GPU_NODE}])
    with capture_logs() as logs:
        nodes, did_ask = wait_for_nodes(replica_shape("gpu", 1), 2, None, 900, nodes_now=lambda: next(answers),
                                        request=asked.append, ask=8, log=structlog.get_logger(),
                                        sleep=clock.sleep, clock=clock)
    assert did_ask and "gpu1" in nodes and clock.now == 3 * POLL_SECONDS
    assert len(asked) == 1 and len(asked[0]) == 8          # asked for the most replicas it can use
    assert [l["event"] for l in logs] == ["waiting_for_nodes", "nodes_ready"]


def test_nodes_that_already_hold_the_replicas_ask_nothing():
    asked = []
    nodes, did_ask = wait_for_nodes(replica_shape("gpu", 1), 1, None, 900, nodes_now=lambda: {"g": GPU_NODE},
                                    request=asked.append, log=structlog.get_logger())
    assert nodes == {"g": GPU_NODE} and not did_ask and asked == []


def test_a_cluster_that_never_grows_fails_after_the_timeout_saying_what_to_check():
    clock, asked = Clock(), []
    with capture_logs() as logs, pytest.raises(UserError) as refused:
        wait_for_nodes(replica_shape("gpu", 1), 1, None, 60, nodes_now=lambda: CPU_HEAD, request=asked.append,
                       log=structlog.get_logger(), sleep=clock.sleep, clock=clock)
    assert len(asked) == 2 and asked[-1] == []             # the request is withdrawn with the failure
    assert str(refused.value).startswith("resources.scale_up_timeout: the cluster did not grow to hold 1 replica(s) "
                                         "in 60 s")
    assert "max_workers" in str(refused.value) and clock.now == 60
    assert sum(l["event"] == "waiting_for_nodes" for l in logs) == 2      # at the start, and after 30 s
