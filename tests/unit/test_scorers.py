"""Row scorers, the judge's parsing, run summaries and the comparison report (no Ray)."""
from __future__ import annotations


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.pipelines.run_files import part_name
from llmbatch.jobs.compare import choose_metric, render_html, render_markdown, RunPoint, scatter_svg
from llmbatch.errors import SpecError, UserError
from llmbatch.jobs.spec import validate_spec
from llmbatch.pipelines.columns import JUDGE_SKIPPED
from llmbatch.pipelines.judge import after_judge, judge_messages, judge_sampling_params, parse_judgement
from llmbatch.pipelines.render import RowError
from llmbatch.pipelines.run_summary import summarize
from llmbatch.pipelines.scorer_specs import JudgeScorerBase, read_scorers, score_fields, scorer_problems
from llmbatch.pipelines.scorers import ScoreStage, normalize, strip_code_fence
from llmbatch.run_manifest import Rows
from manifest_samples import earlier_manifest

BASE = {"name": "j", "model": {"source": "m"}, "input": {"path": "p"}, "output": {"path": "o"}}


def scorers(*items: dict) -> list:
    """Scorer specs as the job spec holds them (a judge's as its pass carries it: without its engine)."""
    specs = validate_spec({**BASE, "scoring": list(items)}).scoring
    return [s.grading() if s.kind == "judge" else s for s in specs]


def build_scorer(spec, columns: dict[str, str]):
    return spec.build(columns)


def row(text: str | None = "Paris.", **extra) -> dict:
    return {"id": "r1", "prompt": "q", "generated_text": text, "error": None, "answer": "paris", **extra}


def test_exact_match_applies_normalisation_to_both_sides():
    strict, loose = scorers({"name": "a", "kind": "exact_match", "reference_column": "answer"},
                            {"name": "b", "kind": "exact_match", "reference_column": "answer",
                             "normalize": ["lowercase", "punctuation", "strip"]})
    assert build_scorer(strict, {})(row()) is False
    assert build_scorer(loose, {})(row()) is True


def test_normalize_articles_and_whitespace():
    assert normalize("  The   Eiffel  tower ", ["articles", "whitespace", "lowercase"]) == "eiffel tower"


def test_contains_with_a_column_or_a_fixed_text():
    by_column, by_text = scorers({"name": "a", "kind": "contains", "reference_column": "answer",
                                  "normalize": ["lowercase"]}, {"name": "b", "kind": "contains", "text": "Rome"})
    assert build_scorer(by_column, {})(row("It is Paris")) is True
    assert build_scorer(by_text, {})(row("It is Paris")) is False


def test_reference_column_renamed_in_the_output_is_found():
    (scorer,) = scorers({"name": "a", "kind": "exact_match", "reference_column": "prompt"})
    out = row("q2", input_prompt="q2")
    assert build_scorer(scorer, {"prompt": "input_prompt"})(out) is True


def test_regex_search_full_match_and_case():
    search, full, nocase = scorers({"name": "a", "kind": "regex", "pattern": r"\d+"},
                                   {"name": "b", "kind": "regex", "pattern": r"\d+", "full_match": True},
                                   {"name": "c", "kind": "regex", "pattern": "paris", "ignore_case": True})
    assert build_scorer(search, {})(row("about 42 days")) is True
    assert build_scorer(full, {})(row("about 42 days")) is False
    assert build_scorer(nocase, {})(row("PARIS")) is True


