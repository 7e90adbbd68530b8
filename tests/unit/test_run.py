"""jobs.run helpers that need no Ray: run ids, required input columns, the model's context length."""
from __future__ import annotations

import json

import pytest

from llmbatch.errors import UserError
from llmbatch.jobs.resolve import model_max_len, required_input_columns
from llmbatch.jobs.run import check_run_id, new_run_id
from llmbatch.jobs.spec import validate_spec


def spec_with(**input_fields):
    raw = {"name": "job", "model": {"source": "m"}, "input": {"path": "x.jsonl", **input_fields},
           "output": {"path": "out"}}
    return validate_spec(raw)


# ---- run ids -------------------------------------------------------------------------------------

@pytest.mark.parametrize("run_id", ["nightly-2026.11.23_1", "a", "0", "Run_1", "x" * 128])
def test_check_run_id_accepts_safe_names(run_id):
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["../x", "..", "a/b", "a\\b", "", " ", ".", ".hidden", "-x", "_x",
                                    "a..b", "a b", "x" * 129, "run:1", "ünï"])
def test_check_run_id_rejects_unsafe_names(run_id):
    with pytest.raises(UserError) as info:
        check_run_id(run_id)
    assert str(info.value).startswith(f"--run-id: '{run_id}' must be letters, digits")


def test_check_run_id_rejects_trailing_newline():
    """`$` in the pattern also matches before a final newline; a run id must not end in one."""
    with pytest.raises(UserError):
        check_run_id("nightly\n")


def test_new_run_id_is_a_valid_run_id_starting_with_the_job_name():
    run_id = new_run_id("my-job")
    assert run_id.startswith("my-job-")
    assert check_run_id(run_id) == run_id


# ---- required_input_columns ----------------------------------------------------------------------

def test_required_columns_default_to_prompt():
    assert required_input_columns(spec_with()) == {"prompt": "input.prompt_column"}


def test_required_columns_use_configured_prompt_column_and_id_column():
    assert required_input_columns(spec_with(prompt_column="text", id_column="uid")) == {
        "text": "input.prompt_column", "uid": "input.id_column"}


def test_required_columns_of_a_template_are_its_fields_deduplicated():
    spec = spec_with(template="Q: {question}\nC: {context}\nAgain: {question}", id_column="question")
    assert required_input_columns(spec) == {"question": "input.template", "context": "input.template"}


def test_required_columns_of_messages_replace_prompt_column():
    assert required_input_columns(spec_with(messages_column="chat", prompt_column="ignored")) == {
        "chat": "input.messages_column"}


# ---- model_max_len -------------------------------------------------------------------------------

