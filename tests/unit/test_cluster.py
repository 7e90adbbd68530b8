"""Cluster helpers: accelerator choice, fit checks, memory shares, model sources and fingerprints."""
from __future__ import annotations

import json
import os

import pytest

from llmbatch.cluster.model_catalog import CATALOG
from llmbatch.cluster.model_store import check_source, classify_source, fingerprint, is_checkpoint_dir
from llmbatch.cluster.resources import (
    PIPELINE_CPU_OVERHEAD,
    check_fits,
    choose_accelerator,
    default_memory_utilization,
    replica_shape,
)
from llmbatch.errors import UserError

CATALOG_NAME = next(iter(CATALOG))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "llmbatch-home"
    monkeypatch.setenv("LLMBATCH_HOME", str(home))
    return home


# ---- resources -----------------------------------------------------------------------------------

def test_gpu_requested_without_gpus_is_a_user_error():
    with pytest.raises(UserError) as info:
        choose_accelerator("gpu", {"CPU": 8})
    assert str(info.value).startswith("resources.accelerator: gpu was asked for, but the Ray cluster has no GPUs")


def test_gpu_requested_with_zero_gpu_entry_is_a_user_error():
    with pytest.raises(UserError):
        choose_accelerator("gpu", {"CPU": 8, "GPU": 0.0})


@pytest.mark.parametrize("requested, cluster, expected", [
    ("auto", {"CPU": 8}, "cpu"),
    ("auto", {"CPU": 8, "GPU": 2.0}, "gpu"),
    ("cpu", {"CPU": 8, "GPU": 2.0}, "cpu"),
    ("gpu", {"CPU": 8, "GPU": 1.0}, "gpu"),
])
def test_choose_accelerator(requested, cluster, expected):
    assert choose_accelerator(requested, cluster) == expected


def test_replica_shapes():
    cpu = replica_shape("cpu", 4)
    assert (cpu.accelerator, cpu.bundle, cpu.workers_per_replica) == ("cpu", {"CPU": 1.0}, 1)
    gpu = replica_shape("gpu", 2)
    assert (gpu.accelerator, gpu.bundle, gpu.workers_per_replica) == ("gpu", {"GPU": 1.0, "CPU": 1.0}, 2)


def test_check_fits_passes_when_the_pool_fits():
    check_fits(replica_shape("cpu", 1), 3, {"CPU": 3 + PIPELINE_CPU_OVERHEAD})
    check_fits(replica_shape("gpu", 2), 2, {"CPU": 8, "GPU": 4})


def test_check_fits_cpu_message_has_the_numbers():
    with pytest.raises(UserError) as info:
        check_fits(replica_shape("cpu", 1), 4, {"CPU": 2})
    assert str(info.value) == ("resources.replicas: 4 replica(s) need 4.5 CPUs (1 each plus 0.5 for reading "
                               "and writing); the cluster has 2")


def test_check_fits_gpu_message_has_the_numbers():
    with pytest.raises(UserError) as info:
        check_fits(replica_shape("gpu", 2), 2, {"CPU": 64, "GPU": 2})
    assert str(info.value) == "resources.replicas: 2 replica(s) need 4 GPUs; the cluster has 2"


def test_check_fits_counts_cpus_of_every_tensor_parallel_worker():
    with pytest.raises(UserError, match=r"need 4\.5 CPUs \(4 each"):
        check_fits(replica_shape("gpu", 4), 1, {"CPU": 4, "GPU": 4})


@pytest.mark.parametrize("accelerator, per_node, expected", [
    ("gpu", 1, 0.9),
    ("gpu", 8, 0.9),
    ("cpu", 0, 0.5),
    ("cpu", 1, 0.5),
    ("cpu", 2, 0.4),
    ("cpu", 3, 0.27),
    ("cpu", 4, 0.2),
    ("cpu", 8, 0.1),
    ("cpu", 100, 0.1),
])
def test_default_memory_utilization(accelerator, per_node, expected):
    assert default_memory_utilization(accelerator, per_node) == pytest.approx(expected)


# ---- classify_source -----------------------------------------------------------------------------

def test_catalog_name_is_classified_as_catalog_with_cache_under_home(isolated_home):
    ref = classify_source(CATALOG_NAME)
    assert (ref.kind, ref.source) == ("catalog", CATALOG_NAME)
    assert ref.cache_dir == isolated_home / "models" / CATALOG_NAME


def test_s3_prefix_is_classified_as_s3_with_stable_cache_dir(isolated_home):
    ref = classify_source("s3://models/llama/v1/")
    assert (ref.kind, ref.source) == ("s3", "s3://models/llama/v1/")
    cache = ref.cache_dir
    assert cache.parent == isolated_home / "models" / "s3"
    assert cache.name.startswith("v1-")
    assert classify_source("s3://models/llama/v1").cache_dir == cache  # trailing slash does not matter
    assert classify_source("s3://models/llama/v2").cache_dir != cache


