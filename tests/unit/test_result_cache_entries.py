"""Result cache: what a namespace stands for, looking rows up, and adding a run's rows (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmbatch.pipelines.run_files import part_name
from llmbatch.pipelines.columns import (HIT_COLUMN, ID_COLUMN, INFERENCE_ERROR, INPUT_COLUMN, RENDERED_PROMPT,
                                        ROW_ERROR_COLUMN)
from llmbatch.errors import SpecError
from llmbatch.jobs.spec import validate_spec
from llmbatch.jobs.summary import render_summary
from llmbatch.pipelines.infer import sampling_params
from llmbatch.pipelines.output import to_output_row
from llmbatch.pipelines import result_cache
from llmbatch.pipelines.result_cache import (KEY_FILE, CacheLookupStage, is_deterministic, load_index, prompt_key,
                                           write_entries, write_key_file)
from llmbatch.pipelines.schema import OutputRow, output_schema
from manifest_samples import earlier_manifest

ENGINE = {"dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.5, "enable_prefix_caching": True}
GREEDY = sampling_params(32, 0.0, 1.0, None, None, [])
VERSIONS = {"llmbatch": "0.1.0", "vllm": "0.11.0", "transformers": "4.57.0"}


def cache_namespace(path, fingerprint, engine, sampling, versions=VERSIONS):
    return result_cache.cache_namespace(path, fingerprint, engine, sampling, versions)


def result(text: str, tokens: int = 3) -> dict:
    return {"generated_text": text, "finish_reason": "stop", "num_input_tokens": 7, "num_generated_tokens": tokens,
            "cumulative_logprob": -1.5, "mean_logprob": -0.5, "perplexity": 1.6487}


def write_part(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = output_schema(pa.schema([]), [pa.field("cached", pa.bool_())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def output_row(i: int, prompt: str, cached: bool, text: str | None = "ok", error: str | None = None) -> dict:
    row = {"id": f"r{i}", "prompt": prompt, **(result(text) if text is not None else {}), "cached": cached,
           "error": error, "model": "m", "run_id": "run-1"}
    if text is None:
        row["generated_text"] = None
    return row


def test_namespace_changes_with_every_setting_that_shapes_the_output():
    base = cache_namespace("/c", "sha256:aa", ENGINE, GREEDY).namespace
    assert cache_namespace("/c", "sha256:aa", {**ENGINE, "gpu_memory_utilization": 0.9}, GREEDY).namespace == base
    assert cache_namespace("/c", "sha256:aa", {**ENGINE, "enable_prefix_caching": False}, GREEDY).namespace == base
    others = [
        cache_namespace("/c", "sha256:bb", ENGINE, GREEDY),
        cache_namespace("/c", "sha256:aa", {**ENGINE, "dtype": "bfloat16"}, GREEDY),
        cache_namespace("/c", "sha256:aa", {**ENGINE, "max_model_len": 1024}, GREEDY),
        cache_namespace("/c", "sha256:aa", ENGINE, sampling_params(16, 0.0, 1.0, None, None, [])),
        cache_namespace("/c", "sha256:aa", ENGINE, sampling_params(32, 0.0, 1.0, None, None, ["\n"])),
        cache_namespace("/c", "sha256:aa", ENGINE, sampling_params(32, 0.7, 1.0, None, 1, [])),
        cache_namespace("/c", "sha256:aa", ENGINE, sampling_params(32, 0.7, 1.0, None, 2, [])),
        cache_namespace("/c", "sha256:aa", ENGINE, sampling_params(32, 0.0, 1.0, None, None, [], logprobs=3)),
        cache_namespace("/c", "sha256:aa", ENGINE, GREEDY, {**VERSIONS, "vllm": "0.12.0"}),
        cache_namespace("/c", "sha256:aa", ENGINE, GREEDY, {**VERSIONS, "llmbatch": "0.2.0"}),
    ]
    assert len({p.namespace for p in others} | {base}) == len(others) + 1
    assert cache_namespace("/c", "sha256:aa", ENGINE, GREEDY).uri == f"/c/{base}"


def test_only_greedy_or_seeded_sampling_is_cached():
    assert is_deterministic(GREEDY)
    assert is_deterministic(sampling_params(32, 0.8, 0.9, None, 7, []))
    assert not is_deterministic(sampling_params(32, 0.8, 0.9, None, None, []))


def test_lookup_stage_marks_hits_and_leaves_misses_and_error_rows(tmp_path: Path):
    plan = cache_namespace(str(tmp_path / "cache"), "sha256:aa", ENGINE, GREEDY)
    run = tmp_path / "run"
    write_part(run / part_name(1, "0", 0), [output_row(0, "known prompt", False, "Paris"),
                                        output_row(1, "failed prompt", False, None, "engine error")])
    assert write_entries(str(run), plan, "run-1") == {"hits": 0, "entries_written": 1}
    stage = CacheLookupStage(plan.uri)
    batch = pa.table({"prompt": ["known prompt", "new prompt", "failed prompt", None],
                      ROW_ERROR_COLUMN: pa.array([None, None, None, "prompt column 'prompt' is null"], pa.string())})
    hits = stage(batch).column(HIT_COLUMN).to_pylist()
    assert json.loads(hits[0])["generated_text"] == "Paris"
    assert hits[1:] == [None, None, None]


def test_a_hit_becomes_a_finished_output_row_without_the_engine():
    columns = {"topic": "topic"}
    base = {ID_COLUMN: "r1", INPUT_COLUMN: {"topic": "x"}, ROW_ERROR_COLUMN: None, RENDERED_PROMPT: "p",
            "tokenized_prompt": [1, 2, 3]}
    hit = to_output_row({**base, HIT_COLUMN: json.dumps(result("cached text")), INFERENCE_ERROR: "__cached__"},
                        input_columns=columns, model="m", run_id="run-2", max_tokens=32, max_model_len=512)
    assert hit["cached"] is True and hit["error"] is None and hit["generated_text"] == "cached text"
    assert hit["num_generated_tokens"] == 3 and hit["run_id"] == "run-2" and hit["prompt"] == "p"
    OutputRow.model_validate(hit)
    miss = to_output_row({**base, HIT_COLUMN: None, INFERENCE_ERROR: "", "generated_text": "fresh",
                          "num_input_tokens": 3, "num_generated_tokens": 1},
                         input_columns=columns, model="m", run_id="run-2", max_tokens=32, max_model_len=512)
    assert miss["cached"] is False and miss["generated_text"] == "fresh"


def test_write_entries_adds_only_rows_generated_by_this_run(tmp_path: Path):
    plan = cache_namespace(str(tmp_path / "cache"), "sha256:aa", ENGINE, GREEDY)
    run = tmp_path / "run"
    write_part(run / part_name(1, "a", 0), [output_row(0, "p0", True), output_row(1, "p1", False),
                                              output_row(2, "p2", False, None, "prompt is empty")])
    write_part(run / part_name(1, "a", 1), [output_row(3, "p3", False),
                                              output_row(4, "p4", False, "kept", "score_x: no reference")])
    write_part(run / "_staging" / "pass-0" / part_name(1, "9", 0), [output_row(9, "p9", False)])
    assert write_entries(str(run), plan, "run-1") == {"hits": 1, "entries_written": 3}
    index = load_index(plan.uri)
    assert len(index) == 3
    assert index.get(prompt_key("p1"))["generated_text"] == "ok"
    assert index.get(prompt_key("p4"))["generated_text"] == "kept"
    assert index.get(prompt_key("p0")) is None and index.get(prompt_key("p2")) is None
    assert index.get(prompt_key("p9")) is None


def test_a_bad_entry_file_is_skipped_and_the_rest_of_the_namespace_still_answers(tmp_path: Path):
    """Cut short by a crash, another file that landed there, a column of another type, a null key: each is
    skipped (with a warning) and never costs the other entries."""
    plan = cache_namespace(str(tmp_path / "cache"), "sha256:aa", ENGINE, GREEDY)
    run = tmp_path / "run"
    write_part(run / part_name(1, "0", 0), [output_row(0, "p0", False)])
    write_entries(str(run), plan, "run-1")
    Path(plan.uri, "broken.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"x": [1]}), Path(plan.uri, "foreign.parquet"))
    pq.write_table(pa.table({"key": [prompt_key("p1")], "generated_text": [[1, 2]]}), Path(plan.uri, "typed.parquet"))
    pq.write_table(pa.table({"key": pa.array([None, prompt_key("p2")], pa.string()), "generated_text": ["a", "b"],
                             "num_input_tokens": pa.array([1, 2], pa.int32())}), Path(plan.uri, "nulls.parquet"))
    index = load_index(plan.uri)
    assert index.get(prompt_key("p0"))["generated_text"] == "ok"
    assert index.get(prompt_key("p1")) is None
    assert index.get(prompt_key("p2")) == {**{f: None for f in ("finish_reason", "num_generated_tokens",
                                                                 "cumulative_logprob", "mean_logprob", "perplexity")},
                                           "generated_text": "b", "num_input_tokens": 2}
    assert len(index) == 2


def test_key_file_says_what_the_namespace_stands_for(tmp_path: Path):
    plan = cache_namespace(str(tmp_path / "cache"), "sha256:aa", ENGINE, GREEDY)
    write_key_file(plan, "smollm2-135m-instruct")
    key = json.loads(Path(plan.uri, KEY_FILE).read_text())
    assert key["model_fingerprint"] == "sha256:aa" and key["model_source"] == "smollm2-135m-instruct"
    assert key["sampling"]["max_tokens"] == 32 and key["dtype"] == "float32"


def test_a_key_file_that_cannot_be_written_is_reported_not_raised(tmp_path: Path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    plan = cache_namespace(str(blocked), "sha256:aa", ENGINE, GREEDY)
    assert write_key_file(plan, "smollm2-135m-instruct").startswith(f"cannot write the result cache at {plan.uri}")


def test_cache_section_is_refused_for_score_tasks():
    raw = yaml.safe_load("""
