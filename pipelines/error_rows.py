"""The run's error rows, gathered into {run}/errors/ for a quick look (the parquet parts stay the record)."""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmbatch.pipelines.manifest import output_parts
from llmbatch.storage import filesystem_for, is_s3, join, storage_errors

ERRORS_DIR = "errors"
ERRORS_FILE = "errors.jsonl"
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


def write_error_rows(run_uri: str) -> dict[str, Any]:
    """Copy every row whose `error` is set into errors/errors.jsonl (streamed part by part).

    Returns what the manifest says of them: the file, the row count and the most common kinds.
    """
    fs, inner = filesystem_for(run_uri)
    target = join(run_uri, ERRORS_DIR, ERRORS_FILE)
    _, target_inner = filesystem_for(target)
    kinds: Counter[str] = Counter()
    rows = 0
    with storage_errors(run_uri, "write error rows to"):
        parts = output_parts(fs, inner)
        if not is_s3(target):
            fs.makedirs(target_inner.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(target_inner, "wb") as out:
            for part in parts:
                with fs.open(part, "rb") as handle:
                    for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
                        failed = batch.filter(pc.is_valid(batch.column("error")))
                        for row in failed.to_pylist():
                            out.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode())
                            kinds[error_kind(row["error"])] += 1
                            rows += 1
    return {"path": f"{ERRORS_DIR}/{ERRORS_FILE}", "rows": rows,
            "kinds": [{"kind": k, "rows": n} for k, n in kinds.most_common(KINDS_SHOWN)]}
