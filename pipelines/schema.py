"""Output row schema v1: the public contract of every output parquet file."""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
SCORE_ERROR_PREFIX = "score_"  # a scorer's failure keeps the row's generation

# Columns llmbatch writes, in order; the input row's own columns go between `id` and `prompt`.
RESULT_FIELDS: list[pa.Field] = [
    pa.field("prompt", pa.string()),
    pa.field("generated_text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("num_input_tokens", pa.int64()),
    pa.field("num_generated_tokens", pa.int64()),
    pa.field("cumulative_logprob", pa.float64()),
    pa.field("mean_logprob", pa.float64()),
    pa.field("perplexity", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
]
TOP_LOGPROBS_FIELD = pa.field(
    "top_logprobs", pa.list_(pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())]))))
CHOICE_FIELDS = [
    pa.field("choice", pa.int64()),
    pa.field("choice_logprobs", pa.list_(pa.float64())),
    pa.field("choice_num_tokens", pa.list_(pa.int64())),
]
CACHED_FIELD = pa.field("cached", pa.bool_())  # with a result cache: the result was taken from it
RESERVED = {"id", TOP_LOGPROBS_FIELD.name} | {f.name for f in RESULT_FIELDS + CHOICE_FIELDS}
INPUT_PREFIX = "input_"


def output_names_for_inputs(input_names: list[str], extra_names: list[str] = ()) -> dict[str, str]:
    """Input column -> output column. Names llmbatch writes itself become `input_<name>` (repeated until
    free), so `prompt` comes back as `input_prompt` and no two output columns share a name."""
    reserved = RESERVED | set(extra_names)
    taken = reserved | {n for n in input_names if n not in reserved}
    mapping = {}
    for name in input_names:
        renamed = name
        if name in reserved:
            renamed = INPUT_PREFIX + name
            while renamed in taken:
                renamed = INPUT_PREFIX + renamed
            taken.add(renamed)
        mapping[name] = renamed
    return mapping


def task_fields(task: str, top_logprobs: bool, cached: bool = False) -> list[pa.Field]:
    """Columns a task adds after the common result columns."""
    if task == "score":
        return list(CHOICE_FIELDS)
    return ([TOP_LOGPROBS_FIELD] if top_logprobs else []) + ([CACHED_FIELD] if cached else [])


def output_schema(input_schema: pa.Schema, extra_fields: list[pa.Field] = ()) -> pa.Schema:
    """id, the input's columns, the result columns, then task and scorer columns (before error/model/run_id)."""
    names = output_names_for_inputs(input_schema.names, [f.name for f in extra_fields])
    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(names[f.name], f.type) for f in input_schema]
    tail = [f for f in RESULT_FIELDS if f.name in ("error", "model", "run_id")]
    fields += [f for f in RESULT_FIELDS if f not in tail] + list(extra_fields) + tail
    return pa.schema(fields, metadata={b"llmbatch.schema_version": str(SCHEMA_VERSION).encode()})


class OutputRow(BaseModel):
    """One output row, as readers (and the test suite) parse it. Input columns are extra fields."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(..., min_length=1, description="Stable row id: input.id_column, else '<shard path>#<row number>'.")
    prompt: Optional[str] = Field(None, description="The prompt exactly as the model saw it (chat template applied).")
    generated_text: Optional[str] = Field(None, description="The model's output text; null when the row failed.")
    finish_reason: Optional[str] = Field(None, pattern="^(stop|length)$",
                                         description="stop = end of sequence or a stop string; length = max_tokens or context.")
    num_input_tokens: Optional[int] = Field(None, ge=0, description="Prompt tokens.")
    num_generated_tokens: Optional[int] = Field(None, ge=0, description="Generated tokens.")
    cumulative_logprob: Optional[float] = Field(None, le=0, description="Sum of the generated tokens' logprobs.")
    mean_logprob: Optional[float] = Field(None, le=0, description="cumulative_logprob / num_generated_tokens.")
    perplexity: Optional[float] = Field(None, ge=1, description="exp(-mean_logprob): the model's surprise per token.")
    top_logprobs: Optional[list[list[dict[str, Any]]]] = Field(
        None, description="sampling.logprobs: K most likely {token, logprob} at each generated position.")
    choice: Optional[int] = Field(None, ge=0, description="task: score with choices - index of the most likely choice.")
    choice_logprobs: Optional[list[float]] = Field(
        None, description="task: score - summed logprob of each completion given the prompt.")
    choice_num_tokens: Optional[list[int]] = Field(None, description="task: score - tokens in each completion.")
    cached: Optional[bool] = Field(None, description="With a result cache: true when the result came from it.")
    error: Optional[str] = Field(None, description="Why this row has no result; null on success.")
    model: str = Field(..., description="model.source of the job.")
    run_id: str = Field(..., description="The run that wrote this row.")

    def model_post_init(self, _context: Any) -> None:
        scored = self.choice_logprobs is not None
        if self.error is None and self.generated_text is None:
            raise ValueError(f"row {self.id}: no error, so generated_text must be set")
        if self.error is None and not scored and self.finish_reason is None:
            raise ValueError(f"row {self.id}: no error, so finish_reason must be set")
        if self.error is not None and self.generated_text is not None and not self.error.startswith(SCORE_ERROR_PREFIX):
            raise ValueError(f"row {self.id}: a row that failed before scoring carries no generated_text")
