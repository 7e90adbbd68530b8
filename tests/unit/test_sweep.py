"""`llmbatch sweep`: run ids and spec copies per model, a failed model that leaves the others running and
exits 1, and the report's projection of each model at full size (the runs stood in for; no Ray, no engine)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from llmbatch.cluster import model_store, profiles
from llmbatch.cluster.accelerators import accelerator
from llmbatch.errors import JobFailed
from llmbatch.jobs import plan as plan_module
from llmbatch.jobs import sweep
from llmbatch.jobs.cli import main
from llmbatch.jobs.full_size import at_rows, without_limit
from llmbatch.jobs.plan import TokenEstimate, engine_settings, plan_job
from llmbatch.jobs.remote import Submission
from llmbatch.jobs.run import RunResult, check_run_id
from llmbatch.jobs.spec import load_spec, validate_spec
from llmbatch.pipelines.run_files import MANIFEST_NAME
from llmbatch.run_manifest import Manifest
from manifest_samples import earlier_manifest

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "torch_dtype": "float16", "hidden_act": "silu", "tie_word_embeddings": False}
FULL_ROWS = 20_000   # the whole input, as the planner counts it; the job's input.limit is 4
RUN_ID = re.compile(r"^sweepy-(?P<slug>[a-z0-9.-]+)-\d{8}-\d{6}-[0-9a-f]{4}$")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMBATCH_PROFILE_STORE", str(tmp_path / "profiles"))
    for name in ("LLMBATCH_PRICES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # the fake checkpoints have no tokenizer; the rows counted show whether input.limit was removed
    monkeypatch.setattr(plan_module, "count_input_tokens", lambda job: TokenEstimate(
        job.spec.input.limit or FULL_ROWS, 50 * (job.spec.input.limit or FULL_ROWS), "counted every row"))
    monkeypatch.chdir(tmp_path)


def checkpoint(folder: Path, config: dict | None = LLAMA2_7B) -> Path:
    """A checkpoint's config and an empty weight file: enough to plan, not to run."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def job_file(tmp_path) -> Path:
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{n}"}) + "\n" for n in range(6)))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sweepy", "model": {"source": str(checkpoint(tmp_path / "base-model")),
                                    "engine": {"max_model_len": 2048}},
        "input": {"path": str(prompts), "limit": 4}, "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": 64}, "scoring": [{"name": "has_text", "kind": "regex", "pattern": r"\w"}]}))
    return path


