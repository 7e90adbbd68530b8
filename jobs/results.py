"""`llmbatch results RUN_PATH`: a finished run's summary and a sample of its rows, read back later."""
from __future__ import annotations

import re
from typing import Any

import pyarrow.parquet as pq

from llmbatch.errors import UserError
from llmbatch.jobs.summary import render_summary
from llmbatch.pipelines.manifest import manifest_exists, read_manifest
from llmbatch.pipelines.run_files import output_parts
from llmbatch.pipelines.run_summary import read_summary, summarize
from llmbatch.run_manifest import Manifest
from llmbatch.storage import filesystem_for, storage_errors


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


def sample_rows(run_uri: str, count: int) -> list[dict[str, Any]]:
    fs, inner = filesystem_for(run_uri)
    rows: list[dict[str, Any]] = []
    with storage_errors(run_uri, "read rows from"):
        for name in output_parts(fs, inner):
            with fs.open(name, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                wanted = [c for c in parquet.schema_arrow.names
                          if c in ("id", "prompt", "generated_text", "error") or c.startswith("score_")]
                for batch in parquet.iter_batches(columns=wanted, batch_size=count):
                    rows.extend(batch.to_pylist()[: count - len(rows)])
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


def render_results(run_uri: str, rows: int) -> str:
    manifest, summary = load_run(run_uri)
    lines = [render_summary(manifest, summary)]
    if rows > 0:
        lines.append(f"\nfirst {rows} rows:")
        for row in sample_rows(run_uri.rstrip("/"), rows):
            lines.append(f"  {_short(row['id'], 100)}")
            lines.append(f"    prompt     {_short(row.get('prompt'), 100)}")
            if row.get("error"):
                lines.append(f"    error      {_short(row['error'], 100)}")
            if row.get("generated_text") is not None:
                lines.append(f"    output     {_short(row['generated_text'], 100)}")
            scores = {k: v for k, v in row.items() if k.startswith("score_") and not k.endswith("_raw")}
            if scores:
                lines.append("    scores     " + _short(", ".join(f"{k[6:]}={v}" for k, v in scores.items()), 200))
    return "\n".join(lines)