def test_existing_directory_is_local_and_resolved(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.chdir(tmp_path)
    ref = classify_source("ckpt")
    assert (ref.kind, ref.source) == ("local", str(ckpt.resolve()))
    assert ref.cache_dir is None


def test_path_like_source_is_local_even_if_missing(tmp_path):
    ref = classify_source(str(tmp_path / "missing"))
    assert ref.kind == "local"
    assert classify_source("./not-here").kind == "local"


@pytest.mark.parametrize("hub_id", ["org/name", "HuggingFaceTB/SmolLM2-135M-Instruct", "a.b/c_d-1.5"])
def test_hub_id_is_classified_as_hub(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = classify_source(hub_id)
    assert (ref.kind, ref.source, ref.cache_dir) == ("hub", hub_id, None)


@pytest.mark.parametrize("garbage", ["not a model!", "gpt2", "a/b/c", "org/", "http://x/y", "org/na me"])
def test_garbage_source_is_a_user_error_listing_the_options(garbage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        classify_source(garbage)
    message = str(info.value)
    assert message.startswith(f"model.source: '{garbage}' is not a catalog name")
    assert CATALOG_NAME in message
    assert "hub id like org/name" in message


# ---- check_source --------------------------------------------------------------------------------

def test_check_source_local_dir_without_config_json_is_a_user_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError) as info:
        check_source(str(ckpt))
    assert str(info.value) == (f"model.source: {ckpt.resolve()} holds no config.json; "
                               "expected a Hugging Face checkpoint directory")


def test_check_source_missing_local_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_source(str(tmp_path / "nope"))


def test_check_source_local_checkpoint_is_accepted(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert is_checkpoint_dir(ckpt)
    ref = check_source(str(ckpt))
    assert (ref.kind, ref.source) == ("local", str(ckpt.resolve()))


# ---- fingerprint ---------------------------------------------------------------------------------

def make_checkpoint(root):
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    (root / "weights.bin").write_bytes(b"\x00\x01\x02\x03" * 10)
    (root / "sub").mkdir()
    (root / "sub" / "tokenizer.json").write_text('{"v": 1}')
    return root


def test_fingerprint_is_stable_across_calls_and_memoised(tmp_path, isolated_home):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    first = fingerprint(ckpt)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert fingerprint(ckpt) == first
    memo = list((isolated_home / "fingerprints").iterdir())
    assert len(memo) == 1 and memo[0].read_text() == first


def test_fingerprint_does_not_depend_on_location(tmp_path):
    a = make_checkpoint(tmp_path / "a")
    b = make_checkpoint(tmp_path / "b")
    assert fingerprint(a) == fingerprint(b)


def test_fingerprint_changes_when_a_files_bytes_change(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = fingerprint(ckpt)
    weights = ckpt / "weights.bin"
    stat = weights.stat()
    weights.write_bytes(b"\xff\x01\x02\x03" * 10)  # same size, different bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = fingerprint(ckpt)
    assert after != before
    assert after.startswith("sha256:")


def test_fingerprint_sees_new_bytes_behind_the_same_name_size_and_mtime(tmp_path, isolated_home):
    """A file rewritten with its old mtime put back, and a copy that keeps names, sizes and mtimes but holds
    other weights: neither is taken for the checkpoint it imitates."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = fingerprint(ckpt)
    weights = ckpt / "weights.bin"
    stat = weights.stat()
    weights.write_bytes(b"\xff\x01\x02\x03" * 10)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(ckpt) != before
    twin = make_checkpoint(tmp_path / "twin")
    (twin / "weights.bin").write_bytes(b"\x07\x01\x02\x03" * 10)
    for p in ckpt.rglob("*"):
        if p.is_file():
            os.utime(twin / p.relative_to(ckpt), ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns))
    assert fingerprint(twin) not in (before, fingerprint(ckpt))


def test_fingerprint_changes_when_a_file_grows(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = fingerprint(ckpt)
    with open(ckpt / "sub" / "tokenizer.json", "a") as handle:
        handle.write(" ")
    assert fingerprint(ckpt) != before


def test_fingerprint_changes_when_a_file_is_renamed(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = fingerprint(ckpt)
    (ckpt / "weights.bin").rename(ckpt / "weights2.bin")
    assert fingerprint(ckpt) != before


def test_fingerprint_ignores_hidden_files(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = fingerprint(ckpt)
    (ckpt / ".llmbatch-source.json").write_text('{"source": "x"}')
    (ckpt / ".lock").write_text("")
    assert fingerprint(ckpt) == before


def test_a_replica_whose_start_fails_is_replaced_twice_before_the_run_fails():
    import ray.data

    from llmbatch.cluster.connect import REPLICA_START_DEATHS_TOLERATED, tolerate_replica_start_failures

    ctx = ray.data.DataContext.get_current()
    before = ctx.max_consecutive_actor_init_deaths
    try:
        tolerate_replica_start_failures()
        assert ctx.max_consecutive_actor_init_deaths == REPLICA_START_DEATHS_TOLERATED == 2
    finally:
        ctx.max_consecutive_actor_init_deaths = before