class StandIn:
    """run_here's stand-in: commits a run folder holding a manifest (an earlier run's, renamed), or fails
    for a model whose folder is named *broken-run* (the job failed) or *crashed-run* (anything else)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __call__(self, spec, run_id, display, **_) -> RunResult:
        self.calls.append((spec.model.source, run_id))
        if "broken-run" in spec.model.source:
            raise JobFailed("the pipeline stopped: an engine ran out of memory")
        if "crashed-run" in spec.model.source:
            raise RuntimeError("the engine process died")
        run_uri = commit_run(spec, run_id)
        manifest = Manifest.model_validate(json.loads(Path(run_uri, MANIFEST_NAME).read_text()))
        return RunResult(run_id, run_uri, manifest.status, manifest)


def commit_run(spec, run_id: str) -> str:
    run = Path(spec.output.path) / run_id
    run.mkdir(parents=True)
    base = earlier_manifest()
    manifest = earlier_manifest(run_id=run_id, job=spec.name, spec=spec.model_dump(mode="json"),
                                model={**base["model"], "source": spec.model.source},
                                output={**base["output"], "path": str(run)})
    (run / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(run)


@pytest.fixture
def stand_in(monkeypatch) -> StandIn:
    runner = StandIn()
    monkeypatch.setattr(sweep, "run_here", runner)
    return runner


def invoke(*args: str):
    return CliRunner().invoke(main, ["sweep", *args])


@pytest.mark.parametrize("source, slug", [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ("/models/Tiny_Llama/", "tiny-llama"),
    ("s3://bucket/models/Qwen2.5..7B", "qwen2.5.7b"),
    ("./--odd--.name.", "odd-.name"),
    ("???", "model"),
])
def test_model_slugs(source, slug):
    assert sweep.model_slug(source) == slug


def test_run_ids_name_the_job_and_the_model_and_are_valid():
    run_id = sweep.sweep_run_id("sweepy", "meta-llama/Llama-3.1-8B-Instruct", "20261206-120000")
    assert RUN_ID.fullmatch(run_id).group("slug") == "llama-3.1-8b-instruct"
    assert run_id.startswith("sweepy-llama-3.1-8b-instruct-20261206-120000-") and check_run_id(run_id)
    long_job = "j" * 100
    shortened = sweep.sweep_run_id(long_job, "x" * 200, "20261206-120000")
    assert len(shortened) == 128 and check_run_id(shortened)
    assert sweep.sweep_run_id("sweepy", "a", "s") != sweep.sweep_run_id("sweepy", "a", "s")


def test_a_spec_copy_replaces_the_model_and_keeps_the_judges_models():
    judge_model = {"source": "judge-model", "engine": {"dtype": "bfloat16"}}
    spec = validate_spec({
        "name": "sweepy", "model": {"source": "first-model", "engine": {"max_model_len": 1024}},
        "input": {"path": "in.jsonl", "limit": 4}, "output": {"path": "out"},
        "scoring": [{"name": "own", "kind": "judge", "rubric": "{generated_text}", "model": judge_model},
                    {"name": "shared", "kind": "judge", "rubric": "{generated_text}"},
                    {"name": "has_text", "kind": "regex", "pattern": "\\w"}]})
    copy = sweep.spec_for_model(spec, "second-model")
    assert copy.model.source == "second-model" and copy.model.engine == spec.model.engine
    own, shared, regex = copy.scoring
    assert own.model == spec.scoring[0].model
    assert shared.model == spec.model  # graded by the job file's model, whichever model runs
    assert regex == spec.scoring[2]
    assert copy.input.limit == 4 and spec.model.source == "first-model"
    full = without_limit(copy)
    assert full.input.limit is None and full.model.source == "second-model" and copy.input.limit == 4


def test_a_relative_model_path_is_taken_from_the_current_directory(tmp_path):
    (tmp_path / "local-model").mkdir()
    assert sweep.given_source("./local-model") == str(tmp_path / "local-model")
    assert sweep.given_source("local-model") == str(tmp_path / "local-model")
    assert sweep.given_source("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_each_model_runs_and_the_report_projects_each_at_full_size(tmp_path, job_file, stand_in):
    first = checkpoint(tmp_path / "first-7b")
    second = checkpoint(tmp_path / "second-7b", {**LLAMA2_7B, "num_hidden_layers": 30})  # another fingerprint
    measured_on_h100(load_spec(job_file), str(first))
    result = invoke(str(job_file), "--model", str(first), "--model", str(second), "--out", "report")
    assert result.exit_code == 0, result.output
    assert [source for source, _ in stand_in.calls] == [str(first), str(second)]
    slugs = [RUN_ID.fullmatch(run_id).group("slug") for _, run_id in stand_in.calls]
    assert slugs == ["first-7b", "second-7b"]
    for _, run_id in stand_in.calls:
        assert (tmp_path / "out" / run_id / MANIFEST_NAME).is_file()
    text = (tmp_path / "report" / "compare.md").read_text()
    assert (tmp_path / "report" / "compare.html").is_file()
    assert all(run_id in text for _, run_id in stand_in.calls)
    projected = text.split("## Projected at full size", 1)[1]
    rows = [line for line in projected.splitlines() if line.startswith("| ") and "H100" in line]
    assert len(rows) == 2
    assert "first-7b" in rows[0] and f"| {FULL_ROWS} |" in rows[0] and "measured profile (1 measurement)" in rows[0]
    assert "second-7b" in rows[1] and "throughput model (no profile on H100-80GB)" in rows[1]
    assert "whole input (input.limit removed)" in projected
    assert "Runs that failed" not in text
    assert result.output.index("# llmbatch model comparison") > result.output.index("model 2 of 2")
    assert "wrote report/compare.md and report/compare.html" in result.output


def measured_on_h100(spec, source: str) -> None:
    """A profile of `source` on H100 for the job's engine settings, as a run on that GPU would leave it."""
    device = accelerator("H100")
    fingerprint = model_store.fingerprint_of(source, Path(source))
    key = profiles.profile_key(fingerprint, device.name, engine_settings(spec, device, 1))
    measurement = profiles.measurement_from_manifest(earlier_manifest(), "run:earlier")
    profiles.record(key, {"model_source": source, "model_fingerprint": fingerprint, "accelerator": device.name},
                    measurement)


def test_a_failed_model_leaves_the_others_running_and_exits_1(tmp_path, job_file, stand_in):
    models = [checkpoint(tmp_path / name) for name in ("first-7b", "broken-run", "crashed-run", "fourth-7b")]
    result = invoke(str(job_file), *[arg for m in models for arg in ("--model", str(m))], "--out", "report")
    assert result.exit_code == 1, result.output
    assert [source for source, _ in stand_in.calls] == [str(m) for m in models]
    assert "2 of 4 model run(s) failed" in result.output
    run_ids = [run_id for _, run_id in stand_in.calls]
    text = (tmp_path / "report" / "compare.md").read_text()
    table, failures = text.split("## Runs that failed")
    assert run_ids[0] in table and run_ids[3] in table and run_ids[1] not in table and run_ids[2] not in table
    assert run_ids[1] in failures and "an engine ran out of memory" in failures
    assert run_ids[2] in failures and "RuntimeError: the engine process died" in failures
    projected = [line for line in failures.split("## Projected at full size")[1].splitlines() if "| H100" in line]
    assert len(projected) == 4  # every model is projected, the failed ones too


