"""The run's error rows, gathered into {run}/errors/ for a quick look (the parquet parts stay the record)."""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pyarrow.compute as pc

from llmbatch.pipelines.readback import has_values, read_back
from llmbatch.pipelines.run_files import ERRORS_DIR, ERRORS_FILE, RunFolder

KINDS_SHOWN = 10


def error_kind(message: str) -> str:
    """What kind of error a message is, without the row's own details (quoted values, numbers, asides)."""
    text = message.splitlines()[0] if message else ""
    while True:  # asides, innermost first: they may nest
        shorter = re.sub(r"\([^()]*\)", " ", text)
        if shorter == text:
            break
        text = shorter
    text = re.sub(r" at \S+ row \d+|'[^']*'|\S*\d\S*", " ", text)
    return " ".join(text.split())[:80] or "error"


class ErrorRowsWriter:
    """A read-back visitor (pipelines/readback.py) that copies every row whose `error` is set into
    errors/errors.jsonl, opened at the first such row; parts without error rows are skipped by their footers."""

    def __init__(self, run_uri: str):
        self.folder = RunFolder(run_uri)
        self.kinds: Counter[str] = Counter()
        self.rows = 0
        self._stack = None
        self._out = None

    def finish(self, stack) -> None:
        self._stack = stack

    def columns(self, part) -> list[str]:
        return part.schema_arrow.names if has_values(part, "error") else []

    def batch(self, batch) -> None:
        failed = batch.filter(pc.is_valid(batch.column("error")))
        if not failed.num_rows:
            return
        if self._out is None:
            self._out = self._stack.enter_context(
                self.folder.writing(ERRORS_DIR, ERRORS_FILE, action="write error rows to"))
        for row in failed.to_pylist():
            self._out.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode())
            self.kinds[error_kind(row["error"])] += 1
            self.rows += 1

    def part_done(self, number: int) -> None:
        pass

    def result(self) -> dict[str, Any] | None:
        """What the manifest says of the error rows: the file, the row count and the most common kinds."""
        if not self.rows:
            return None
        return {"path": f"{ERRORS_DIR}/{ERRORS_FILE}", "rows": self.rows,
                "kinds": [{"kind": k, "rows": n} for k, n in self.kinds.most_common(KINDS_SHOWN)]}


def write_error_rows(run_uri: str) -> dict[str, Any] | None:
    """Copy every error row into errors/errors.jsonl; what the manifest says of them (None: there are none)."""
    writer = ErrorRowsWriter(run_uri)
    read_back(run_uri, [writer])
    return writer.result()