name: mc
task: score
model: {source: smollm2-135m-instruct}
input: {path: data/x.jsonl, choices_column: choices}
output: {path: out/x}
cache: {path: cache}
""")
    with pytest.raises(SpecError) as err:
        validate_spec(raw)
    assert any("cache: task: score results are not cached" in line for line in err.value.lines)
    raw.pop("task"), raw["input"].pop("choices_column")
    assert validate_spec(raw).cache.path == "cache"


def test_final_screen_counts_cache_hits():
    manifest = earlier_manifest(
        rows={"in": 10, "out": 10, "ok": 10, "error": 0},
        cache={"path": "cache", "used": True, "namespace": "n", "hits": 9, "hit_rate": 0.9, "entries_written": 1})
    assert "cache        9 of 10 rows reused (90.0%), 1 added" in render_summary(manifest)


def test_a_cache_inside_the_input_is_refused(tmp_path: Path):
    from llmbatch.jobs.resolve import overlap_problems

    (tmp_path / "data").mkdir()
    raw = {"name": "a", "model": {"source": "m"}, "input": {"path": str(tmp_path / "data")},
           "output": {"path": str(tmp_path / "out")}, "cache": {"path": str(tmp_path / "data" / "cache")}}
    assert overlap_problems(validate_spec(raw))[0].startswith(f"cache.path: {tmp_path / 'data' / 'cache'} is inside")
    raw["cache"]["path"] = str(tmp_path / "cache")
    assert overlap_problems(validate_spec(raw)) == []


def test_unseeded_sampling_opens_no_cache_and_the_manifest_says_why(tmp_path: Path):
    from structlog.testing import capture_logs

    from llmbatch.jobs.finalize import cache_section as cache_manifest
    from llmbatch.jobs.run import result_cache_for

    raw = {"name": "a", "model": {"source": "m"}, "input": {"path": "in.jsonl"}, "output": {"path": "out"},
           "cache": {"path": str(tmp_path / "cache")}}
    spec = validate_spec(raw)
    with capture_logs() as logs:
        assert result_cache_for(spec, "sha256:aa", ENGINE, sampling_params(8, 0.7, 1.0, None, None, []),
                                structlog_logger()) is None
    assert logs[0]["event"] == "cache_not_used" and "sampling.seed" in logs[0]["reason"]
    assert cache_manifest(spec, None, None, 10) == {
        "path": str(tmp_path / "cache"), "used": False, "reason": "sampling is not repeatable (temperature > 0, no seed)"}
    seeded = result_cache_for(spec, "sha256:aa", ENGINE, sampling_params(8, 0.7, 1.0, None, 3, []), structlog_logger())
    assert seeded is not None and not Path(seeded.uri, KEY_FILE).exists()  # written when the run starts
    assert cache_manifest(spec, seeded, {"hits": 4, "entries_written": 6}, 10)["hit_rate"] == 0.4


def structlog_logger():
    import structlog

    return structlog.get_logger()


def test_parts_from_before_the_job_had_a_cache_are_fresh_rows_and_a_failing_cache_never_fails_the_commit(
        tmp_path: Path):
    plan = cache_namespace(str(tmp_path / "cache"), "sha256:aa", ENGINE, GREEDY)
    run = tmp_path / "run"
    older = [{k: v for k, v in output_row(0, "p0", False).items() if k != "cached"}]
    write_part(run / part_name(1, "0", 0), older)   # an attempt without a cache, resumed with one
    write_part(run / part_name(2, "0", 0), [output_row(1, "p1", True)])
    assert write_entries(str(run), plan, "run-1") == {"hits": 1, "entries_written": 1}
    assert load_index(plan.uri).get(prompt_key("p0"))["generated_text"] == "ok"

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache's folder should be")
    stuck = cache_namespace(str(blocked), "sha256:aa", ENGINE, GREEDY)
    stats = write_entries(str(run), stuck, "run-2")
    assert stats["entries_written"] == 0 and stats["hits"] == 1 and "write the result cache" in stats["write_error"]