def write_config(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_model_max_len_reads_max_position_embeddings(tmp_path):
    path = write_config(tmp_path, {"max_position_embeddings": 8192, "n_positions": 1024})
    assert model_max_len(path, None) == 8192


@pytest.mark.parametrize("key", ["n_positions", "max_sequence_length", "seq_length"])
def test_model_max_len_falls_back_to_other_config_keys(tmp_path, key):
    assert model_max_len(write_config(tmp_path, {key: 1024}), None) == 1024


def test_configured_max_model_len_wins_over_the_config(tmp_path):
    path = write_config(tmp_path, {"max_position_embeddings": 8192})
    assert model_max_len(path, 2048) == 2048


def test_model_max_len_ignores_non_integer_values(tmp_path):
    path = write_config(tmp_path, {"max_position_embeddings": "lots", "n_positions": 512})
    assert model_max_len(path, None) == 512


def test_model_max_len_reads_a_multimodal_models_text_config(tmp_path):
    path = write_config(tmp_path, {"text_config": {"max_position_embeddings": 32768}, "vision_config": {}})
    assert model_max_len(path, None) == 32768


def test_model_max_len_is_none_without_a_usable_config(tmp_path):
    assert model_max_len(tmp_path, None) is None  # no config.json
    (tmp_path / "config.json").write_text("{not json")
    assert model_max_len(tmp_path, None) is None
    write_config(tmp_path, {"hidden_size": 64})
    assert model_max_len(tmp_path, None) is None


def test_error_kinds_drop_the_rows_own_details():
    from llmbatch.pipelines.error_rows import error_kind

    assert error_kind("duplicate id 'k1' at a.jsonl row 2 (first at a.jsonl row 0)") == "duplicate id"
    assert error_kind("prompt column 'prompt' is null") == "prompt column is null"
    assert error_kind("input line 9: not a JSON object (Expecting value)") == "input line not a JSON object"
    assert error_kind("input line 9: not a JSON object (Expecting property name: line 1 column 2 (char 1))") == \
        "input line not a JSON object"


def test_output_inside_input_and_input_inside_the_run_are_refused(tmp_path):
    from llmbatch.jobs.resolve import overlap_problems
    from llmbatch.jobs.spec import validate_spec

    def spec(inp, out):
        return validate_spec({"name": "a", "model": {"source": "m"}, "input": {"path": inp}, "output": {"path": out}})

    assert overlap_problems(spec(str(tmp_path / "data"), str(tmp_path / "data" / "out")))[0].startswith(
        f"output.path: {tmp_path / 'data' / 'out'} is inside input.path")
    assert overlap_problems(spec("s3://b/in/**/*.jsonl", "s3://b/in/out"))
    assert overlap_problems(spec("s3://b/in/*.jsonl", "s3://b/in/out")) == []  # one level: never the run's parts
    assert overlap_problems(spec("*.jsonl", "out")) == []
    (tmp_path / "data").mkdir()
    assert overlap_problems(spec(str(tmp_path / "data"), str(tmp_path / "data_out"))) == []  # a directory
    assert overlap_problems(spec(str(tmp_path / "prompts"), str(tmp_path / "prompts_out")))  # a prefix
    assert overlap_problems(spec(str(tmp_path / "out" / "r1" / "p.jsonl"), str(tmp_path / "out")),
                            str(tmp_path / "out" / "r1"))[0].startswith("input.path:")
    assert overlap_problems(spec(str(tmp_path / "out" / "r1"), str(tmp_path / "out")), str(tmp_path / "out" / "r2")) == []


def test_eager_mode_defaults_to_the_device_and_can_be_set_either_way():
    from llmbatch.jobs.engines import engine_kwargs_for
    from llmbatch.jobs.spec import EngineSpec

    assert engine_kwargs_for(EngineSpec(), "cpu", 256, 1)["enforce_eager"] is True
    assert "enforce_eager" not in engine_kwargs_for(EngineSpec(), "gpu", 256, 1)
    assert engine_kwargs_for(EngineSpec(enforce_eager=True), "gpu", 256, 1)["enforce_eager"] is True
    assert "enforce_eager" not in engine_kwargs_for(EngineSpec(enforce_eager=False), "cpu", 256, 1)


# ---- the model's context in resolve ------------------------------------------------------------------

def _model_dir(tmp_path, config: dict):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    **config}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _problems(tmp_path, config: dict, engine: dict | None = None, max_tokens: int = 64) -> list[str]:
    from llmbatch.jobs.resolve import model_problems, _resolve_model
    from llmbatch.jobs.spec import validate_spec

    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    spec = validate_spec({"name": "ctx", "model": {"source": str(_model_dir(tmp_path, config)),
                                                   "engine": engine or {}},
                          "input": {"path": str(data)}, "sampling": {"max_tokens": max_tokens},
                          "output": {"path": str(tmp_path / "out")}})
    found: list[str] = []
    model = _resolve_model(spec.model, "model", False, None, found)
    return found + model_problems(spec, model), model


def test_a_max_model_len_beyond_the_models_context_is_refused_unless_rope_scaling_stretches_it(tmp_path):
    problems, _ = _problems(tmp_path, {"max_position_embeddings": 4096}, {"max_model_len": 16384})
    assert problems == ["model.engine.max_model_len: 16384 is beyond the model's context of 4096 tokens (its "
                        "config.json); set at most 4096"]
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    problems, _ = _problems(scaled, {"max_position_embeddings": 4096,
                                     "rope_scaling": {"type": "linear", "factor": 4.0}}, {"max_model_len": 16384})
    assert problems == []


def test_the_default_max_model_len_shrinks_to_a_smaller_models_context(tmp_path):
    problems, model = _problems(tmp_path, {"max_position_embeddings": 1024})
    assert problems == [] and model.max_len == 1024


def test_max_tokens_may_fill_the_context_but_not_go_beyond_it(tmp_path):
    problems, _ = _problems(tmp_path, {"max_position_embeddings": 8192}, {"max_model_len": 512}, max_tokens=512)
    assert problems == []
    other = tmp_path / "other"
    other.mkdir()
    problems, _ = _problems(other, {"max_position_embeddings": 8192}, {"max_model_len": 512}, max_tokens=600)
    assert problems == ["sampling.max_tokens: 600 is beyond the 512-token context that prompt and output share "
                        "(model.engine.max_model_len); set max_tokens at most 512, or raise max_model_len"]


