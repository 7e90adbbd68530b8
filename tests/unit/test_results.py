"""`llmbatch results`: a committed run folder written by hand, read back with the input's own prompt (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from llmbatch.jobs.cli import main
from llmbatch.jobs.results import output_column, render_results, results_json
from llmbatch.jobs.run_index import record_started
from llmbatch.pipelines.run_files import MANIFEST_NAME, part_name
from llmbatch.pipelines.schema import output_schema
from manifest_samples import earlier_manifest

SYSTEM = "You are a concise assistant. Answer in one or two sentences."
LONG_ANSWER = ("Paris is the capital of France. It has been the seat of the French government for centuries,\n"
               "and it is also the country's largest city by far.")


def chat(user: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def committed_run(root: Path, inputs: list[dict[str, Any]], input_types: dict[str, pa.DataType],
                  spec_input: dict[str, Any], *, run_id: str = "base1") -> Path:
    """A run folder as run_job leaves it: one part with the output schema, and the manifest."""
    run = root / "out" / "quickstart" / run_id
    run.mkdir(parents=True)
    schema = output_schema(pa.schema(list(input_types.items())), [pa.field("score_exact", pa.bool_())])
    names = dict(zip(input_types, [f.name for f in schema][1:]))
    answers = [LONG_ANSWER, None, "The Nile \x1b[31mflows\x1b[0m through Cairo."]
    rows = []
    for number, (given, answer) in enumerate(zip(inputs, answers)):
        rows.append({"id": f"row-{number}", **{names[k]: v for k, v in given.items()},
                     "prompt": chat(f"question {number}") if answer is not None else None,
                     "generated_text": answer, "finish_reason": "stop" if answer else None,
                     "num_input_tokens": 30, "num_generated_tokens": 20 if answer else None,
                     "error": None if answer else "prompt too long: 3000 tokens, the model takes 2048",
                     "score_exact": (number == 0) if answer else None, "model": "m", "run_id": run_id})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run / part_name(1, "ab12", 0))
    base = earlier_manifest()
    spec = {**base["spec"], "input": {**base["spec"]["input"], **spec_input}}
    rows_section = {"in": 3, "out": 3, "ok": 2, "error": 1, "duplicate_ids": 0}
    manifest = earlier_manifest(run_id=run_id, spec=spec, rows=rows_section, status="succeeded_with_errors",
                                output={"path": f"out/quickstart/{run_id}", "files": [part_name(1, "ab12", 0)]},
                                summary=None)
    (run / MANIFEST_NAME).write_text(json.dumps(manifest))
    return run


QUESTIONS = ["What is the capital of France?", "A prompt far too long", "Which river flows through Cairo?"]


@pytest.fixture
def prompt_run(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    inputs = [{"qid": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)]
    return committed_run(tmp_path, inputs, {"qid": pa.string(), "prompt": pa.string()}, {"prompt_column": "prompt"})


def test_rows_show_the_inputs_own_prompt_not_the_chat_template(prompt_run: Path):
    screen = render_results(str(prompt_run), 3)
    assert "<|im_start|>" not in screen and SYSTEM not in screen.split("first 3 rows:")[1]
    assert "    prompt     What is the capital of France?" in screen
    assert "    prompt     A prompt far too long" in screen
    assert "    error      prompt too long: 3000 tokens, the model takes 2048" in screen
    assert "    output     The Nile flows through Cairo." in screen  # escape sequences removed
    assert "    scores     exact=True" in screen
    cut = next(line for line in screen.splitlines() if line.startswith("    output     Paris"))
    assert cut.endswith("…") and len(cut) == 15 + 100 and "\n" not in cut


def test_paths_are_absolute_however_the_run_was_named(prompt_run: Path):
    screen = render_results("out/quickstart/base1/", 0)
    assert f"  output       {prompt_run}\n" in screen
    assert f"  manifest     {prompt_run}/{MANIFEST_NAME}" in screen


def test_full_prints_whole_texts_with_later_lines_indented(prompt_run: Path):
    screen = render_results(str(prompt_run), 1, full=True)
    first, second = LONG_ANSWER.split("\n")
    assert f"    output     {first}\n               {second}" in screen
    assert "…" not in screen


def test_json_holds_the_summary_and_whole_rows(prompt_run: Path):
    shown = results_json(str(prompt_run), 2)
    assert shown["run_uri"] == str(prompt_run) and shown["summary"]["run_id"] == "base1"
    assert shown["summary"]["rows"]["error"] == 1
    first, second = shown["rows"]
    assert first["input"] == {"prompt": QUESTIONS[0]} and first["generated_text"] == LONG_ANSWER
    assert first["rendered_prompt"] == chat("question 0") and first["scores"] == {"exact": True}
    assert second["error"].startswith("prompt too long") and second["generated_text"] is None
    assert results_json(str(prompt_run), 0)["rows"] == []


def test_results_latest_and_results_json_on_the_command_line(prompt_run: Path):
    record_started("base1", job="quickstart", model="m", run_uri="out/quickstart/base1", log_path=None)
    result = CliRunner().invoke(main, ["results", "latest", "--rows", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "run base1: succeeded_with_errors" in result.stdout and f"  output       {prompt_run}" in result.stdout
    assert "    prompt     What is the capital of France?" in result.stdout
    result = CliRunner().invoke(main, ["results", "base1", "--json", "--rows", "3"], catch_exceptions=False)
    shown = json.loads(result.stdout)
    assert [row["input"]["prompt"] for row in shown["rows"]] == QUESTIONS
    assert "\\u001b[31m" in result.stdout  # JSON escapes what a terminal would act on


def test_results_of_an_unknown_run_points_at_runs(prompt_run: Path):
    result = CliRunner().invoke(main, ["results", "nope"])
    assert result.exit_code == 2 and "llmbatch runs" in result.output


def test_template_jobs_show_each_field_the_template_takes(tmp_path: Path):
    inputs = [{"question": q, "context": f"context {i}", "other": "x"} for i, q in enumerate(QUESTIONS)]
    run = committed_run(tmp_path, inputs, {"question": pa.string(), "context": pa.string(), "other": pa.string()},
                        {"template": "Q: {question}\nContext: {context}\nA:", "prompt_column": "prompt"})
    screen = render_results(str(run), 1)
    assert "    question   What is the capital of France?\n    context    context 0\n" in screen
    assert "other" not in screen.split("first 1 rows:")[1]


def test_chat_jobs_show_the_last_user_turn(tmp_path: Path):
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    inputs = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                            {"role": "assistant", "content": "noted"}]} for q in QUESTIONS]
    run = committed_run(tmp_path, inputs, {"messages": pa.list_(message)}, {"messages_column": "messages"})
    screen = render_results(str(run), 1)
    assert "    prompt     What is the capital of France?\n" in screen
    assert results_json(str(run), 1)["rows"][0]["input"]["messages"][1]["content"] == QUESTIONS[0]


def test_without_the_input_column_the_rendered_prompt_is_shown(tmp_path: Path):
    inputs = [{"qid": f"q{i}"} for i in range(3)]
    run = committed_run(tmp_path, inputs, {"qid": pa.string()}, {"prompt_column": "text"})
    screen = render_results(str(run), 1)
    assert "    rendered   <|im_start|>system You are a concise assistant." in screen


@pytest.mark.parametrize("inputs, wanted, column", [
    (["prompt"], "prompt", "input_prompt"),
    (["question", "id"], "question", "question"),
    (["id"], "id", "input_id"),
    (["prompt", "input_prompt"], "prompt", "input_input_prompt"),
    (["prompt", "input_prompt"], "input_prompt", "input_prompt"),
    (["cached"], "cached", "input_cached"),  # a name a job with a result cache writes itself
    (["topic"], "prompt", None),
])
def test_the_output_column_of_an_input_column(inputs: list[str], wanted: str, column: str | None):
    names = output_schema(pa.schema([(n, pa.string()) for n in inputs]), [pa.field("cached", pa.bool_())]).names
    assert output_column(wanted, names) == column
