"""Cluster-side pieces that need no Ray: addresses, tokens, error translation, per-node fit, diagnosis."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llmbatch.cluster.connect import embedded_ray_warning
from llmbatch.cluster.diagnose import explain_failure, root_cause
from llmbatch.cluster.jobs_api import (cluster_address, jobs_api_errors, open_cluster_warning, token_source,
                                       transport_warnings, use_token_if_available)
from llmbatch.cluster.resources import check_fits, check_replica_fits_a_node, replica_shape
from llmbatch.errors import UserError
from llmbatch.jobs.spec import validate_spec

BASE = {"name": "a", "model": {"source": "m"}, "input": {"path": "p"}, "output": {"path": "o"}}


def test_address_comes_from_the_option_then_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert cluster_address(None) == "http://10.0.0.5:8265"
    assert cluster_address("https://head:8265/") == "https://head:8265"


@pytest.mark.parametrize("bad", ["ray://head:10001", "auto", "local"])
def test_addresses_that_are_not_a_jobs_api_endpoint_are_refused(bad):
    with pytest.raises(UserError, match="--address"):
        cluster_address(bad)


def test_token_is_found_where_ray_looks_and_never_returned(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert token_source() is None and use_token_if_available() is None
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret-from-file\n")
    assert token_source() == str(tmp_path / ".ray" / "auth_token")
    named = tmp_path / "elsewhere"
    named.write_text("secret-named\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert token_source() == f"RAY_AUTH_TOKEN_PATH ({named})"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-from-env")
    assert token_source() == "RAY_AUTH_TOKEN"
    assert use_token_if_available() == "RAY_AUTH_TOKEN" and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    named.write_text("")
    with pytest.raises(UserError, match=f"RAY_AUTH_TOKEN_PATH names {named}, which is missing or empty"):
        token_source()


def test_an_embedded_ray_without_token_authentication_is_warned_about():
    assert embedded_ray_warning({}) is None and embedded_ray_warning({"RAY_AUTH_MODE": "token"}) is None
    warning = embedded_ray_warning({"RAY_AUTH_MODE": "Disabled"})
    assert "listens on every network interface" in warning and "unset RAY_AUTH_MODE" in warning


def test_a_token_bound_for_a_remote_plain_http_address_and_an_open_cluster_are_warned_about():
    (warning,) = transport_warnings("http://10.0.0.5:8265", "RAY_AUTH_TOKEN")
    assert "over plain http" in warning and "secret" not in warning
    assert transport_warnings("https://head:8265", "RAY_AUTH_TOKEN") == []
    assert transport_warnings("http://127.0.0.1:8265", "RAY_AUTH_TOKEN") == []
    assert transport_warnings("http://localhost:8265", "RAY_AUTH_TOKEN") == []
    assert transport_warnings("http://10.0.0.5:8265", None) == []
    assert "accepted a request without a token" in open_cluster_warning("http://10.0.0.5:8265")


@pytest.mark.parametrize("raised, expected", [
    (ConnectionError("Failed to connect"), "cannot reach the Ray Jobs API at http://h:8265"),
    (RuntimeError("Request failed with status code 401: Unauthorized: Missing authentication token"),
     "requires a token and none was sent"),
    (RuntimeError("Authentication failed: Invalid authentication token"), "rejected the token"),
])
def test_jobs_api_failures_become_one_actionable_line(raised, expected):
    with pytest.raises(UserError) as info:
        with jobs_api_errors("http://h:8265"):
            raise raised
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_other_runtime_errors_pass_through():
    with pytest.raises(RuntimeError, match="something else"):
        with jobs_api_errors("http://h:8265"):
            raise RuntimeError("something else")


def test_a_tensor_parallel_replica_must_fit_on_one_node():
    nodes = [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    check_replica_fits_a_node(replica_shape("gpu", 2), nodes)
    with pytest.raises(UserError) as info:
        check_fits(replica_shape("gpu", 4), 1, {"CPU": 16, "GPU": 4}, nodes)
    assert str(info.value) == ("model.engine.tensor_parallel_size: one replica needs 4 GPUs on a single node "
                               "(tensor_parallel_size=4); the largest node has 2")


def test_accelerator_type_must_exist_in_the_cluster():
    nodes = [{"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}]
    check_replica_fits_a_node(replica_shape("gpu", 1), nodes, "A10G")
    with pytest.raises(UserError) as info:
        check_replica_fits_a_node(replica_shape("gpu", 1), nodes, "H100")
    assert str(info.value) == "resources.accelerator_type: no node has H100 GPUs; the cluster has A10G"


def test_replicas_take_a_number_or_a_min_max_range():
    assert validate_spec({**BASE, "resources": {"replicas": 3}}).resources.replica_range == (3, 3)
    assert validate_spec({**BASE, "resources": {"replicas": [1, 4]}}).resources.replica_range == (1, 4)
    assert validate_spec({**BASE, "resources": {"accelerator_type": "H100"}}).resources.accelerator_type == "H100"


def test_root_cause_is_the_first_specific_error_a_worker_logged(tmp_path: Path):
    (tmp_path / "worker-1.out").write_text(
        "INFO starting\n"
        "(Worker pid=1) ERROR ValueError: Available memory on node 0 is less than desired CPU memory utilization\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n")
    (tmp_path / "worker-0.err").write_text("nothing wrong here\n")
    assert root_cause(tmp_path, since=time.time() - 60) == (
        "ValueError: Available memory on node 0 is less than desired CPU memory utilization")
    assert root_cause(tmp_path, since=time.time() + 60) is None


def test_explain_failure_falls_back_to_the_exception_and_adds_a_hint(monkeypatch):
    monkeypatch.setattr("llmbatch.cluster.diagnose.ray_logs_dir", lambda: None)
    monkeypatch.setattr("llmbatch.cluster.diagnose.orphaned_engine_pids", lambda: [])
    message = explain_failure(RuntimeError("wrapper\nValueError: desired CPU memory utilization (0.99)"), 0)
    assert message.startswith("the pipeline failed: ValueError: desired CPU memory utilization (0.99)")
    assert "--set model.engine.gpu_memory_utilization=0.3" in message


def test_can_host_needs_the_whole_replica_and_its_gpu_type_on_one_node():
    from llmbatch.cluster.resources import can_host

    gpu2 = replica_shape("gpu", 2)
    assert can_host(gpu2, {"CPU": 4, "GPU": 2})
    assert not can_host(gpu2, {"CPU": 4, "GPU": 1})
    assert not can_host(replica_shape("gpu", 1), {"CPU": 4, "GPU": 1}, "H100")
    assert can_host(replica_shape("gpu", 1), {"CPU": 4, "GPU": 1, "accelerator_type:H100": 1}, "H100")
    assert not can_host(replica_shape("cpu", 1), {"GPU": 1, "CPU": 0})


def test_sizing_problems_only_warn_for_a_fixed_pool():
    from structlog.testing import capture_logs

    import structlog
    from llmbatch.jobs.feedback import predict

    spec = validate_spec({**BASE, "resources": {"replicas": 2, "accelerator_type": "MI300X"}})
    with capture_logs() as logs:
        assert predict(spec, "gpu", "sha256:x", structlog.get_logger(), required=False) == (None, None)
    assert logs[0]["event"] == "no_prediction" and "MI300X" in logs[0]["reason"]
    with pytest.raises(UserError, match="resources.accelerator_type: unknown accelerator 'MI300X'"):
        predict(spec, "gpu", "sha256:x", structlog.get_logger(), required=True)


def test_orphaned_vllm_engines_are_found_by_name_and_parent(tmp_path):
    from llmbatch.cluster.diagnose import orphaned_engine_pids

    def process(pid: int, cmdline: bytes, parent: int) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(cmdline)
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python3) S {parent} 1 1 0")

    process(10, b"VLLM::Worker\0", 1)           # orphaned engine worker
    process(11, b"VLLM::EngineCore\0", 4242)     # still owned by a live replica
    process(12, b"python3\0-m\0ray\0", 1)
    assert orphaned_engine_pids(tmp_path) == [10]


def test_explain_failure_names_orphaned_engines_when_memory_runs_short(monkeypatch):
    monkeypatch.setattr("llmbatch.cluster.diagnose.ray_logs_dir", lambda: None)
    monkeypatch.setattr("llmbatch.cluster.diagnose.orphaned_engine_pids", lambda: [41, 42])
    message = explain_failure(RuntimeError("ValueError: less than desired CPU memory utilization (0.5)"), 0)
    assert "--set model.engine.gpu_memory_utilization=0.3" in message and "`kill 41 42`" in message
