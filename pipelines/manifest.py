"""The run manifest: written last, it is the commit marker of a run's output."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from llmbatch.errors import UserError
from llmbatch.pipelines.columns import KEY_DTYPE, stable_hash
from llmbatch.pipelines.readback import read_back
from llmbatch.pipelines.run_files import (
    ATTEMPT_NAME, ERRORS_DIR, ERRORS_FILE, MANIFEST_NAME, STAGING_DIR, SUMMARY_NAME, RunFolder, output_parts,
)
from llmbatch.run_manifest import Manifest
from llmbatch.storage import filesystem_for, storage_errors


def staging_uri(run_uri: str, number: int) -> str:
    return RunFolder(run_uri).staging(number)



def remove_tree(uri: str, action: str = "remove") -> None:
    fs, inner = filesystem_for(uri)
    with storage_errors(uri, action):
        if fs.exists(inner):
            fs.rm(inner, recursive=True)


def remove_staging(uri: str) -> None:
    remove_tree(uri, "remove a finished pass from")


@dataclass
class OutputTally:
    """Counts of what the run's parts hold; a read-back visitor (pipelines/readback.py)."""
    files: list[str] = field(default_factory=list)
    rows: int = 0
    errors: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0
    _ids: bytearray = field(default_factory=bytearray, repr=False)  # each id's 128-bit hash: 16 bytes a row

    @property
    def ok(self) -> int:
        return self.rows - self.errors

    @property
    def distinct_ids(self) -> int:
        return len(np.unique(np.frombuffer(bytes(self._ids), dtype=KEY_DTYPE)))

    def columns(self, part) -> list[str]:
        return ["id", "error", "num_input_tokens", "num_generated_tokens"]

    def batch(self, batch) -> None:
        data = batch.to_pydict()
        self.rows += batch.num_rows
        self.errors += sum(e is not None for e in data["error"])
        self.input_tokens += sum(n or 0 for n in data["num_input_tokens"])
        self.generated_tokens += sum(n or 0 for n in data["num_generated_tokens"])
        for row_id in data["id"]:
            self._ids += stable_hash(str(row_id))

    def part_done(self, number: int) -> None:
        pass

    def finish(self, stack) -> None:
        pass


def tally_output(run_uri: str) -> OutputTally:
    """Count what the run's parquet parts hold (streamed by column, never the whole table at once)."""
    tally = OutputTally()
    tally.files = read_back(run_uri, [tally])
    return tally


def clear_uncommitted(run_uri: str, *, keep_staging: bool = False) -> int:
    """Delete the parts an earlier attempt at this run id wrote but never committed (and, unless
    `keep_staging`, its staging passes). Only llmbatch's own parts: any other file stays."""
    fs, inner = filesystem_for(run_uri)
    with storage_errors(run_uri, "clear an uncommitted attempt at"):
        stale = output_parts(fs, inner)
        for path in stale:
            fs.rm_file(path)
    if not keep_staging:
        remove_tree(RunFolder(run_uri).path(STAGING_DIR))
    return len(stale)


def remove_parts(run_uri: str, keep: set[str]) -> list[str]:
    """Delete this run's parts whose names (relative to the run folder) are not in `keep`; the names deleted."""
    fs, inner = filesystem_for(run_uri)
    removed = []
    with storage_errors(run_uri, "remove parts another driver left in"):
        for path in output_parts(fs, inner):
            name = path[len(inner):].lstrip("/")
            if name not in keep:
                fs.rm_file(path)
                removed.append(name)
    return removed


def remove_run(run_uri: str) -> None:
    """Delete a committed run: its manifest first, so no reader ever sees a manifest without its parts; then
    the files llmbatch wrote there (parts, summary, attempt, error rows, staging), and nothing else."""
    folder = RunFolder(run_uri)
    folder.remove(MANIFEST_NAME, action="replace the committed run at")
    clear_uncommitted(run_uri)
    for name in (SUMMARY_NAME, ATTEMPT_NAME):
        folder.remove(name, action="replace the committed run at")
    folder.remove(f"{ERRORS_DIR}/{ERRORS_FILE}", action="replace the committed run at")


def manifest_uri(run_uri: str) -> str:
    return RunFolder(run_uri).path(MANIFEST_NAME)


def manifest_exists(run_uri: str) -> bool:
    return RunFolder(run_uri).exists(MANIFEST_NAME)


def write_manifest(run_uri: str, manifest: Manifest | dict[str, Any]) -> str:
    """Write `_manifest.json` in one step (rename locally, a single PUT on S3). A dict is checked against
    `Manifest` first, so a manifest of the wrong shape fails before the run is committed."""
    body = Manifest.model_validate(manifest).model_dump(mode="json", fallback=str)
    return RunFolder(run_uri).write_json(MANIFEST_NAME, body, action="write manifest")


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
