"""Resuming a run that did not commit: keep the parts it finished, skip their rows, never write a row twice.

A row is known by its key: its id, or for a row whose id repeats an earlier row's, its error text (which
names its own place in the input). The keys of finished rows travel to the read stage as sorted 64-bit
hashes; rows whose key is there are not read again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.pipelines.columns import KEY_DTYPE, row_key_hashes
from llmbatch.pipelines.run_files import output_parts
from llmbatch.pipelines.run_files import ATTEMPT_NAME, RunFolder
from llmbatch.storage import filesystem_for, storage_errors

# Settings a resumed run may change: they decide how fast rows are made, not what a row holds.
FREE_TO_CHANGE = ("resources", "cache")


@dataclass
class FinishedWork:
    done: np.ndarray                       # sorted key hashes of rows already written
    rows: int = 0
    parts_kept: int = 0
    parts_removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)   # the kept parts' names, relative to the folder read

    def to_dict(self) -> dict[str, Any]:
        return {"rows_skipped": self.rows, "parts_kept": self.parts_kept, "parts_removed": self.parts_removed}


def finished_work(uri: str) -> FinishedWork:
    """The rows an earlier attempt wrote under `uri`; parts cut short by the crash are deleted."""
    fs, inner = filesystem_for(uri)
    hashes: list[np.ndarray] = []
    work = FinishedWork(done=np.array([], dtype=KEY_DTYPE))
    with storage_errors(uri, "read the earlier attempt at"):
        for part in output_parts(fs, inner):
            table = _read_part(fs, part)
            if table is None:
                fs.rm_file(part)
                work.parts_removed.append(part[len(inner):].lstrip("/"))
                continue
            hashes.append(row_key_hashes(table.column("id").to_pylist(), table.column("error").to_pylist()))
            work.rows += table.num_rows
            work.parts_kept += 1
            work.kept.append(part[len(inner):].lstrip("/"))
    if hashes:
        work.done = np.sort(np.concatenate(hashes))
    return work


def _read_part(fs, part: str) -> pa.Table | None:
    """A part's `id` and `error` columns; None when its bytes are not a whole parquet file (cut short by a
    crash). A storage that fails to read it (denied, throttled, unreachable) raises: a part is deleted only for
    what it holds, never because it could not be read."""
    data = fs.cat_file(part)
    try:
        return pq.ParquetFile(pa.BufferReader(data)).read(columns=["id", "error"])
    except (pa.ArrowInvalid, OSError, EOFError):
        return None


def write_attempt(run_uri: str, attempt: dict[str, Any]) -> None:
    """Record what this run computes (resolved spec, input files), so a resume can tell whether the job
    still means the same rows."""
    RunFolder(run_uri).write_json(ATTEMPT_NAME, attempt)


def read_attempt(run_uri: str) -> dict[str, Any] | None:
    return RunFolder(run_uri).read_json(ATTEMPT_NAME)


def input_changes(earlier: dict[str, Any], input_files: list[list[Any]]) -> list[str]:
    """How the input files differ from the earlier attempt's record ([uri, size, version] each; attempts written
    before versions were recorded hold [uri, size]), when it recorded them."""
    before = earlier.get("input_files")
    if before is None:
        return []
    then = {entry[0]: entry[1:] for entry in before}
    now = {entry[0]: entry[1:] for entry in input_files}
    changes = [f"{uri} is new" for uri in now if uri not in then]
    changes += [f"{uri} is gone" for uri in then if uri not in now]
    for uri in now.keys() & then.keys():
        (size_then, *version_then), (size_now, *version_now) = then[uri], now[uri]
        if size_then != size_now:
            changes.append(f"{uri} was rewritten (size {size_then} -> {size_now})")
        elif version_then and version_then != version_now[:len(version_then)]:
            changes.append(f"{uri} was rewritten (same size, modified since)")
    return sorted(changes)


def changed_settings(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """YAML paths whose values differ, except those that only change speed."""
    changed = []
    for key in sorted(set(before) | set(now)):
        path = f"{prefix}{key}"
        if path in FREE_TO_CHANGE:
            continue
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed.extend(changed_settings(a, b, path + "."))
        elif a != b:
            changed.append(path)
    return changed