def test_json_valid_and_schema_accept_a_code_fence():
    valid, shaped = scorers({"name": "a", "kind": "json_valid"},
                            {"name": "b", "kind": "json_schema", "schema": {
                                "type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}}})
    fenced = '```json\n{"age": 3}\n```'
    assert strip_code_fence(fenced) == '{"age": 3}'
    assert build_scorer(valid, {})(row(fenced)) is True
    assert build_scorer(valid, {})(row("{age: 3}")) is False
    assert build_scorer(shaped, {})(row('{"age": 3}')) is True
    assert build_scorer(shaped, {})(row('{"age": "3"}')) is False


def test_invalid_json_schema_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE, "scoring": [{"name": "a", "kind": "json_schema", "schema": {"type": "nope"}}]})
    assert err.value.lines[0].startswith("scoring.0.schema: not a valid JSON Schema")


def test_chrf_from_sacrebleu():
    (scorer,) = scorers({"name": "a", "kind": "chrf", "reference_column": "answer"})
    assert build_scorer(scorer, {})(row("paris")) == pytest.approx(100.0)
    assert 0 <= build_scorer(scorer, {})(row("berlin")) < 30


def plus_one(row: dict, offset: int = 1) -> float:
    if row["generated_text"] == "boom":
        raise RuntimeError("cannot score boom")
    return len(row["generated_text"]) + offset


def test_python_scorer_gets_options_and_its_failures_become_row_errors():
    (scorer,) = scorers({"name": "n", "kind": "python", "function": "test_scorers:plus_one", "options": {"offset": 10}})
    stage = ScoreStage([scorer], {})
    table = stage(pa.Table.from_pylist([row("abc"), {**row("boom"), "id": "r2"}]))
    out = table.to_pylist()
    assert out[0]["score_n"] == 13.0 and out[0]["error"] is None
    assert out[1]["score_n"] is None and out[1]["generated_text"] == "boom"
    assert out[1]["error"] == "score_n: test_scorers:plus_one raised RuntimeError: cannot score boom"


def keyed(row: dict, api_key: str, model: str = "m") -> float:
    return float(api_key == "s3cr3t" and model == "m-s3cr3t")


def test_python_scorer_options_take_secrets_by_env_reference_read_where_the_scorer_runs(monkeypatch):
    spec = {"name": "k", "kind": "python", "function": "test_scorers:keyed",
            "options": {"api_key": "${SCORER_KEY}", "model": "m-${SCORER_KEY}"}}
    monkeypatch.delenv("SCORER_KEY", raising=False)
    (scorer,) = scorers(spec)
    assert scorer_problems([scorer], [], []) == [
        "scoring.0.options.api_key: ${SCORER_KEY} is not set; set it where the job runs (on a cluster, in every "
        "node's environment)",
        "scoring.0.options.model: ${SCORER_KEY} is not set; set it where the job runs (on a cluster, in every "
        "node's environment)"]
    out = ScoreStage([scorer], {})(pa.Table.from_pylist([row("abc")])).to_pylist()
    assert out[0]["error"] == "score_k: options: ${SCORER_KEY} is not set where the scorer runs"
    monkeypatch.setenv("SCORER_KEY", "s3cr3t")
    assert scorer_problems([scorer], [], []) == []
    assert ScoreStage([scorer], {})(pa.Table.from_pylist([row("abc")])).to_pylist()[0]["score_k"] == 1.0
    assert scorer.model_dump(mode="json")["options"] == spec["options"]  # what the run records


@pytest.mark.parametrize("options, named", [({"api_key": "sk-123"}, "api_key"), ({"auth": {"token": "t"}}, "auth.token"),
                                            ({"headers": {"X-Api-Key": "k"}}, "headers.X-Api-Key"),
                                            ({"password": "pw"}, "password")])
def test_a_secret_written_into_a_python_scorers_options_is_refused(options, named):
    with pytest.raises(SpecError) as refused:
        scorers({"name": "k", "kind": "python", "function": "m:f", "options": options})
    (line,) = refused.value.lines
    assert line.startswith(f"scoring.0.options: {named}: a secret written into the job file") and "${ENV_VAR}" in line


def test_options_that_only_sound_like_secrets_are_kept():
    (scorer,) = scorers({"name": "k", "kind": "python", "function": "m:f",
                         "options": {"max_tokens": 5, "tokenizer": "gpt2", "token": "${T}", "token_limit": 3}})
    assert scorer.options["tokenizer"] == "gpt2"


def slow(row: dict) -> float:
    import time

    if row["generated_text"] == "slow":
        while True:  # a scorer stuck in its own loop, catching what it can
            try:
                time.sleep(0.01)
            except Exception:
                pass
    return 1.0


@pytest.mark.parametrize("on_a_thread", [False, True])
def test_a_python_scorer_past_its_timeout_costs_the_row_its_score_not_the_job(on_a_thread):
    import threading

    (scorer,) = scorers({"name": "t", "kind": "python", "function": "test_scorers:slow", "timeout_seconds": 0.2})
    table = pa.Table.from_pylist([row("slow"), {**row("fast"), "id": "r2"}])
    out: list = []
    if on_a_thread:
        worker = threading.Thread(target=lambda: out.extend(ScoreStage([scorer], {})(table).to_pylist()))
        worker.start()
        worker.join(10)
    else:
        out = ScoreStage([scorer], {})(table).to_pylist()
    assert out[0]["score_t"] is None and out[0]["error"] == "score_t: test_scorers:slow took longer than 0.2 s (timeout_seconds)"
    assert out[1]["score_t"] == 1.0 and out[1]["error"] is None


def test_a_regex_that_backtracks_without_end_is_stopped_for_that_row(monkeypatch):
    from llmbatch.pipelines import scorers as scorer_functions

    monkeypatch.setattr(scorer_functions, "REGEX_TIMEOUT_SECONDS", 0.2)
    (scorer,) = scorers({"name": "r", "kind": "regex", "pattern": r"(a|aa)+$"})
    out = ScoreStage([scorer], {})(pa.Table.from_pylist([row("a" * 60 + "b"), {**row("aaa"), "id": "r2"}])).to_pylist()
    assert out[0]["score_r"] is None and out[0]["error"] == "score_r: the pattern took longer than 0.2 s on this output"
    assert out[1]["score_r"] is True


def test_null_reference_is_a_row_error_and_failed_rows_are_not_scored():
    (scorer,) = scorers({"name": "e", "kind": "exact_match", "reference_column": "answer"})
    out = ScoreStage([scorer], {})(pa.Table.from_pylist([
        row(answer=None), {**row(None), "id": "r2", "error": "engine died"}])).to_pylist()
    assert out[0]["error"] == "score_e: reference column 'answer' is null" and out[0]["score_e"] is None
    assert out[1]["error"] == "engine died" and out[1]["score_e"] is None


def test_score_columns_types_and_judge_raw_text():
    fields = score_fields(scorers({"name": "a", "kind": "regex", "pattern": "x"},
                                  {"name": "b", "kind": "judge", "rubric": "{generated_text}"},
                                  {"name": "c", "kind": "python", "function": "m:f", "returns": "boolean"}))
    assert [(f.name, f.type) for f in fields] == [
        ("score_a", pa.bool_()), ("score_b", pa.float64()), ("score_b_raw", pa.string()), ("score_c", pa.bool_())]


def test_scoring_spec_errors_name_the_yaml_path():
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE, "scoring": [{"name": "a", "kind": "regex", "pattern": "(", "flags": 1},
                                           {"name": "a", "kind": "bleu"}]})
    assert "scoring.0.pattern: not a valid regular expression" in err.value.lines[0]
    assert "scoring.0.flags: unknown key" in " ".join(err.value.lines)
    assert any(line.startswith("scoring.1.kind: 'bleu' is not a scorer kind; the kinds are exact_match")
               for line in err.value.lines)