def test_a_model_the_planner_cannot_plan_gets_its_reason(tmp_path, job_file, stand_in):
    planned, unplannable = checkpoint(tmp_path / "first-7b"), checkpoint(tmp_path / "no-config", config=None)
    result = invoke(str(job_file), "--model", str(planned), "--model", str(unplannable), "--project-to", "A10G",
                    "--out", "report")
    assert result.exit_code == 0, result.output
    projected = (tmp_path / "report" / "compare.md").read_text().split("## Projected at full size", 1)[1]
    row = next(line for line in projected.splitlines() if "no-config" in line)
    assert "A10G" in row and "not planned: " in row
    assert "A10G" in next(line for line in projected.splitlines() if "first-7b" in line)


def test_rows_scales_the_projection(tmp_path, job_file, stand_in):
    model = checkpoint(tmp_path / "first-7b")
    result = invoke(str(job_file), "--model", str(model), "--rows", "2000000", "--json", "--out", "report")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert set(shown) == {"runs", "report", "projections"}
    assert shown["runs"][0]["status"] == "succeeded" and shown["runs"][0]["model"] == str(model)
    assert shown["report"]["markdown"] == "report/compare.md"
    projection = shown["projections"][0]
    assert projection["rows"] == 2_000_000 and projection["rates"] == "throughput model"
    assert projection["accelerator"] == "H100-80GB" and projection["error"] is None
    assert projection["usd_per_million_output_tokens"] > 0
    assert "2000000 rows (--rows)" in (tmp_path / "report" / "compare.md").read_text()


def test_a_scaled_plan_is_the_plan_of_that_many_rows(job_file):
    spec = without_limit(load_spec(job_file, ["resources.replicas=auto"]))
    plan = plan_job(spec, "H100")
    doubled = at_rows(plan, spec, plan.rows * 2)
    assert doubled.rows == 2 * plan.rows and doubled.output_tokens == 2 * plan.output_tokens
    assert doubled.input_tokens == 2 * plan.input_tokens
    assert doubled.work_seconds == pytest.approx(2 * plan.work_seconds, abs=0.02)
    bigger = at_rows(plan, spec, plan.rows * 1000)
    assert bigger.replicas > plan.replicas  # replicas: auto is chosen again for the work
    assert bigger.replicas_reason.startswith("about an hour of work per replica")


def test_wrong_flags_are_refused_before_any_model_runs(tmp_path, job_file, stand_in):
    model = str(checkpoint(tmp_path / "first-7b"))
    for args, message in [(["--quality", "nope"], "--quality: the job has no scorer 'nope'"),
                          (["--project-to", "H999"], "--project-to: unknown accelerator 'H999'"),
                          (["--model", model], "is given more than once")]:
        result = invoke(str(job_file), "--model", model, *args)
        assert result.exit_code == 2 and message in result.output, result.output
    assert stand_in.calls == []


def test_an_earlier_report_in_out_is_kept_and_nothing_runs(tmp_path, job_file, stand_in):
    model = str(checkpoint(tmp_path / "first-7b"))
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "compare.md").write_text("an earlier sweep's report\n")
    result = invoke(str(job_file), "--model", model, "--out", "report")
    assert result.exit_code == 2 and "already holds compare.md of an earlier report" in result.output, result.output
    assert (tmp_path / "report" / "compare.md").read_text() == "an earlier sweep's report\n"
    assert stand_in.calls == []


def test_on_a_cluster_every_model_is_submitted_before_any_is_waited_for(tmp_path, job_file, stand_in,
                                                                         monkeypatch):
    from llmbatch.jobs import remote

    events: list[str] = []

    def submit(spec, run_id, address, **_):
        events.append(f"submit {run_id}")
        if "broken-run" not in spec.model.source:
            commit_run(spec, run_id)
        return Submission(run_id, address, str(Path(spec.output.path) / run_id), run_id)

    def wait(address, run_id, emit, submission=None):
        events.append(f"wait {run_id}")
        emit(f"log line of {run_id}\n")
        return "FAILED" if "broken-run" in run_id else "SUCCEEDED"

    monkeypatch.setattr(remote, "submit_to_cluster", submit)
    monkeypatch.setattr(remote, "wait_for", wait)
    models = [checkpoint(tmp_path / "first-7b"), checkpoint(tmp_path / "broken-run")]
    result = invoke(str(job_file), *[arg for m in models for arg in ("--model", str(m))],
                    "--address", "http://head:8265", "--out", "report")
    assert result.exit_code == 1, result.output
    assert [e.split()[0] for e in events] == ["submit", "submit", "wait", "wait"]
    assert stand_in.calls == []
    failed_run = events[1].split()[1]
    assert (tmp_path / "report" / "logs" / f"{failed_run}.log").read_text() == f"log line of {failed_run}\n"
    assert f"run {failed_run} (" in result.output and "FAILED" in result.output
    failures = (tmp_path / "report" / "compare.md").read_text().split("## Runs that failed")[1]
    assert failed_run in failures and "ended FAILED" in failures
