"""The run folder `{output.path}/{run_id}/`: the names of its files, and the one way each is written and read.

Every write is atomic (a rename on local disk, one PUT or multipart upload on S3): a reader sees a whole file
or none, even when the writer dies halfway.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from llmbatch.storage import atomic_writer, filesystem_for, join, read_json, storage_errors, write_whole

MANIFEST_NAME = "_manifest.json"   # written last: the commit marker
ATTEMPT_NAME = "_attempt.json"     # the spec and input files of the latest attempt
LOCK_DIR = "_lock"                 # the run lock's generations (pipelines/run_lock.py)
SUMMARY_NAME = "_summary.json"     # per-scorer statistics, intrinsic figures
STAGING_DIR = "_staging"           # parts of a pass that a later pass (a judge) rewrites; never output
ERRORS_DIR = "errors"
ERRORS_FILE = "errors.jsonl"       # every error row, for a quick look (the parquet parts stay the record)


# A part this run wrote: part-g<lock generation>-<write id>_<task>[-<file>].parquet, directly in the run folder (or in a
# staging pass folder). Nothing else in the folder, and nothing below it, is ever counted or deleted as a part.
PART_NAME = re.compile(r"^part-g(\d{6})-[0-9a-f]+_\d{6}(?:-\d+)?\.parquet$")


def part_name(generation: int, write_id: str, task_index: int) -> str:
    return f"part-g{generation:06d}-{write_id}_{task_index:06d}.parquet"


def part_generation(path: str) -> int | None:
    """The lock generation that wrote this part, or None when the name is not one of llmbatch's parts."""
    match = PART_NAME.match(path.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def output_parts(fs, inner: str) -> list[str]:
    """The parquet parts llmbatch wrote directly in the folder `inner` (a run folder, or a staging pass)."""
    try:
        listed = fs.ls(inner, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in listed if part_generation(p) is not None)


@dataclass(frozen=True)
class RunFolder:
    uri: str

    def path(self, *names: str) -> str:
        return join(self.uri, *names)

    def staging(self, number: int) -> str:
        return join(self.uri, STAGING_DIR, f"pass-{number}")

    def write_json(self, name: str, body: Any, *, action: str = "write") -> str:
        uri = self.path(name)
        fs, inner = filesystem_for(uri)
        data = json.dumps(body, indent=2, ensure_ascii=False, default=str).encode()
        with storage_errors(uri, action):
            write_whole(fs, inner, data)
        return uri

    def read_json(self, name: str, *, action: str = "read") -> Any:
        """The JSON document, or None when the file is not there."""
        return read_json(self.path(name), action)

    @contextmanager
    def writing(self, *names: str, action: str = "write") -> Iterator:
        """A binary handle whose content appears at the file whole, when the block ends without an error."""
        uri = self.path(*names)
        fs, inner = filesystem_for(uri)
        with storage_errors(uri, action), atomic_writer(fs, inner) as handle:
            yield handle

    def exists(self, name: str, *, action: str = "check for an earlier run at") -> bool:
        uri = self.path(name)
        fs, inner = filesystem_for(uri)
        with storage_errors(self.uri, action):
            return fs.exists(inner)

    def remove(self, name: str, *, action: str = "remove") -> None:
        uri = self.path(name)
        fs, inner = filesystem_for(uri)
        with storage_errors(uri, action):
            if fs.exists(inner):
                fs.rm_file(inner)