def test_judge_is_constrained_to_the_scale_and_parsed_strictly():
    params = judge_sampling_params([1, 5])
    assert params["structured_outputs"] == {"choice": ["1", "2", "3", "4", "5"]}
    assert parse_judgement(" 4\n", [1, 5]) == 4
    with pytest.raises(ValueError):
        parse_judgement("four", [1, 5])
    with pytest.raises(RowError):
        judge_messages({"generated_text": "x"}, JudgeScorerBase(name="j", kind="judge", rubric="{missing}"))


def test_after_judge_fills_scores_or_errors():
    (judge,) = scorers({"name": "q", "kind": "judge", "rubric": "{generated_text}"})
    judged = row("Paris")
    ok = after_judge({"_judged_row": judged, "generated_text": "5", "__inference_error__": ""},
                     scorer=judge, inference_error="__inference_error__")
    assert ok["score_q"] == 5.0 and ok["score_q_raw"] == "5" and ok["error"] is None
    skipped = after_judge({"_judged_row": {**judged, "error": "x", "generated_text": None},
                           "__inference_error__": JUDGE_SKIPPED}, scorer=judge, inference_error="__inference_error__")
    assert skipped["score_q"] is None and skipped["error"] == "x"
    failed = after_judge({"_judged_row": judged, "__inference_error__": "engine died"},
                         scorer=judge, inference_error="__inference_error__")
    assert failed["error"] == "score_q: judge failed: engine died" and failed["generated_text"] == "Paris"


