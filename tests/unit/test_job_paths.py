"""Relative paths in a job file are the job file's; in --set values, the current directory's."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmbatch.errors import SpecError
from llmbatch.jobs.spec import load_spec

JOB = """name: paths
model: {{source: "{model}"}}
input: {{path: "{input}"}}
output: {{path: "{output}"}}
{extra}"""


def write(folder: Path, model="smollm2-135m-instruct", input="data/prompts.jsonl", output="../out", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    job.write_text(JOB.format(model=model, input=input, output=output, extra=extra), encoding="utf-8")
    return job


def test_paths_in_the_file_are_taken_from_its_folder(tmp_path: Path, monkeypatch):
    job = write(tmp_path / "jobs", extra="cache: {path: cache/}\n")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(os.path.relpath(job))
    assert spec.input.path == str(tmp_path / "jobs" / "data" / "prompts.jsonl")
    assert spec.output.path == str(tmp_path / "out")
    assert spec.cache.path == str(tmp_path / "jobs" / "cache") + "/"
    assert spec.model.source == "smollm2-135m-instruct"  # a catalog name is not a path


def test_set_values_are_taken_from_the_current_directory(tmp_path: Path, monkeypatch):
    job = write(tmp_path / "jobs")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    spec = load_spec(job, ["input.path=mine.jsonl", "output={path: results}"])
    assert spec.input.path == str(tmp_path / "here" / "mine.jsonl")
    assert spec.output.path == str(tmp_path / "here" / "results")


def test_absolute_s3_home_and_templated_paths_stay(tmp_path: Path):
    schedule = "schedule: {cron: '0 2 * * *'}\n"
    job = write(tmp_path, input="s3://bucket/prompts/{ds}/", output="/abs/out", model="~/models/m", extra=schedule)
    spec = load_spec(job)
    assert (spec.input.path, spec.output.path, spec.model.source) == ("s3://bucket/prompts/{ds}/", "/abs/out",
                                                                       "~/models/m")
    templated = load_spec(write(tmp_path / "t", input="days/{ds}/*.jsonl", extra=schedule))
    assert templated.input.path == str(tmp_path / "t" / "days" / "{ds}" / "*.jsonl")


def test_a_model_folder_beside_the_job_is_a_path_and_a_hub_id_is_not(tmp_path: Path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert load_spec(write(tmp_path, model="models/tiny")).model.source == str(tmp_path / "models" / "tiny")
    assert load_spec(write(tmp_path, model="./elsewhere")).model.source == str(tmp_path / "elsewhere")
    assert load_spec(write(tmp_path, model="Qwen/Qwen2.5-0.5B")).model.source == "Qwen/Qwen2.5-0.5B"


def test_a_missing_job_file_names_where_it_looked(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as caught:
        load_spec("nowhere.yaml")
    assert str(tmp_path / "nowhere.yaml") in caught.value.lines[0]
