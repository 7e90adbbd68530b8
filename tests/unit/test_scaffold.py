"""`llmbatch init`: a job file for an input, with the prompt column picked from the input's columns."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from llmbatch.jobs.cli import main
from llmbatch.jobs.scaffold import DEMO_MODEL, job_name_for
from llmbatch.jobs.spec import load_spec


def init(*args: str):
    return CliRunner().invoke(main, ["init", *args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_takes_the_column_named_like_a_prompt_and_the_file_loads(tmp_path):
    data = write_jsonl(tmp_path / "Geo Quiz.jsonl", [{"id": 1, "topic": "geo", "question": "Capital of France?",
                                                       "answer": "Paris"}])
    out = tmp_path / "job.yaml"
    result = init("--input", str(data), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    spec = load_spec(out)
    assert spec.name == "geo-quiz"
    assert spec.input.prompt_column == "question" and spec.input.messages_column is None
    assert Path(spec.input.path).resolve() == data.resolve()
    assert spec.model.source == DEMO_MODEL
    assert spec.output.path.rstrip("/").endswith("out/geo-quiz")
    text = out.read_text()
    assert "# columns: id, topic, question, answer" in text
    assert "reference_column: answer" in text  # a scorer suggested, commented out
    assert spec.scoring == []


def test_csv_without_a_named_column_takes_the_first_text_column(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("n,title,body\n1,Good,Liked it\n2,Bad,Did not\n")
    out = tmp_path / "reviews.yaml"
    assert init("--input", str(data), "--out", str(out)).exit_code == 0
    assert load_spec(out).input.prompt_column == "title"


def test_a_text_id_column_is_not_taken_for_the_prompt(tmp_path):
    data = write_jsonl(tmp_path / "notes.jsonl", [{"id": "a1", "body": "Summarise this note."}])
    out = tmp_path / "notes.yaml"
    assert init("--input", str(data), "--out", str(out)).exit_code == 0
    spec = load_spec(out)
    assert spec.input.prompt_column == "body"


def test_a_column_of_role_content_lists_becomes_the_messages_column(tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", [
        {"text": "x", "conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"text": "y", "conversation": [{"role": "user", "content": "Hello"}]}])
    out = tmp_path / "chats.yaml"
    result = init("--input", str(data), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "messages_column: conversation" in result.stdout
    spec = load_spec(out)
    assert spec.input.messages_column == "conversation" and spec.input.template is None


def test_parquet_input(tmp_path):
    data = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a"], "instruction": ["Say hi"], "input": [""]}), data)
    out = tmp_path / "p.yaml"
    assert init("--input", str(data), "--out", str(out), "--model", "org/some-model").exit_code == 0
    spec = load_spec(out)
    assert spec.input.prompt_column == "instruction" and spec.model.source == "org/some-model"


def test_default_out_is_the_job_name_in_this_folder_and_paths_are_from_the_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "prompts.jsonl", [{"prompt": "Hi"}])
    monkeypatch.chdir(tmp_path)
    result = init("--input", "data/prompts.jsonl")
    assert result.exit_code == 0, result.output
    spec = load_spec(tmp_path / "prompts.yaml")
    assert Path(spec.input.path).resolve() == (tmp_path / "data" / "prompts.jsonl").resolve()
    nested = tmp_path / "jobs" / "p.yaml"
    assert init("--input", "data/prompts.jsonl", "--out", str(nested)).exit_code == 0
    assert "path: ../data/prompts.jsonl" in nested.read_text()


def test_refuses_to_overwrite_without_force(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi"}])
    out = tmp_path / "job.yaml"
    out.write_text("keep me\n")
    result = init("--input", str(data), "--out", str(out))
    assert result.exit_code == 2
    assert "exists; pass --force" in result.stderr
    assert out.read_text() == "keep me\n"
    assert init("--input", str(data), "--out", str(out), "--force").exit_code == 0
    assert load_spec(out).input.prompt_column == "prompt"


def test_without_input_a_placeholder_job_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = init()
    assert result.exit_code == 0, result.output
    spec = load_spec(tmp_path / "my-job.yaml")
    assert os.path.basename(spec.input.path) == "prompts.jsonl" and spec.input.prompt_column == "prompt"


def test_an_input_without_text_columns_is_a_user_error(tmp_path):
    data = write_jsonl(tmp_path / "numbers.jsonl", [{"a": 1, "b": 2.5}])
    result = init("--input", str(data), "--out", str(tmp_path / "j.yaml"))
    assert result.exit_code == 2
    assert "no text column" in result.stderr and "a, b" in result.stderr
    assert not (tmp_path / "j.yaml").exists()


def test_a_missing_input_is_a_user_error(tmp_path):
    result = init("--input", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "j.yaml"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("path, name", [
    ("data/My Prompts.jsonl.gz", "my-prompts"),
    ("s3://bucket/evals/2026_q1.parquet", "2026-q1"),
    ("data/shards/", "shards"),
    ("data/*.jsonl", "data"),
    ("___.csv", "job"),
])
def test_job_name_from_the_input_name(path, name):
    assert job_name_for(path) == name