def manifest(run_id: str = "r", cost: float | None = 0.5, generated: int = 1000, scoring: list | None = None) -> dict:
    earlier = earlier_manifest()
    return earlier_manifest(
        run_id=run_id, job="j", status="succeeded", model={**earlier["model"], "source": "m"},
        spec={**earlier["spec"], "task": "generate", "sampling": {"temperature": 0.0, "max_tokens": 8},
              "scoring": scoring or []},
        rows={"in": 4, "out": 4, "ok": 3, "error": 1}, tokens={"input": 10, "generated": generated},
        wall_seconds=10.0, output_tokens_per_second=100.0,
        cost={**earlier["cost"], "usd": cost} if cost is not None else None)


def test_summary_aggregates_scores_from_the_output_parts(tmp_path):
    specs = scorers({"name": "ok", "kind": "regex", "pattern": "a"},
                    {"name": "q", "kind": "judge", "rubric": "{generated_text}", "scale": [1, 3]})
    table = pa.table({
        "id": ["1", "2", "3", "4"], "error": [None, None, None, "score_q: judge failed: x"],
        "finish_reason": ["stop", "length", "stop", "stop"],
        "mean_logprob": [-1.0, -2.0, -3.0, -1.0], "perplexity": [2.7, 7.4, 20.1, 2.7],
        "num_generated_tokens": [1, 2, 3, 4],
        "score_ok": [True, False, True, None], "score_q": [1.0, 3.0, 3.0, None]})
    pq.write_table(table, tmp_path / part_name(1, "0", 0))
    (tmp_path / "_staging").mkdir()
    pq.write_table(table, tmp_path / "_staging" / part_name(1, "1", 0))
    summary = summarize(str(tmp_path), manifest(scoring=[s.model_dump(mode="json") for s in specs]))
    assert summary["scores"]["ok"] == {"kind": "regex", "type": "boolean", "scored": 3, "null": 1,
                                       "passed": 2, "pass_rate": pytest.approx(2 / 3, abs=1e-6)}
    judge = summary["scores"]["q"]
    assert judge["mean"] == pytest.approx(7 / 3, abs=1e-6)
    assert judge["buckets"] == [{"value": 1, "count": 1}, {"value": 2, "count": 0}, {"value": 3, "count": 2}]
    assert summary["errors"] == {"failed_rows": 0, "by_scorer": {"ok": 0, "q": 1}}
    assert summary["intrinsic"]["finish_reason"] == {"stop": 3, "length": 1}
    assert summary["cost_per_million_output_tokens_usd"] == pytest.approx(500.0)


def point(run_id: str, quality: float | None, speed: float | None, cost: float | None) -> RunPoint:
    return RunPoint(run_id=run_id, path=f"out/{run_id}", model="m", sampling="temperature=0.0",
                    quality=quality, output_tok_s=speed, cost_per_million=cost,
                    rows=Rows.model_validate({"in": 1, "out": 1, "ok": 1, "error": 0}), wall_seconds=1.0)


def test_compare_metric_choice():
    a = {"run_id": "a", "scores": {"x": {}, "y": {}}}
    b = {"run_id": "b", "scores": {"y": {}}}
    assert choose_metric([a, b], None) == "y"
    assert choose_metric([b, {"run_id": "c", "scores": {}}], None) == "mean_logprob"
    with pytest.raises(UserError, match="run\\(s\\) b have no scorer 'x'"):
        choose_metric([a, b], "score_x")


def test_compare_report_has_a_point_per_run_in_each_chart():
    points = [point("a", 0.5, 100.0, 2.0), point("b", 0.7, 50.0, 4.0), point("c", None, 10.0, 1.0)]
    page = render_html("exact", points)
    assert page.count('class="point"') == 4  # two charts x two runs with a quality figure
    assert "Best on exact: **m · b**" in render_markdown("exact", points)
    assert "no run has both figures" in scatter_svg("t", "x", "y", [])


def numpy_flag(row: dict):
    import numpy as np

    return np.bool_(len(row["generated_text"]) > 3)


def test_python_scorer_accepts_numpy_results():
    (scorer,) = scorers({"name": "n", "kind": "python", "function": "test_scorers:numpy_flag", "returns": "boolean"})
    assert build_scorer(scorer, {})(row("long enough")) is True


def test_a_scorer_library_failure_is_one_rows_error():
    (scorer,) = scorers({"name": "j", "kind": "json_valid"})
    out = ScoreStage([scorer], {})(pa.Table.from_pylist([row("[" * 100000)])).to_pylist()[0]
    assert out["score_j"] is None and out["error"].startswith("score_j: RecursionError")


