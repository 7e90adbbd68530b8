"""User errors answer with one clear line per problem and exit 2, before any engine starts."""
from __future__ import annotations

from pathlib import Path

from support import REPO, run_cli, write_job


def test_validate_accepts_the_quickstart_job(demo_model: str):
    proc = run_cli("validate", "jobs/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "ok: jobs/quickstart.yaml is valid" in proc.stdout


def test_invalid_spec_exits_2_with_one_line_per_problem(tmp_path: Path):
    job = tmp_path / "bad.yaml"
    job.write_text(
        "name: Bad Name\n"
        "model:\n  source: smollm2-135m-instruct\n  engin: {}\n"
        "input:\n  path: jobs/data/quickstart.jsonl\n"
        "sampling:\n  max_tokens: 0\n  temprature: 0.5\n"
        "output:\n  path: out/x\n",
        encoding="utf-8",
    )
    for command in ("validate", "submit"):
        proc = run_cli(command, str(job))
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[0] == f"error: {job}: invalid job spec"
        assert "  sampling.max_tokens: must be greater than 0" in lines
        assert "  model.engin: unknown key (did you mean 'engine'?)" in lines
        assert "  sampling.temprature: unknown key (did you mean 'temperature'?)" in lines
        assert any(line.startswith("  name: ") for line in lines)


def test_set_override_errors_name_the_field(tmp_path: Path):
    proc = run_cli("submit", "jobs/quickstart.yaml", "--set", "resources.replicas=zero")
    assert proc.returncode == 2
    assert "resources.replicas: must be a number, [min, max] with 1 <= min <= max, or auto" in proc.stderr


def test_malformed_yaml_points_at_the_line(tmp_path: Path):
    job = tmp_path / "broken.yaml"
    job.write_text("name: x\nmodel: [unclosed\n", encoding="utf-8")
    proc = run_cli("validate", str(job))
    assert proc.returncode == 2 and f"{job}:" in proc.stderr and "not valid YAML" in proc.stderr


def test_missing_input_and_unknown_model_are_reported_together(tmp_path: Path):
    job = write_job(tmp_path / "job.yaml", name="missing", model={"source": "./no/such/model"},
                    input={"path": str(tmp_path / "nothing-here.jsonl")}, output={"path": str(tmp_path / "out")})
    proc = run_cli("validate", str(job))
    assert proc.returncode == 2
    assert f"input.path: {tmp_path / 'nothing-here.jsonl'} does not exist" in proc.stderr
    assert "model.source:" in proc.stderr and "does not exist" in proc.stderr


def test_hub_model_offline_gives_a_clear_error(tmp_path: Path):
    job = write_job(tmp_path / "job.yaml", name="hub", model={"source": "meta-llama/Llama-2-7b-chat-hf"},
                    input={"path": str(REPO / "jobs/data/quickstart.jsonl")}, output={"path": str(tmp_path / "out")})
    proc = run_cli("validate", str(job), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "hub model 'meta-llama/Llama-2-7b-chat-hf' is not in the local Hugging Face cache" in proc.stderr


def test_missing_bucket_names_the_bucket(tmp_path: Path, s3):
    job = write_job(tmp_path / "job.yaml", name="nobucket", model={"source": "smollm2-135m-instruct"},
                    input={"path": "s3://no-such-bucket/prompts/"}, output={"path": str(tmp_path / "out")})
    proc = run_cli("validate", str(job))
    assert proc.returncode == 2
    assert "bucket 'no-such-bucket'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_id_that_escapes_the_output_root_is_refused(demo_model: str):
    proc = run_cli("submit", "jobs/quickstart.yaml", "--run-id", "../../etc")
    assert proc.returncode == 2 and "--run-id" in proc.stderr


def _checkpoint_without_weights(tmp_path: Path) -> Path:
    import shutil

    from llmbatch.cluster.home import models_dir

    source = models_dir() / "smollm2-135m-instruct"
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin"):
            shutil.copy(item, folder / item.name)
    return folder


def test_validate_catches_what_submit_would_refuse_without_starting_ray(tmp_path: Path, demo_model: str):
    """Each job below would fail in submit; validate says so first: exit 2, one line naming the field."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"question": "Capital of Italy?", "answer": "Rome"}\n', encoding="utf-8")
    base = {"name": "checks", "model": {"source": demo_model, "engine": {"max_model_len": 512}},
            "input": {"path": str(data), "prompt_column": "question"}, "output": {"path": str(tmp_path / "out")}}
    cases = {
        "input.id_column: column 'qid' is not in the input; it has: question, answer": {"input": {"id_column": "qid"}},
        "input.template: column 'topic' is not in the input": {"input": {"template": "About {topic}: {question}"}},
        "scoring.0.rubric: no column 'rationale'": {"scoring": [{"name": "judged", "kind": "judge",
                                                                  "rubric": "Is {rationale} right?"}]},
        "input.format: csv, but prompts.jsonl is jsonl by its name; set input.format: jsonl": {
            "input": {"format": "csv"}},
        "sampling.max_tokens: 600 is beyond the 512-token context": {"sampling": {"max_tokens": 600}},
        "model.engine.max_model_len: 100000 is beyond the model's context of 8192 tokens": {
            "model": {"engine": {"max_model_len": 100000}}},
        f"model.source: {tmp_path / 'no-weights'} holds config.json but no weights": {
            "model": {"source": str(_checkpoint_without_weights(tmp_path))}},
    }
    for number, (expected, change) in enumerate(cases.items()):
        job = {section: dict(value) if isinstance(value, dict) else value for section, value in base.items()}
        for section, value in change.items():
            job[section] = {**job[section], **value} if isinstance(value, dict) and section in job else value
        if "model" in change:
            job["model"] = {**base["model"], **change["model"]}
        path = write_job(tmp_path / f"job-{number}.yaml", **job)
        proc = run_cli("validate", str(path))
        assert proc.returncode == 2, (expected, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines == [f"error: {lines[0].removeprefix('error: ')}"] and expected in lines[0], (expected, lines)
        assert "Traceback" not in proc.stderr and "ray" not in proc.stderr.lower()
