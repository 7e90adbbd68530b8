"""The run manifest: written last, it is the commit marker of a run's output."""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from pydantic import ValidationError

from llmbatch.errors import UserError
from llmbatch.run_manifest import Manifest
from llmbatch.storage import filesystem_for, join, storage_errors, write_whole

MANIFEST_NAME = "_manifest.json"
STAGING_DIR = "_staging"  # parts of a pass that a later pass (a judge) rewrites; never part of the output


def staging_uri(run_uri: str, number: int) -> str:
    return join(run_uri, STAGING_DIR, f"pass-{number}")


def output_parts(fs, inner: str) -> list[str]:
    """The run's committed-to-be parquet parts: everything but staging."""
    staging = f"/{STAGING_DIR}/"
    return sorted(p for p in fs.find(inner) if p.endswith(".parquet") and staging not in p[len(inner):])


def remove_tree(uri: str, action: str = "remove") -> None:
    fs, inner = filesystem_for(uri)
    with storage_errors(uri, action):
        if fs.exists(inner):
            fs.rm(inner, recursive=True)


def remove_staging(uri: str) -> None:
    remove_tree(uri, "remove a finished pass from")


@dataclass
class OutputTally:
    files: list[str]
    rows: int = 0
    ok: int = 0
    errors: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0
    distinct_ids: int = 0


def tally_output(run_uri: str) -> OutputTally:
    """Count what the run's parquet parts hold (streamed by column, never the whole table at once)."""
    fs, inner = filesystem_for(run_uri)
    with storage_errors(run_uri, "read back output"):
        names = output_parts(fs, inner)
        tally = OutputTally(files=[p[len(inner):].lstrip("/") for p in names])
        id_hashes = array("q")  # 8 bytes a row, so millions of ids fit in a few MB
        for name in names:
            with fs.open(name, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                for batch in parquet.iter_batches(columns=["id", "error", "num_input_tokens", "num_generated_tokens"]):
                    data = batch.to_pydict()
                    tally.rows += batch.num_rows
                    tally.errors += sum(e is not None for e in data["error"])
                    tally.input_tokens += sum(n or 0 for n in data["num_input_tokens"])
                    tally.generated_tokens += sum(n or 0 for n in data["num_generated_tokens"])
                    id_hashes.extend(hash(i) for i in data["id"])
        tally.ok = tally.rows - tally.errors
        tally.distinct_ids = _count_distinct(id_hashes)
    return tally


def _count_distinct(values: array) -> int:
    ordered = np.sort(np.frombuffer(values, dtype=np.int64))
    return int(1 + np.count_nonzero(ordered[1:] != ordered[:-1])) if len(ordered) else 0


def clear_uncommitted(run_uri: str, *, keep_staging: bool = False) -> int:
    """Delete parquet parts that an earlier attempt at this run id wrote but never committed."""
    fs, inner = filesystem_for(run_uri)
    with storage_errors(run_uri, "clear an uncommitted attempt at"):
        if not fs.exists(inner):
            return 0
        stale = output_parts(fs, inner) if keep_staging else [p for p in fs.find(inner) if p.endswith(".parquet")]
        for path in stale:
            fs.rm_file(path)
    return len(stale)


def remove_run(run_uri: str) -> None:
    """Delete a committed run: its manifest first, so no reader ever sees a manifest without its parts."""
    fs, inner = filesystem_for(run_uri)
    with storage_errors(run_uri, "replace the committed run at"):
        manifest = f"{inner}/{MANIFEST_NAME}"
        if fs.exists(manifest):
            fs.rm_file(manifest)
        if fs.exists(inner):
            fs.rm(inner, recursive=True)


def manifest_uri(run_uri: str) -> str:
    return join(run_uri, MANIFEST_NAME)


def manifest_exists(run_uri: str) -> bool:
    fs, inner = filesystem_for(manifest_uri(run_uri))
    with storage_errors(run_uri, "check for an earlier run at"):
        return fs.exists(inner)


def write_manifest(run_uri: str, manifest: Manifest | dict[str, Any]) -> str:
    """Write `_manifest.json` in one step (rename locally, a single PUT on S3). A dict is checked against
    `Manifest` first, so a manifest of the wrong shape fails before the run is committed."""
    body = Manifest.model_validate(manifest).model_dump(mode="json", fallback=str)
    uri = manifest_uri(run_uri)
    fs, inner = filesystem_for(uri)
    with storage_errors(uri, "write manifest"):
        write_whole(fs, inner, json.dumps(body, indent=2).encode())
    return uri


def read_manifest(run_uri: str) -> Manifest:
    """The committed run's manifest; a file that does not parse as one is a UserError naming its first problem."""
    uri = manifest_uri(run_uri)
    fs, inner = filesystem_for(uri)
    with storage_errors(uri, "read manifest"):
        with fs.open(inner, "rb") as handle:
            body = json.loads(handle.read())
    try:
        return Manifest.model_validate(body)
    except ValidationError as exc:
        raise UserError(f"{uri} is not a manifest this llmbatch can read: {_first_problem(exc)}") from exc


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    more = exc.error_count() - 1
    return f"{where}: {error['msg']}" + (f" (and {more} more)" if more else "")
