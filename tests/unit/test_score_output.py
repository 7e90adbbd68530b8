"""Scores from engine output, and the output row each input row becomes."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from llmbatch.pipelines.columns import INFERENCE_ERROR, RENDERED_PROMPT
from llmbatch.pipelines.infer import sampling_params
from llmbatch.pipelines.output import conform_output, to_output_row
from llmbatch.pipelines.schema import OutputRow, output_names_for_inputs, output_schema
from llmbatch.pipelines.logprobs import cumulative_logprob, finish_reason, mean_logprob


def step(token: int, logprob, rank: int = 1) -> dict:
    return {token: {"logprob": logprob, "rank": rank, "decoded_token": None}}


# ---- cumulative_logprob --------------------------------------------------------------------------

def test_cumulative_logprob_sums_each_generated_tokens_own_logprob():
    tokens = [11, 22, 33]
    steps = [step(11, -0.5), {22: {"logprob": -1.25, "rank": 2}, 99: {"logprob": -0.1, "rank": 1}},
             step(33, -0.25)]
    assert cumulative_logprob(tokens, steps) == pytest.approx(-2.0)


def test_cumulative_logprob_accepts_string_token_keys_and_bare_floats():
    assert cumulative_logprob([5, 6], [{"5": {"logprob": -1.0}}, {6: -0.5}]) == pytest.approx(-1.5)


def test_cumulative_logprob_clamps_minus_infinity():
    value = cumulative_logprob([1, 2], [step(1, float("-inf")), step(2, -1.0)])
    assert math.isfinite(value)
    assert value == pytest.approx(-1e9 - 1.0)


@pytest.mark.parametrize("tokens, steps", [
    (None, [step(1, -0.1)]),
    ([], [step(1, -0.1)]),
    ([1], None),
    ([1], []),
    ([1, 2], [step(1, -0.1), None]),               # a step without logprobs
    ([1, 2], [step(1, -0.1), {}]),                 # an empty step
    ([1, 2], [step(1, -0.1), step(3, -0.2)]),      # the sampled token is missing from its step
    ([1], [step(1, float("nan"))]),
    ([1], [step(1, None)]),
])
def test_cumulative_logprob_is_none_when_it_cannot_be_computed(tokens, steps):
    assert cumulative_logprob(tokens, steps) is None


def test_mean_logprob_divides_by_generated_tokens():
    assert mean_logprob(-3.0, 4) == pytest.approx(-0.75)


@pytest.mark.parametrize("cumulative, n", [(None, 3), (-1.0, 0), (-1.0, None)])
def test_mean_logprob_is_none_without_data(cumulative, n):
    assert mean_logprob(cumulative, n) is None


@pytest.mark.parametrize("n_in, n_gen, max_tokens, max_len, expected", [
    (10, 64, 64, None, "length"),   # hit max_tokens
    (10, 65, 64, None, "length"),
    (10, 12, 64, None, "stop"),     # EOS / stop string
    (10, 12, 64, 22, "length"),     # hit the context limit
    (10, 11, 64, 22, "stop"),
    (0, 0, 1, None, "stop"),
])
def test_finish_reason(n_in, n_gen, max_tokens, max_len, expected):
    assert finish_reason(n_in, n_gen, max_tokens, max_len) == expected


# ---- infer helpers (pure) ------------------------------------------------------------------------

def test_sampling_params_asks_for_the_sampled_tokens_logprob_and_omits_unset_options():
    assert sampling_params(64, 0.0, 1.0, None, None, []) == {
        "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "logprobs": 0}
    full = sampling_params(8, 0.7, 0.9, 40, 123, ["\n\n"])
    assert full["top_k"] == 40 and full["seed"] == 123 and full["stop"] == ["\n\n"]


# ---- to_output_row -------------------------------------------------------------------------------

COMMON = dict(model="smollm2-135m-instruct", run_id="run-1", max_tokens=8, max_model_len=2048)


def engine_row(**overrides) -> dict:
    row = {
        "id": "a.jsonl#0",
        "_input": {"prompt": "hi", "topic": "greeting"},
        "_row_error": None,
        "prompt": "<user>hi",
        "tokenized_prompt": [1, 2, 3],
        RENDERED_PROMPT: "<user>hi",
        INFERENCE_ERROR: "",
        "generated_text": "Hello!",
        "generated_tokens": [7, 8],
        "logprobs": [step(7, -0.5), step(8, -1.5)],
        "num_input_tokens": 3,
        "num_generated_tokens": 2,
    }
    row.update(overrides)
    return row


def test_success_row_has_text_scores_and_no_error():
    out = to_output_row(engine_row(), input_columns=output_names_for_inputs(["prompt", "topic"]), **COMMON)
    assert out == {
        "id": "a.jsonl#0",
        "input_prompt": "hi",
        "topic": "greeting",
        "prompt": "<user>hi",
        "generated_text": "Hello!",
        "finish_reason": "stop",
        "num_input_tokens": 3,
        "num_generated_tokens": 2,
        "cumulative_logprob": pytest.approx(-2.0),
        "mean_logprob": pytest.approx(-1.0),
        "perplexity": pytest.approx(math.e),
        "error": None,
        "model": "smollm2-135m-instruct",
        "run_id": "run-1",
    }
    OutputRow.model_validate(out)


def test_success_row_that_hit_max_tokens_finishes_with_length():
    row = engine_row(num_generated_tokens=8, generated_tokens=list(range(8)), logprobs=None)
    out = to_output_row(row, input_columns=output_names_for_inputs(["prompt"]), **COMMON)
    assert out["finish_reason"] == "length"
    assert out["cumulative_logprob"] is None and out["mean_logprob"] is None


def test_success_row_with_empty_generation_has_empty_text_not_null():
    row = engine_row(generated_text=None, generated_tokens=[], num_generated_tokens=0, logprobs=[])
    out = to_output_row(row, input_columns=output_names_for_inputs(["prompt"]), **COMMON)
    assert out["generated_text"] == ""
    assert out["error"] is None
    assert out["num_generated_tokens"] == 0
    OutputRow.model_validate(out)


def test_render_error_row_keeps_inputs_and_error_without_results():
    row = {"id": "a.jsonl#4", "_input": {"prompt": None, "topic": "x"}, "_row_error": "prompt column 'prompt' is null",
           "prompt": None, "tokenized_prompt": None, RENDERED_PROMPT: None, INFERENCE_ERROR: "prompt column 'prompt' is null"}
    out = to_output_row(row, input_columns=output_names_for_inputs(["prompt", "topic"]), **COMMON)
    assert out["error"] == "prompt column 'prompt' is null"
    assert out["input_prompt"] is None and out["topic"] == "x"
    for key in ("prompt", "generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens",
                "cumulative_logprob", "mean_logprob"):
        assert out[key] is None, key
    assert out["model"] == COMMON["model"] and out["run_id"] == "run-1"
    OutputRow.model_validate(out)


def test_row_error_alone_also_makes_an_error_row():
    row = {"id": "x#0", "_input": {"prompt": "p"}, "_row_error": "id column 'key' is null"}
    out = to_output_row(row, input_columns=output_names_for_inputs(["prompt"]), **COMMON)
    assert out["error"] == "id column 'key' is null"
    assert out["generated_text"] is None


def test_engine_error_row_reports_inference_error_and_prompt_token_count():
    row = engine_row(**{INFERENCE_ERROR: "EngineDeadError: boom"}, generated_text=None,
                     num_generated_tokens=None, generated_tokens=None, logprobs=None)
    out = to_output_row(row, input_columns=output_names_for_inputs(["prompt", "topic"]), **COMMON)
    assert out["error"] == "EngineDeadError: boom"
    assert out["prompt"] == "<user>hi"
    assert out["num_input_tokens"] == 3
    assert out["generated_text"] is None and out["finish_reason"] is None
    assert out["num_generated_tokens"] is None and out["cumulative_logprob"] is None
    OutputRow.model_validate(out)


def test_empty_inference_error_string_means_success():
    out = to_output_row(engine_row(**{INFERENCE_ERROR: ""}), input_columns=output_names_for_inputs([]), **COMMON)
    assert out["error"] is None
    assert out["generated_text"] == "Hello!"


@pytest.mark.parametrize("name", ["id", "prompt", "generated_text", "finish_reason", "error", "model", "run_id",
                                  "num_input_tokens", "mean_logprob"])
def test_input_column_colliding_with_an_output_name_becomes_input_name(name):
    row = engine_row(_input={name: "from input"})
    out = to_output_row(row, input_columns=output_names_for_inputs([name]), **COMMON)
    assert out[f"input_{name}"] == "from input"
    assert out[name] != "from input"


def test_missing_input_column_in_row_is_null():
    out = to_output_row(engine_row(_input=None), input_columns=output_names_for_inputs(["topic"]), **COMMON)
    assert out["topic"] is None


def test_non_ascii_generated_text_and_inputs_pass_through():
    row = engine_row(_input={"q": "ما هي عاصمة فرنسا؟"}, generated_text="巴黎 🇫🇷")
    out = to_output_row(row, input_columns=output_names_for_inputs(["q"]), **COMMON)
    assert out["q"] == "ما هي عاصمة فرنسا؟"
    assert out["generated_text"] == "巴黎 🇫🇷"


# ---- conform_output ------------------------------------------------------------------------------

def test_conform_output_casts_to_the_exact_output_schema():
    input_schema = pa.schema([("prompt", pa.string()), ("score", pa.int64())])
    schema = output_schema(input_schema)
    rows = [
        to_output_row(engine_row(_input={"prompt": "hi", "score": 3}), input_columns=output_names_for_inputs(["prompt", "score"]), **COMMON),
        to_output_row({"id": "a.jsonl#1", "_input": {"prompt": None, "score": None}, "_row_error": "bad"},
                      input_columns=output_names_for_inputs(["prompt", "score"]), **COMMON),
    ]
    batch = pa.Table.from_pylist(rows)
    assert batch.schema != schema  # inferred types/order differ
    out = conform_output(batch, schema_bytes=schema.serialize().to_pybytes(), counter=None)
    assert out.schema == schema
    assert out.schema.metadata == {b"llmbatch.schema_version": b"1"}
    assert out.column("id").to_pylist() == ["a.jsonl#0", "a.jsonl#1"]
    assert out.column("input_prompt").to_pylist() == ["hi", None]
    assert out.column("score").to_pylist() == [3, None]
    assert out.column("error").to_pylist() == [None, "bad"]
    assert out.column("num_input_tokens").type == pa.int64()


def test_conform_output_fills_absent_columns_with_typed_nulls():
    schema = output_schema(pa.schema([("topic", pa.string())]))
    batch = pa.table({"id": ["x#0"], "error": ["boom"], "model": ["m"], "run_id": ["r"]})
    out = conform_output(batch, schema_bytes=schema.serialize().to_pybytes(), counter=None)
    assert out.schema == schema
    assert out.column("topic").to_pylist() == [None]
    assert out.column("cumulative_logprob").type == pa.float64()
    assert out.column("cumulative_logprob").null_count == 1


def test_conform_output_converts_uncastable_columns_via_python_values():
    schema = output_schema(pa.schema([("tags", pa.list_(pa.string()))]))
    batch = pa.table({"id": ["x#0"], "tags": pa.array([None], pa.null()),
                      "num_input_tokens": pa.array([5], pa.int32())})
    out = conform_output(batch, schema_bytes=schema.serialize().to_pybytes(), counter=None)
    assert out.column("tags").type == pa.list_(pa.string())
    assert out.column("num_input_tokens").to_pylist() == [5]


def test_conform_output_reports_progress_to_the_counter():
    calls = []

    class Method:
        def remote(self, *args):
            calls.append(args)

    class Counter:
        add = Method()

    schema = output_schema(pa.schema([]))
    batch = pa.table({"id": ["a", "b", "c"], "error": [None, "x", None],
                      "num_generated_tokens": [4, None, 6]})
    conform_output(batch, schema_bytes=schema.serialize().to_pybytes(), counter=Counter())
    assert calls == [(3, 1, 10)]


def test_perplexity_and_top_logprobs():
    from llmbatch.pipelines.logprobs import perplexity, top_logprobs

    assert perplexity(-1.0) == pytest.approx(math.e) and perplexity(None) is None
    steps = [{5: {"logprob": -0.1, "rank": 1, "decoded_token": "a"}, 7: {"logprob": -2.0, "rank": 2, "decoded_token": "b"},
              9: {"logprob": -3.0, "rank": 3, "decoded_token": "c"}}]
    assert top_logprobs(steps, 2) == [[{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -2.0}]]
    assert top_logprobs(None, 2) is None


def test_completion_logprob_sums_the_completion_tokens_only():
    from llmbatch.pipelines.logprobs import completion_logprob

    token_ids = [1, 2, 3, 4]
    prompt_logprobs = [None, {2: {"logprob": -5.0}}, {3: {"logprob": -0.5}}, {4: {"logprob": -0.25}}]
    assert completion_logprob(prompt_logprobs, token_ids, 2) == pytest.approx(-0.75)
    assert completion_logprob(prompt_logprobs, token_ids, 0) is None
    assert completion_logprob(prompt_logprobs[:3], token_ids, 2) is None  # misaligned: no guess


def test_score_task_row_takes_the_most_likely_choice():
    from llmbatch.pipelines.columns import CHOICE_RESULTS_COLUMN
    from llmbatch.pipelines.columns import CHOICES_COLUMN

    row = engine_row()
    row[CHOICES_COLUMN] = [{"text": " London", "tokens": [8]}, {"text": " Paris", "tokens": [9, 10]}]
    row[CHOICE_RESULTS_COLUMN] = [{"logprob": -4.0, "num_tokens": 1}, {"logprob": -1.0, "num_tokens": 2}]
    out = to_output_row(row, input_columns=output_names_for_inputs(["prompt", "topic"]), task="score", **COMMON)
    assert out["choice"] == 1 and out["generated_text"] == " Paris"
    assert out["choice_logprobs"] == [-4.0, -1.0] and out["choice_num_tokens"] == [1, 2]
    assert out["cumulative_logprob"] == -1.0 and out["mean_logprob"] == -0.5 and out["finish_reason"] is None
    assert OutputRow.model_validate(out).error is None

    row[CHOICE_RESULTS_COLUMN] = [{"logprob": None, "num_tokens": 1}, {"logprob": -1.0, "num_tokens": 2}]
    failed = to_output_row(row, input_columns=output_names_for_inputs(["prompt", "topic"]), task="score", **COMMON)
    assert failed["error"].startswith("score: the engine returned no prompt logprobs")
