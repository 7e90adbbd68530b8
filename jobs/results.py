"""`llmbatch results RUN`: a finished run's summary and a sample of its rows, read back later."""
from __future__ import annotations

import os
import re
from typing import Any

import pyarrow.parquet as pq

from llmbatch.errors import UserError
from llmbatch.jobs.summary import render_summary
from llmbatch.pipelines.manifest import manifest_exists, read_manifest
from llmbatch.pipelines.render import template_fields
from llmbatch.pipelines.run_files import output_parts
from llmbatch.pipelines.run_summary import read_summary, summarize
from llmbatch.pipelines.schema import INPUT_PREFIX, RESERVED
from llmbatch.run_manifest import Manifest
from llmbatch.storage import filesystem_for, is_s3, storage_errors

SAMPLE_COLUMNS = ("id", "prompt", "generated_text", "finish_reason", "error")


def load_run(run_uri: str) -> tuple[Manifest, dict[str, Any]]:
    """(manifest, summary) of a committed run; the summary is computed when the run predates summaries."""
    run_uri = run_uri.rstrip("/")
    if not manifest_exists(run_uri):
        raise UserError(f"{run_uri}: no _manifest.json, so this is not a committed run "
                        "(give the run's own directory: output.path/RUN_ID)")
    manifest = read_manifest(run_uri)
    summary = read_summary(run_uri)
    if summary is None:
        summary = summarize(run_uri, manifest)
    return manifest, summary


def input_columns_of(names: list[str]) -> list[str]:
    """The input's own columns in an output file's columns: the ones between `id` and `prompt`."""
    if names[:1] != ["id"] or "prompt" not in names:
        return []
    return names[1:names.index("prompt")]


def output_column(input_name: str, names: list[str]) -> str | None:
    """The output column that holds the input column `input_name`, None when the output has none
    (schema.output_names_for_inputs renames an input column whose name llmbatch writes itself)."""
    inputs = input_columns_of(names)
    if input_name not in RESERVED and input_name not in set(names) - set(inputs):
        return input_name if input_name in inputs else None
    # The renamed column is input_<name>, or input_input_<name> when the input has an input_<name> of its own.
    found, renamed = None, INPUT_PREFIX + input_name
    while renamed in inputs:
        found, renamed = renamed, INPUT_PREFIX + renamed
    return found


def prompt_inputs(spec: dict[str, Any]) -> list[str]:
    """The input columns a row's prompt is built from: its messages column, the template's fields, or its
    prompt column."""
    given = spec.get("input") or {}
    if given.get("messages_column"):
        return [given["messages_column"]]
    if given.get("template"):
        try:
            return list(dict.fromkeys(template_fields(given["template"])))
        except ValueError:
            return []
    return [given.get("prompt_column") or "prompt"]


def prompt_columns(spec: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Input column -> output column, for the columns of prompt_inputs; empty unless the output holds all."""
    found = {name: output_column(name, names) for name in prompt_inputs(spec)}
    return found if found and all(found.values()) else {}  # type: ignore[return-value]


def sample_rows(run_uri: str, count: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The first `count` rows: id, `input` (the input's own values its prompt was built from), the rendered
    prompt, the output, the error and the scores."""
    fs, inner = filesystem_for(run_uri)
    rows: list[dict[str, Any]] = []
    with storage_errors(run_uri, "read rows from"):
        for name in output_parts(fs, inner):
            with fs.open(name, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                inputs = prompt_columns(spec, names)
                scores = [c for c in names if c.startswith("score_") and not c.endswith("_raw")
                          and c not in input_columns_of(names)]
                wanted = list(dict.fromkeys([c for c in SAMPLE_COLUMNS if c in names] + list(inputs.values())
                                            + scores))
                for batch in parquet.iter_batches(columns=wanted, batch_size=count):
                    for row in batch.to_pylist()[: count - len(rows)]:
                        rows.append({
                            "id": row["id"],
                            "input": {name: row[column] for name, column in inputs.items()},
                            "rendered_prompt": row.get("prompt"),
                            "generated_text": row.get("generated_text"),
                            "finish_reason": row.get("finish_reason"),
                            "error": row.get("error"),
                            "scores": {c[len("score_"):]: row[c] for c in scores},
                        })
                    if len(rows) >= count:
                        return rows
    return rows


# Terminal control: CSI and OSC escape sequences, then any other C0/C1 control character.
CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(value: Any) -> str:
    """Run data as a terminal may show it: escape sequences and control characters removed."""
    return CONTROL.sub("", str(value))


def _short(value: Any, width: int) -> str:
    text = " ".join(printable(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


LABEL_WIDTH = 10
INDENT = " " * (4 + LABEL_WIDTH + 1)


def _whole(value: Any) -> str:
    """The whole text, its later lines indented under the first."""
    return printable(value).rstrip("\n").replace("\n", "\n" + INDENT)


def last_user_turn(messages: Any) -> Any:
    """The content of the last user message of a chat (the last message of any role when none is the user's)."""
    if not isinstance(messages, (list, tuple)):
        return messages
    turns = [m for m in messages if isinstance(m, dict)]
    chosen = next((m for m in reversed(turns) if m.get("role") == "user"), turns[-1] if turns else None)
    return chosen.get("content") if chosen else None


def _input_lines(row: dict[str, Any], spec: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, text) for the input's own prompt; the rendered prompt when the output does not hold it."""
    given = row["input"]
    if not given:
        return [("rendered", row["rendered_prompt"])]
    if (spec.get("input") or {}).get("messages_column"):
        return [("prompt", last_user_turn(next(iter(given.values()))))]
    if len(given) == 1 and not (spec.get("input") or {}).get("template"):
        return [("prompt", next(iter(given.values())))]
    return list(given.items())


def render_results(run_uri: str, rows: int, full: bool = False) -> str:
    """The run's summary (paths as found now, absolute) and its first `rows` rows; texts cut to a line unless
    `full`."""
    run_uri = _absolute(run_uri)
    manifest, summary = load_run(run_uri)
    manifest.output.path = run_uri
    lines = [render_summary(manifest, summary)]
    if rows <= 0:
        return "\n".join(lines)
    def shown(value: Any) -> str:
        if value is None:
            return "(null)"
        return _whole(value) if full else _short(value, 100)

    lines.append(f"\nfirst {rows} rows:")
    for row in sample_rows(run_uri, rows, manifest.spec):
        lines.append(f"  {_short(row['id'], 100)}")
        for label, text in _input_lines(row, manifest.spec):
            lines.append(f"    {printable(label):<{LABEL_WIDTH}} {shown(text)}")
        if row["error"]:
            lines.append(f"    {'error':<{LABEL_WIDTH}} {shown(row['error'])}")
        if row["generated_text"] is not None:
            lines.append(f"    {'output':<{LABEL_WIDTH}} {shown(row['generated_text'])}")
        if row["scores"]:
            scores = ", ".join(f"{k}={v}" for k, v in row["scores"].items())
            lines.append(f"    {'scores':<{LABEL_WIDTH}} {_whole(scores) if full else _short(scores, 200)}")
    return "\n".join(lines)


def results_json(run_uri: str, rows: int) -> dict[str, Any]:
    """The run's summary and its first `rows` rows, whole, for `results --json`."""
    run_uri = _absolute(run_uri)
    manifest, summary = load_run(run_uri)
    return {"run_uri": run_uri, "summary": summary,
            "rows": sample_rows(run_uri, rows, manifest.spec) if rows > 0 else []}


def _absolute(run_uri: str) -> str:
    return run_uri.rstrip("/") if is_s3(run_uri) else os.path.abspath(os.path.expanduser(run_uri))