def test_check_scorers_finds_missing_functions_and_rubric_columns():
    specs = scorers({"name": "p", "kind": "python", "function": "no_such_module_here:f"},
                    {"name": "q", "kind": "judge", "rubric": "{question} -> {generated_text} vs {answr}"})
    problems = scorer_problems(specs, ["id", "generated_text", "prompt"], ["question", "answer"])
    assert problems[0].startswith("scoring.0.function: python scorer no_such_module_here:f: cannot import")
    assert problems[1].startswith("scoring.1.rubric: no column 'answr'; the rubric can use answer, generated_text")


def test_scorer_names_cannot_clash_with_a_judges_raw_column_and_score_tasks_keep_no_logprobs():
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE, "scoring": [{"name": "q", "kind": "judge", "rubric": "{generated_text}"},
                                           {"name": "q_raw", "kind": "json_valid"}]})
    assert "clashes with the judge column score_q_raw" in err.value.lines[0]
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE, "task": "score", "input": {"path": "p", "completion_column": "c"},
                       "sampling": {"logprobs": 2}})
    assert err.value.lines == ["sampling.logprobs: task: score generates nothing to keep top logprobs of"]


def test_run_cost_counts_generation_and_each_judge_pass():
    from llmbatch.cluster.accelerators import ACCELERATORS
    from llmbatch.jobs.finalize import run_cost

    cost = run_cost(3600, 2, ACCELERATORS["CPU"], {"q": {"wall_seconds": 1800, "devices": 1}})
    price = ACCELERATORS["CPU"].hourly_usd
    assert cost["generation_usd"] == pytest.approx(2 * price) and cost["judges_usd"] == pytest.approx(price / 2)
    assert cost["usd"] == pytest.approx(2.5 * price)
    assert run_cost(10, 1, None, {}) is None


def test_a_recorded_judge_reads_back_without_its_engine_and_every_kind_round_trips():
    specs = validate_spec({**BASE, "scoring": [
        {"name": "a", "kind": "exact_match", "reference_column": "answer"},
        {"name": "b", "kind": "json_schema", "schema": {"type": "object"}},
        {"name": "c", "kind": "python", "function": "m:f", "returns": "boolean"},
        {"name": "q", "kind": "judge", "rubric": "{generated_text}", "model": {"source": "judge-m"}, "replicas": 2},
    ]}).scoring
    read = read_scorers([s.model_dump(mode="json") for s in specs])
    assert [type(s).__name__ for s in read] == [
        "ExactMatchScorer", "JsonSchemaScorer", "PythonScorer", "JudgeScorerBase"]
    assert read[1].schema_ == {"type": "object"} and read[2].is_boolean and not read[3].is_boolean
    assert read[3] == specs[3].grading() and read[3].needs_engine and not read[0].needs_engine
    assert [s.input_columns() for s in read] == [["answer"], [], [], []]


def test_run_data_is_literal_text_in_the_comparison_and_on_the_terminal():
    from llmbatch.jobs.results import _short

    from dataclasses import replace

    hostile = replace(point("r|1 <img src=x onerror=alert(1)>", 0.5, 1.0, 1.0),
                      model="m`x` [link](http://e) **bold**\nnext")
    markdown = render_markdown("exact", [hostile])
    row = markdown.splitlines()[6]
    assert row.startswith("| r\\|1 &lt;img src=x onerror=alert\\(1\\)&gt; | m\\`x\\` \\[link\\]\\(http://e\\) "
                          "\\*\\*bold\\*\\* next |")
    assert "<img" not in render_html("exact", [hostile]) and "&lt;img" in render_html("exact", [hostile])
    assert _short("ok\x1b[31mred\x1b]0;title\x07 \x1b[2J\x07\x00 end", 100) == "okred end"


def test_a_json_schema_that_refers_outside_itself_is_refused_before_any_row():
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE, "scoring": [{"name": "a", "kind": "json_schema", "schema": {
            "type": "object", "properties": {"x": {"$ref": "http://127.0.0.1:9/evil.json"}}}}]})
    assert err.value.lines[0].startswith("scoring.0.schema: $ref 'http://127.0.0.1:9/evil.json' points outside")
    (local,) = scorers({"name": "a", "kind": "json_schema", "schema": {
        "$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}}})
    assert build_scorer(local, {})(row('{"x": 3}')) is True and build_scorer(local, {})(row('{"x": "3"}')) is False
