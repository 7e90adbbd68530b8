"""Output stage: one output row (schema v1) per input row, whatever happened to it."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from llmbatch.pipelines.columns import (CACHED_COLUMN, CHOICES_COLUMN, CHOICE_RESULTS_COLUMN, HIT_COLUMN,
                                        ID_COLUMN, INFERENCE_ERROR, INPUT_COLUMN, RENDERED_PROMPT,
                                        ROW_ERROR_COLUMN, TOKENS_COLUMN, TOKEN_LOGPROBS_COLUMN, StageColumns)
from llmbatch.pipelines.result_cache import cached_result
from llmbatch.pipelines.logprobs import cumulative_logprob, finish_reason, mean_logprob, perplexity, top_logprobs



def output_row_columns(task: str, output_names: list[str]) -> StageColumns:
    """What to_output_row reads, and the output row it builds (`output_names`: the output schema's columns
    without the scorers')."""
    scoring = task == "score"
    return StageColumns("output", needs=(ID_COLUMN, INPUT_COLUMN, RENDERED_PROMPT, INFERENCE_ERROR)
                        + ((CHOICES_COLUMN, CHOICE_RESULTS_COLUMN) * scoring), adds=tuple(output_names), keeps=False)


def conform_columns(schema: pa.Schema) -> StageColumns:
    return StageColumns("conform", needs=("error", "num_generated_tokens"), adds=tuple(schema.names), keeps=False)


def to_output_row(row: dict[str, Any], *, input_columns: dict[str, str], model: str, run_id: str,
                  max_tokens: int, max_model_len: int | None, task: str = "generate",
                  logprobs: int | None = None) -> dict[str, Any]:
    cached = cached_result(row)
    error = None if cached is not None else row.get(INFERENCE_ERROR) or row.get(ROW_ERROR_COLUMN) or None
    inputs = row.get(INPUT_COLUMN) or {}
    out: dict[str, Any] = {"id": row[ID_COLUMN]}
    for name, column in input_columns.items():
        out[column] = inputs.get(name)
    tokens = row.get(TOKENS_COLUMN)
    out["prompt"] = row.get(RENDERED_PROMPT)
    if HIT_COLUMN in row:  # the job has a result cache
        out[CACHED_COLUMN] = cached is not None
    if cached is not None:
        out.update(cached, error=None)
    elif error:
        out.update(generated_text=None, finish_reason=None,
                   num_input_tokens=len(tokens) if tokens is not None else None,
                   num_generated_tokens=None, cumulative_logprob=None, mean_logprob=None, perplexity=None,
                   error=str(error))
    elif task == "score":
        out.update(_scored_choices(row, len(tokens) if tokens is not None else None))
    else:
        n_in = int(row.get("num_input_tokens") or 0)
        n_gen = int(row.get("num_generated_tokens") or 0)
        if row.get(TOKEN_LOGPROBS_COLUMN) is not None:  # the seq2seq engine: each generated token's logprob
            cumulative = sum(max(float(v), -1e9) for v in row[TOKEN_LOGPROBS_COLUMN])
        else:
            cumulative = cumulative_logprob(row.get("generated_tokens"), row.get("logprobs"))
        out.update(
            generated_text=row.get("generated_text") or "",
            finish_reason=finish_reason(n_in, n_gen, max_tokens, max_model_len),
            num_input_tokens=n_in,
            num_generated_tokens=n_gen,
            cumulative_logprob=cumulative,
            mean_logprob=mean_logprob(cumulative, n_gen),
            perplexity=perplexity(mean_logprob(cumulative, n_gen)),
            error=None,
        )
        if logprobs:
            given = row.get("top_logprobs")
            out["top_logprobs"] = (given if _is_output_top_logprobs(given)
                                   else top_logprobs(row.get("logprobs"), logprobs))
    out["model"] = model
    out["run_id"] = run_id
    return out


def _is_output_top_logprobs(value: Any) -> bool:
    """An engine that already returns top_logprobs in output form: positions of [{token, logprob}]."""
    if not isinstance(value, (list, tuple)):
        return False
    return all(isinstance(position, (list, tuple))
               and all(isinstance(e, dict) and "token" in e and "logprob" in e for e in position)
               for position in value)


def _scored_choices(row: dict[str, Any], num_prompt_tokens: int | None) -> dict[str, Any]:
    """task: score - the log-likelihood of each completion, and the most likely one as the row's text."""
    choices = row.get(CHOICES_COLUMN) or []
    results = row.get(CHOICE_RESULTS_COLUMN) or []
    sums = [r.get("logprob") for r in results]
    counts = [int(r.get("num_tokens") or 0) for r in results]
    if len(results) != len(choices) or not choices or any(s is None for s in sums):
        return dict(generated_text=None, error="score: the engine returned no prompt logprobs for a completion",
                    num_input_tokens=num_prompt_tokens)
    best = max(range(len(sums)), key=lambda i: sums[i])
    mean = mean_logprob(sums[best], counts[best])
    return dict(
        generated_text=choices[best]["text"], finish_reason=None, num_input_tokens=num_prompt_tokens,
        num_generated_tokens=0, cumulative_logprob=sums[best], mean_logprob=mean, perplexity=perplexity(mean),
        choice=best, choice_logprobs=[float(s) for s in sums], choice_num_tokens=counts, error=None,
    )


def conform_output(batch: pa.Table, *, schema_bytes: bytes, counter=None) -> pa.Table:
    """Cast a batch of output rows to the exact output schema (and report progress)."""
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    columns = []
    for field in schema:
        if field.name in batch.column_names:
            column = batch.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    column = pa.array(column.to_pylist(), field.type)
            columns.append(column)
        else:
            columns.append(pa.nulls(batch.num_rows, field.type))
    table = pa.Table.from_arrays(columns, schema=schema)
    if counter is not None:
        errors = table.num_rows - table.column("error").null_count
        generated = pc.sum(table.column("num_generated_tokens")).as_py() or 0
        counter.add.remote(table.num_rows, errors, generated)
    return table

