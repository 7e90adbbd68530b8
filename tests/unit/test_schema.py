"""Output schema v1: column order, renamed input columns, and the OutputRow contract."""
from __future__ import annotations

import pyarrow as pa
import pytest

from llmbatch.pipelines.schema import (
    RESULT_FIELDS,
    SCHEMA_VERSION,
    OutputRow,
    output_names_for_inputs,
    output_schema,
)

RESULT_NAMES = ["prompt", "generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens",
                "cumulative_logprob", "mean_logprob", "perplexity", "error", "model", "run_id"]


def good_row(**overrides) -> dict:
    row = dict(id="a.jsonl#0", prompt="hi", generated_text="hello", finish_reason="stop",
               num_input_tokens=3, num_generated_tokens=2, cumulative_logprob=-1.0, mean_logprob=-0.5,
               error=None, model="m", run_id="r")
    row.update(overrides)
    return row


def test_output_schema_orders_id_then_input_columns_then_results():
    schema = output_schema(pa.schema([("question", pa.string()), ("score", pa.float64()),
                                      ("tags", pa.list_(pa.string()))]))
    assert schema.names == ["id", "question", "score", "tags"] + RESULT_NAMES
    assert schema.field("id").type == pa.string()
    assert schema.field("id").nullable is False
    assert schema.field("score").type == pa.float64()
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("num_input_tokens").type == pa.int64()
    assert schema.field("cumulative_logprob").type == pa.float64()
    assert schema.metadata == {b"llmbatch.schema_version": str(SCHEMA_VERSION).encode()}


def test_output_schema_renames_colliding_input_columns():
    schema = output_schema(pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("text", pa.string())]))
    assert schema.names == ["id", "input_id", "input_prompt", "text"] + RESULT_NAMES
    assert schema.field("input_id").type == pa.int64()


def test_output_schema_with_no_input_columns():
    assert output_schema(pa.schema([])).names == ["id"] + RESULT_NAMES
    assert [f.name for f in RESULT_FIELDS] == RESULT_NAMES


def test_output_names_keep_free_names_and_prefix_reserved_ones():
    assert output_names_for_inputs(["question", "input_x", "error"]) == {
        "question": "question", "input_x": "input_x", "error": "input_error"}


def test_output_names_skip_a_prefixed_name_the_input_already_uses():
    assert output_names_for_inputs(["prompt", "input_prompt"]) == {
        "prompt": "input_input_prompt", "input_prompt": "input_prompt"}


def test_output_schema_names_are_unique_when_input_is_an_earlier_output():
    """Feeding a run's output back in (it has `prompt` and `input_prompt`) must not produce duplicate columns."""
    earlier_output = pa.schema([("id", pa.string()), ("input_prompt", pa.string()), ("prompt", pa.string()),
                                ("generated_text", pa.string())])
    names = output_schema(earlier_output).names
    assert len(names) == len(set(names)), names


def test_output_row_accepts_a_success_row_and_keeps_input_columns_as_extras():
    row = OutputRow.model_validate(good_row(question="why?"))
    assert row.id == "a.jsonl#0"
    assert row.finish_reason == "stop"
    assert row.model_extra == {"question": "why?"}


def test_output_row_accepts_an_error_row():
    row = OutputRow.model_validate(good_row(generated_text=None, finish_reason=None, num_generated_tokens=None,
                                            cumulative_logprob=None, mean_logprob=None, error="prompt is empty"))
    assert row.error == "prompt is empty"


def test_output_row_rejects_error_row_with_generated_text():
    with pytest.raises(ValueError, match="a row that failed before scoring carries no generated_text"):
        OutputRow.model_validate(good_row(error="boom"))


def test_output_row_rejects_success_row_without_finish_reason():
    with pytest.raises(ValueError, match="must be set"):
        OutputRow.model_validate(good_row(finish_reason=None))


def test_output_row_rejects_success_row_without_generated_text():
    with pytest.raises(ValueError, match="must be set"):
        OutputRow.model_validate(good_row(generated_text=None))


@pytest.mark.parametrize("field, value", [
    ("finish_reason", "eos"),
    ("num_input_tokens", -1),
    ("cumulative_logprob", 0.5),
    ("mean_logprob", 0.1),
    ("id", ""),
])
def test_output_row_rejects_out_of_contract_values(field, value):
    with pytest.raises(ValueError):
        OutputRow.model_validate(good_row(**{field: value}))


def test_output_row_requires_model_and_run_id():
    row = good_row()
    del row["model"]
    with pytest.raises(ValueError):
        OutputRow.model_validate(row)
