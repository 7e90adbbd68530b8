"""Reading a finished run's parts back once: each finalizing step (the tally, the error rows, the summary's
statistics, the result cache's entries) sees every batch as it streams by, and asks only for its columns."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.pipelines.run_files import output_parts
from llmbatch.storage import filesystem_for, storage_errors

BATCH_ROWS = 4096


class PartVisitor(Protocol):
    def columns(self, part: pq.ParquetFile) -> list[str]:
        """The columns it needs from this part (none: it skips the part)."""

    def batch(self, batch: pa.RecordBatch) -> None: ...

    def part_done(self, number: int) -> None: ...

    def finish(self, stack: ExitStack) -> None:
        """Called before the first part: register what must be closed (or discarded on failure) at the end."""


def read_back(run_uri: str, visitors: list[PartVisitor]) -> list[str]:
    """Stream every output part of the run (staging excluded) once through `visitors`; the parts' names,
    relative to the run folder."""
    fs, inner = filesystem_for(run_uri)
    with ExitStack() as stack:
        for visitor in visitors:
            visitor.finish(stack)
        with storage_errors(run_uri, "read back output"):
            names = output_parts(fs, inner)
            for number, name in enumerate(names):
                with fs.open(name, "rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    wanted = [(visitor, visitor.columns(parquet)) for visitor in visitors]
                    wanted = [(visitor, columns) for visitor, columns in wanted if columns]
                    union = list(dict.fromkeys(c for _, columns in wanted for c in columns))
                    if union:
                        for batch in parquet.iter_batches(columns=union, batch_size=BATCH_ROWS):
                            for visitor, columns in wanted:
                                visitor.batch(batch.select(columns))
                for visitor in visitors:
                    visitor.part_done(number)
    return [name[len(inner):].lstrip("/") for name in names]


def has_values(part: pq.ParquetFile, column: str) -> bool:
    """Whether any row of `column` in this part is set, from the footer's statistics where they say so."""
    if column not in part.schema_arrow.names:
        return False
    meta = part.metadata
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        chunk = next((row_group.column(i) for i in range(row_group.num_columns)
                      if row_group.column(i).path_in_schema == column), None)
        stats = chunk.statistics if chunk is not None else None
        if stats is None or not stats.has_null_count or stats.null_count < row_group.num_rows:
            return True
    return False