def test_a_hub_model_not_downloaded_yet_is_refused_by_validate_but_left_for_submit_to_fetch(tmp_path, monkeypatch):
    from llmbatch.jobs.resolve import _resolve_model
    from llmbatch.jobs.spec import ModelSpec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model = ModelSpec.model_validate({"source": "some-org/not-downloaded"})
    found: list[str] = []
    assert _resolve_model(model, "model", False, None, found) is None
    assert found and "not in the local Hugging Face cache" in found[0]
    later: list[str] = []
    resolved = _resolve_model(model, "model", False, None, later, fetch_later=True)
    assert later == [] and resolved.path is None and resolved.kind == "hub"


def test_the_read_granularity_is_its_own_setting_defaulting_to_one_engine_batch(tmp_path):
    from llmbatch.jobs.resolve import resolve

    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    raw = {"name": "granularity", "model": {"source": str(_model_dir(tmp_path, {"max_position_embeddings": 4096}))},
           "input": {"path": str(data)}, "output": {"path": str(tmp_path / "out")}, "resources": {"batch_size": 16}}
    assert resolve(validate_spec(raw)).rows_per_read_task == 16
    raw["input"]["rows_per_read_task"] = 500
    assert resolve(validate_spec(raw)).rows_per_read_task == 500


def test_a_cache_inside_the_run_folder_or_an_output_path_that_is_a_run_folder_is_refused(tmp_path):
    from llmbatch.jobs.resolve import overlap_problems

    raw = {"name": "j", "model": {"source": "m"}, "input": {"path": str(tmp_path / "in.jsonl")},
           "output": {"path": str(tmp_path / "out")}, "cache": {"path": str(tmp_path / "out" / "c")}}
    spec = validate_spec(raw)
    (problem,) = overlap_problems(spec, str(tmp_path / "out" / "c"))
    assert problem.startswith(f"cache.path: {tmp_path / 'out' / 'c'} overlaps this run's folder")
    assert overlap_problems(spec, str(tmp_path / "out" / "other")) == []
    (tmp_path / "out" / "r1" / "_lock").mkdir(parents=True)
    nested = validate_spec({**raw, "output": {"path": str(tmp_path / "out" / "r1")}, "cache": None})
    (problem,) = overlap_problems(nested, str(tmp_path / "out" / "r1" / "r2"))
    assert problem.startswith(f"output.path: {tmp_path / 'out' / 'r1'} is itself a run's folder")


def test_progress_lines_warn_of_a_stall_once_every_stall_period():
    """No row done for STALL_WARNING_SECONDS: one `no_rows_yet` warning per period rather than one per line;
    the lines a cluster submitter's view reads go on beside it, with the replicas' states."""
    import structlog
    from structlog.testing import capture_logs

    from llmbatch.jobs.run import STALL_WARNING_SECONDS, ProgressLines
    from llmbatch.pipelines.progress_report import PassProgress, ReplicaState

    stalled = PassProgress(rows_total=10, replicas_ready=1, replicas_seen=1,
                           replicas=(ReplicaState("r1", "n1", "ready"),))
    for replicas_shown, progress_lines in ((0, 1), (8, 6)):
        lines = ProgressLines(structlog.get_logger(), started=0.0, replicas_shown=replicas_shown)
        with capture_logs() as logged:
            for now in (60.0, STALL_WARNING_SECONDS + 5, STALL_WARNING_SECONDS + 10, STALL_WARNING_SECONDS + 20,
                        2 * STALL_WARNING_SECONDS + 1, 2 * STALL_WARNING_SECONDS + 5):
                lines.write(stalled, now)
        assert [e["elapsed_s"] for e in logged if e["event"] == "no_rows_yet"] == [
            round(STALL_WARNING_SECONDS + 5), round(2 * STALL_WARNING_SECONDS + 1)]
        progress = [e for e in logged if e["event"] == "progress"]
        assert len(progress) == progress_lines
        assert ("replicas" in progress[0]) == bool(replicas_shown)
    with capture_logs() as logged:
        ProgressLines(structlog.get_logger(), started=0.0).write(
            PassProgress(rows_total=10, rows_done=4, generating_s=2.0), 3 * STALL_WARNING_SECONDS)
    assert [e["event"] for e in logged] == ["progress"] and logged[0]["rows_done"] == 4
