"""The typed run manifest: what run_job writes round-trips, a wrong shape never commits, and every reader
works on a manifest an earlier llmbatch wrote (no Ray, no engine)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from llmbatch.cluster import profiles
from llmbatch.cluster.accelerators import ACCELERATORS
from llmbatch.errors import UserError
from llmbatch.jobs.compare import collect, render_markdown
from llmbatch.jobs.feedback import record_run
from llmbatch.jobs.remote import manifest_counts
from llmbatch.jobs.results import load_run, render_results
from llmbatch.jobs.summary import render_summary
from llmbatch.pipelines.manifest import manifest_exists, read_manifest, write_manifest
from llmbatch.pipelines.run_files import MANIFEST_NAME
from llmbatch.pipelines.run_summary import summarize
from llmbatch.run_manifest import CacheNotUsed, CacheUsed, Manifest
from manifest_samples import EARLIER_MANIFEST, earlier_manifest


def run_job_manifest(run_uri: str) -> dict[str, Any]:
    """A manifest as run_job builds it: every section set, the engine with optional vLLM arguments."""
    return {
        "schema_version": 1,
        "run_id": "r1",
        "job": "quickstart",
        "status": "succeeded_with_errors",
        "problems": [],
        "started_at": "2026-12-02T18:12:32.120000+00:00",
        "finished_at": "2026-12-02T18:13:10.450000+00:00",
        "spec": {"name": "quickstart", "task": "generate", "sampling": {"max_tokens": 64, "temperature": 0.0},
                 "scoring": [{"name": "q", "kind": "judge", "scale": [1, 5]}]},
        "versions": {"llmbatch": "0.1.0", "ray": "2.60.0", "vllm": None},
        "model": {"source": "smollm2-135m-instruct", "path": "/models/smollm2", "fingerprint": "sha256:abc"},
        "engine": {"accelerator": "cpu", "replicas": [1, 2], "dtype": "float32", "tensor_parallel_size": 1,
                   "gpu_memory_utilization": 0.5, "enable_prefix_caching": True, "max_model_len": 2048,
                   "enforce_eager": True, "kv_cache_memory_bytes": 268435456},
        "replicas": [{"replica": "a1", "node_id": "n1", "rows": 12, "generated_tokens": 338,
                      "engine_constructing_at": 100.0, "engine_ready_at": 105.0, "first_batch_at": 105.5,
                      "last_batch_at": 110.5, "output_tokens_per_second": 67.6}],
        "input": {"files": [{"path": "/data/q.jsonl", "size": 841, "rows": 12}]},
        "output": {"path": run_uri, "files": ["part-0.parquet"]},
        "rows": {"in": 12, "out": 12, "ok": 11, "error": 1, "duplicate_ids": 0},
        "errors": {"path": "errors/errors.jsonl", "rows": 1, "kinds": [{"kind": "prompt too long", "rows": 1}]},
        "resumed": {"rows_skipped": 4, "parts_kept": 1, "parts_removed": ["part-9.parquet"], "automatic": True},
        "cache": {"path": "cache", "used": True, "namespace": "ns1", "hits": 3, "hit_rate": 0.25,
                  "entries_written": 9},
        "tokens": {"input": 442, "generated": 338},
        "wall_seconds": 38.33,
        "startup_seconds": 26.419,
        "timings": {"launch": 1.453, "prepare": 0.023, "ray_start": 2.871, "pre_pass": 4.731, "engine_start": 15.47,
                    "first_row": 26.419, "generation": 3.766, "write": 0.329, "judges": 2.5, "commit": 0.003},
        "plan": {"model": "smollm2-135m-instruct", "accelerator": "CPU", "replicas": 1, "wall_seconds": 36.3,
                 "notes": [], "cluster": None},
        "judges": {"q": {"wall_seconds": 2.5, "replicas": 1, "devices": 1, "model": "/models/judge"}},
        "generation_seconds": 35.2,
        "output_tokens_per_second": 9.602,
        "cost": {"usd": 0.001047, "generation_usd": 0.000978, "judges_usd": 6.9e-05, "devices": 1,
                 "device": "CPU", "hourly_usd_per_device": 0.1},
        "summary": "_summary.json",
    }


def nothing_optional(manifest: dict[str, Any]) -> dict[str, Any]:
    """The same run with every section that may be null left null (no device price, no plan, no errors...)."""
    engine = {k: v for k, v in manifest["engine"].items() if k not in ("max_model_len", "enforce_eager",
                                                                       "kv_cache_memory_bytes")}
    timings = {phase: None for phase in manifest["timings"]}
    return {**manifest, "engine": {**engine, "replicas": 1}, "errors": None, "resumed": None, "cache": None,
            "startup_seconds": None, "timings": timings, "plan": None, "judges": {},
            "output_tokens_per_second": None, "cost": None, "versions": {"llmbatch": None, "ray": None, "vllm": None},
            "input": {"files": [{"path": "/data/q.jsonl", "size": 841, "rows": None}]}}


def committed_earlier_run(tmp_path: Path) -> str:
    """A run folder holding the manifest an earlier llmbatch wrote (its parts and summary left out)."""
    run = tmp_path / "out" / "base1"
    run.mkdir(parents=True)
    shutil.copy(EARLIER_MANIFEST, run / MANIFEST_NAME)
    return str(run)


@pytest.mark.parametrize("shape", [run_job_manifest, lambda uri: nothing_optional(run_job_manifest(uri))],
                         ids=["every-section", "nulls"])
def test_a_run_job_manifest_round_trips_and_is_written_as_before(tmp_path: Path, shape):
    run_uri = str(tmp_path / "out" / "r1")
    manifest = shape(run_uri)
    write_manifest(run_uri, manifest)
    text = (tmp_path / "out" / "r1" / MANIFEST_NAME).read_text()
    assert text == json.dumps(manifest, indent=2, sort_keys=False, default=str)  # the writer before the model
    read = read_manifest(run_uri)
    assert isinstance(read, Manifest)
    assert read.model_dump(mode="json") == manifest
    write_manifest(run_uri, read)
    assert (tmp_path / "out" / "r1" / MANIFEST_NAME).read_text() == text


def test_null_sections_are_written_as_null(tmp_path: Path):
    run_uri = str(tmp_path / "r1")
    write_manifest(run_uri, nothing_optional(run_job_manifest(run_uri)))
    written = json.loads((tmp_path / "r1" / MANIFEST_NAME).read_text())
    for key in ("errors", "resumed", "cache", "startup_seconds", "plan", "output_tokens_per_second", "cost"):
        assert key in written and written[key] is None
    assert "max_model_len" not in written["engine"]  # an engine argument not set stays absent, not null


def test_the_parsed_manifest_is_typed():
    manifest = Manifest.model_validate(run_job_manifest("out/r1"))
    assert manifest.rows.in_ == 12 and manifest.rows.error == 1
    assert manifest.engine.replicas == [1, 2] and manifest.engine.model_extra["max_model_len"] == 2048
    assert isinstance(manifest.cache, CacheUsed) and manifest.cache.hit_rate == 0.25
    assert manifest.judges["q"].devices == 1 and manifest.timings.first_row == 26.419
    assert manifest.measured_seconds == 35.2
    unused = {"path": "cache", "used": False, "reason": "sampling is not repeatable (temperature > 0, no seed)"}
    assert isinstance(Manifest.model_validate({**run_job_manifest("out/r1"), "cache": unused}).cache, CacheNotUsed)


@pytest.mark.parametrize("change", [
    {"rows": {"in": 12, "out": 12, "ok": "eleven", "error": 1}},
    {"tokens": None},
    {"cache": {"path": "cache", "used": True, "reason": "a used cache names its namespace and hits"}},
    {"engine": {"accelerator": "cpu", "replicas": 1}},
])
def test_a_manifest_of_the_wrong_shape_is_refused_before_anything_is_written(tmp_path: Path, change):
    run_uri = str(tmp_path / "out" / "r1")
    with pytest.raises(ValidationError):
        write_manifest(run_uri, {**run_job_manifest(run_uri), **change})
    assert not manifest_exists(run_uri)
    assert not (tmp_path / "out").exists()


def test_keys_this_version_does_not_know_survive_a_read_and_a_rewrite(tmp_path: Path):
    run = tmp_path / "r1"
    run.mkdir()
    newer = run_job_manifest(str(run))
    newer["carbon_grams"] = 3.5
    newer["rows"]["filtered"] = 2
    (run / MANIFEST_NAME).write_text(json.dumps(newer))
    read = read_manifest(str(run))
    assert read.carbon_grams == 3.5 and read.rows.model_extra == {"filtered": 2}
    write_manifest(str(run), read)
    assert json.loads((run / MANIFEST_NAME).read_text()) == newer


def test_a_file_that_is_no_manifest_is_a_user_error(tmp_path: Path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(earlier_manifest(rows={"in": 12})))
    with pytest.raises(UserError, match=r"rows.out: Field required \(and 2 more\)"):
        read_manifest(str(tmp_path))


def test_an_earlier_manifest_parses_with_what_it_lacks_left_empty(tmp_path: Path):
    manifest = read_manifest(committed_earlier_run(tmp_path))
    assert manifest.run_id == "base1" and manifest.rows.ok == 12 and manifest.tokens.generated == 338
    assert manifest.timings is None and manifest.cost.device == "CPU" and manifest.judges == {}
    first = json.loads(EARLIER_MANIFEST.read_text())
    skeleton = {k: v for k, v in first.items() if k in (
        "schema_version", "run_id", "job", "status", "problems", "started_at", "finished_at", "spec", "versions",
        "model", "engine", "input", "output", "rows", "tokens", "wall_seconds", "output_tokens_per_second")}
    skeleton["rows"] = {k: v for k, v in first["rows"].items() if k != "duplicate_ids"}
    oldest = Manifest.model_validate(skeleton)  # the keys of the first llmbatch's manifests
    assert oldest.replicas == [] and oldest.cost is None and oldest.summary is None
    assert oldest.rows.duplicate_ids is None and oldest.measured_seconds == first["wall_seconds"]
    assert "run base1: succeeded" in render_summary(oldest)


def test_final_screen_of_an_earlier_run(tmp_path: Path):
    screen = render_summary(read_manifest(committed_earlier_run(tmp_path)))
    assert "run base1: succeeded" in screen
    assert "smollm2-135m-instruct  (1 x cpu replica)" in screen
    assert "12 in, 12 ok, 0 error" in screen and "442 input, 338 generated" in screen
    assert "cost         $0.0024  (1 x CPU at $0.10/h)" in screen
    assert "out/quickstart/base1/_manifest.json" in screen
    assert "  time         " not in screen  # it predates timings
    assert screen == render_summary(earlier_manifest())


def test_final_screen_of_a_run_job_manifest_shows_every_section():
    screen = render_summary(run_job_manifest("out/r1"))
    assert "1-2 x cpu replica" in screen
    assert "26.4 s to the first rows (Ray 2.9, pre-pass 4.7, engines 15.5), generation 3.8 s" in screen
    assert "cache        3 of 12 rows reused (25.0%), 9 added" in screen
    assert "resumed      4 rows kept from the earlier attempt" in screen
    assert "error rows   out/r1/errors/errors.jsonl: prompt too long (1)" in screen


def test_results_and_summary_of_an_earlier_run(tmp_path: Path):
    run_uri = committed_earlier_run(tmp_path)
    manifest, summary = load_run(run_uri)  # no _summary.json: computed from the (absent) parts
    assert isinstance(manifest, Manifest)
    assert summary["run_id"] == "base1" and summary["rows"] == earlier_manifest()["rows"]
    assert summary["tokens"] == {"input": 442, "generated": 338} and summary["cost_usd"] == 0.002409
    assert summary == summarize(run_uri, earlier_manifest())
    manifest.output.path = run_uri  # results shows the run folder where it was found, not where it was written
    assert render_results(run_uri, 0).startswith(render_summary(manifest))


def test_compare_reads_earlier_runs(tmp_path: Path):
    metric, points = collect([committed_earlier_run(tmp_path)], None)
    assert metric == "mean_logprob"
    assert points[0].run_id == "base1" and points[0].rows.ok == 12 and points[0].wall_seconds == 86.726
    assert points[0].sampling == "temperature=0.0, top_p=1.0, max_tokens=64"
    assert "| 12 / 0 | 86.7 |" in render_markdown(metric, points)


def test_cluster_status_counts_rows_from_the_manifest(tmp_path: Path):
    counts = manifest_counts(committed_earlier_run(tmp_path))
    assert counts == {"rows_ok": 12, "rows_error": 0, "run_status": "succeeded", "wall_seconds": 86.726,
                      "cost_usd": 0.002409}
    assert manifest_counts(str(tmp_path / "never-committed")) == {}


def test_profile_measurements_from_an_earlier_manifest(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_PROFILE_STORE", str(tmp_path / "profiles"))
    manifest = read_manifest(committed_earlier_run(tmp_path))
    measured = profiles.measurement_from_manifest(manifest, "run:base1")
    busy = 1796223260.6555755 - 1796223238.5420358
    assert measured["rows"] == 12 and measured["replicas"] == 1 and measured["max_tokens"] == 64
    assert measured["wall_seconds"] == 86.724 and measured["startup_seconds"] == 64.203
    assert measured["output_tokens_per_second"] == round(338 / busy, 3)
    from_dict = profiles.measurement_from_manifest(earlier_manifest(), "run:base1")
    assert {**from_dict, "at": None} == {**measured, "at": None}
    prefill = profiles.prefill_from_manifest(manifest, "profile-prefill:base1")
    assert prefill["prefill_tokens_per_second"] == round(442 / busy, 3)

    engine = {"dtype": "float32", "max_model_len": 2048, "tensor_parallel_size": 1, "enable_prefix_caching": True}
    record_run(manifest, manifest.model.fingerprint, ACCELERATORS["CPU"], engine, None, "run", structlog.get_logger())
    stored = profiles.load(profiles.profile_key(manifest.model.fingerprint, "CPU", engine))
    assert stored["model_source"] == "smollm2-135m-instruct"
    assert stored["measurements"][0]["rows"] == 12 and stored["measurements"][0]["source"] == "run:base1"
