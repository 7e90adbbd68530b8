"""`llmbatch init`: a commented job file for an input, its prompt column picked from the input's columns."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from llmbatch.errors import UserError
from llmbatch.jobs.spec import parse_yaml, validate_spec
from llmbatch.pipelines.read import COMPRESSION_BY_EXTENSION, FORMAT_BY_EXTENSION, iter_shard, list_input_files
from llmbatch.storage import is_s3

DEMO_MODEL = "smollm2-135m-instruct"
PLACEHOLDER_INPUT = "prompts.jsonl"
PROMPT_NAMES = ("prompt", "question", "instruction", "text", "input")
REFERENCE_NAMES = ("answer", "reference", "expected", "target", "label", "output")
ID_NAMES = ("id", "qid", "uid", "key")


@dataclass(frozen=True)
class InputColumns:
    """What a scaffold needs to know of an input: its columns and which of them the prompt comes from."""
    names: tuple[str, ...]
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None
    reference_column: str | None = None


def read_input_columns(path: str) -> InputColumns:
    """The columns of the input's first file (from its first rows), and the prompt column picked from them."""
    first = list_input_files(path)[0]
    try:
        table = next(iter_shard(first.uri, first.format), None)
    except (OSError, ValueError) as exc:
        raise UserError(f"--input: cannot read {first.uri}: {exc}") from None
    if table is None or not table.num_rows:
        raise UserError(f"--input: {first.uri} holds no rows")
    table = table.drop_columns(["_row_number", "_row_error"])
    rows = table.to_pylist()
    names = tuple(table.column_names)
    messages = next((n for n in names if _holds_messages([r.get(n) for r in rows])), None)
    texts = [n for n in names if _is_text(table.schema.field(n).type)]
    named = next((n for wanted in PROMPT_NAMES for n in texts if n.lower() == wanted), None)
    ids = _named(names, ID_NAMES)
    prompt = named or next((n for n in texts if n not in (messages, ids)), None)
    if messages is None and prompt is None:
        raise UserError(f"--input: {first.uri} has no text column to take prompts from; it has: "
                        f"{', '.join(names) or '(no columns)'}")
    return InputColumns(names, prompt, messages, ids, _named([n for n in texts if n != prompt], REFERENCE_NAMES))


def _named(names, wanted: tuple[str, ...]) -> str | None:
    return next((n for w in wanted for n in names if n.lower() == w), None)


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _holds_messages(values: list[Any]) -> bool:
    """Whether a column's values are chat messages: lists of {role, content}."""
    given = [v for v in values if v is not None]
    return bool(given) and all(
        isinstance(v, list) and v and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in v)
        for v in given)


def job_name_for(path: str) -> str:
    """A job name (spec's NAME_PATTERN) from the input's file or folder name: `My Prompts.jsonl.gz` -> my-prompts."""
    parts = [p for p in path.rstrip("/").split("/") if p and not any(c in p for c in "*?[")]
    stem = parts[-1] if parts else ""
    for known in (COMPRESSION_BY_EXTENSION, FORMAT_BY_EXTENSION):
        base, ext = os.path.splitext(stem)
        if ext.lower() in known:
            stem = base
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "job"


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip() \
        .removesuffix("...").strip()


def _input_path_for(input_path: str, job_file: Path) -> str:
    """The input as the job file names it: relative paths are read from the job file's folder."""
    if is_s3(input_path) or "://" in input_path or os.path.isabs(os.path.expanduser(input_path)):
        return input_path
    return os.path.relpath(os.path.abspath(input_path), job_file.absolute().parent)


def job_file_text(columns: InputColumns | None, input_path: str, model: str, name: str) -> str:
    """The job file, one comment per section."""
    lines = [
        "# Job file written by `llmbatch init`; `llmbatch spec` lists every field.",
        "# Check it with `llmbatch preview` (the prompts as the model sees them) and `llmbatch validate`.",
        f"name: {_scalar(name)}",
        "",
        "# The model: a catalog name, a local checkpoint directory, an s3:// prefix or a Hugging Face hub id.",
        "model:",
        f"  source: {_scalar(model)}",
        "  engine:",
        "    dtype: auto                 # float32 on CPU, the checkpoint's dtype on GPU",
        "    # max_model_len: 4096       # prompt plus generation; default: the model's own context",
        "",
        "# The input (relative paths are read from this file's folder) and the column the prompt comes from.",
        "input:",
        f"  path: {_scalar(input_path)}",
    ]
    if columns is None:
        lines.append("  prompt_column: prompt         # the column holding each row's prompt text")
    else:
        lines.append(f"  # columns: {', '.join(columns.names)}")
        if columns.messages_column:
            lines.append(f"  messages_column: {_scalar(columns.messages_column)}   # chat messages: a list of "
                         "{role, content}")
            if columns.prompt_column:
                lines.append(f"  # prompt_column: {_scalar(columns.prompt_column)}   # or a text prompt instead")
        else:
            lines.append(f"  prompt_column: {_scalar(columns.prompt_column)}")
        if columns.id_column:
            lines.append(f"  # id_column: {_scalar(columns.id_column)}   # unique row ids to keep in the output; "
                         "default: <file>#<row number>")
    if columns is None or not columns.messages_column:
        field = columns.prompt_column if columns is not None else "prompt"
        lines.append(f"  # template: 'Answer briefly. {{{field}}}'   # or build the prompt from the row's columns")
    lines += [
        "  # system_prompt: You are a concise assistant.",
        "  # limit: 10                   # only the first rows, for a smoke run",
        "",
        "# How to generate: greedy unless temperature > 0.",
        "sampling:",
        "  max_tokens: 256",
        "  temperature: 0.0",
        "",
    ]
    if columns is not None and columns.reference_column:
        lines += [
            f"# Scorers add score_<name> columns; this one compares the output with '{columns.reference_column}'.",
            "# scoring:",
            f"#   - {{name: exact, kind: exact_match, reference_column: {_scalar(columns.reference_column)}}}",
            "",
        ]
    lines += [
        "# Where results go: each run writes parquet and a manifest under {path}/{run_id}/.",
        "output:",
        f"  path: {_scalar('out/' + name)}",
        "",
        "# Engine replicas and rows per batch sent to one (`llmbatch plan` sizes a pool).",
        "resources:",
        "  replicas: 1",
        "  batch_size: 32",
        "",
    ]
    return "\n".join(lines)


def write_job_file(out: str | None, input_path: str | None, model: str = DEMO_MODEL, force: bool = False
                   ) -> tuple[Path, InputColumns | None, str]:
    """Write a job file for `input_path` (a placeholder input when None) at `out` (default: <name>.yaml);
    returns where, the input's columns and the job name."""
    columns = read_input_columns(input_path) if input_path else None
    name = job_name_for(input_path) if input_path else "my-job"
    target = Path(out or f"{name}.yaml")
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to replace it, or --out another file")
    if target.is_dir():
        raise UserError(f"--out {target} is a directory; give a file name, e.g. {target / (name + '.yaml')}")
    text = job_file_text(columns, _input_path_for(input_path, target) if input_path else PLACEHOLDER_INPUT,
                         model, name)
    validate_spec(parse_yaml(text, str(target)), source=str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target, columns, name
