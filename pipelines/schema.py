"""Output row schema v1: the public contract of every output parquet file."""
from __future__ import annotations

from typing import Any, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

# Columns llmbatch writes, in order; the input row's own columns go between `id` and `prompt`.
RESULT_FIELDS: list[pa.Field] = [
    pa.field("prompt", pa.string()),
    pa.field("generated_text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("num_input_tokens", pa.int64()),
    pa.field("num_generated_tokens", pa.int64()),
    pa.field("cumulative_logprob", pa.float64()),
    pa.field("mean_logprob", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
]
RESERVED = {"id"} | {f.name for f in RESULT_FIELDS}
INPUT_PREFIX = "input_"


def output_names_for_inputs(input_names: list[str]) -> dict[str, str]:
    """Input column -> output column. Names llmbatch writes itself become `input_<name>` (repeated until
    free), so `prompt` comes back as `input_prompt` and no two output columns share a name."""
    taken = set(RESERVED) | {n for n in input_names if n not in RESERVED}
    mapping = {}
    for name in input_names:
        renamed = name
        if name in RESERVED:
            renamed = INPUT_PREFIX + name
            while renamed in taken:
                renamed = INPUT_PREFIX + renamed
            taken.add(renamed)
        mapping[name] = renamed
    return mapping


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    names = output_names_for_inputs(input_schema.names)
    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(names[f.name], f.type) for f in input_schema]
    fields += RESULT_FIELDS
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
    error: Optional[str] = Field(None, description="Why this row has no result; null on success.")
    model: str = Field(..., description="model.source of the job.")
    run_id: str = Field(..., description="The run that wrote this row.")

    def model_post_init(self, _context: Any) -> None:
        if self.error is None and (self.generated_text is None or self.finish_reason is None):
            raise ValueError(f"row {self.id}: no error, so generated_text and finish_reason must be set")
        if self.error is not None and self.generated_text is not None:
            raise ValueError(f"row {self.id}: an error row carries no generated_text")
