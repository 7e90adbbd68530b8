"""Result cache across runs: a generation is reused when the same model, the same output-shaping settings
and the same rendered prompt come again.

Layout: `{cache.path}/{namespace}/` holds one folder per (model fingerprint, dtype, max_model_len, sampling
params); inside it `_key.json` says what the namespace stands for, and each run that computed new rows adds
parquet files of entries (`key` = sha256 of the rendered prompt, then the row's result columns).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from llmbatch.pipelines.columns import (CACHED_COLUMN, HIT_COLUMN, KEY_DTYPE, PROMPT_COLUMN, ROW_ERROR_COLUMN,
                                        StageColumns, key_array, stable_hash)
from llmbatch.crash_points import crash_point
from llmbatch.errors import UserError
from llmbatch.pipelines.readback import read_back
from llmbatch.pipelines.schema import RESULT_FIELDS, TOP_LOGPROBS_FIELD
from llmbatch.storage import filesystem_for, join, storage_errors, write_whole

CACHE_FORMAT = 1
KEY_FILE = "_key.json"
RESULT_COLUMNS = ("generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens",
                  "cumulative_logprob", "mean_logprob", "perplexity")
TOP_LOGPROBS = "top_logprobs"


@dataclass(frozen=True)
class CacheNamespace:
    uri: str                       # the namespace folder
    namespace: str
    key_fields: dict[str, Any]     # what the namespace stands for


def is_deterministic(sampling_params: dict[str, Any]) -> bool:
    """Greedy or seeded sampling gives the same output for the same prompt, so a result can stand for it."""
    return float(sampling_params.get("temperature") or 0.0) == 0.0 or sampling_params.get("seed") is not None


def cache_namespace(cache_path: str, fingerprint: str, engine_kwargs: dict[str, Any],
                    sampling_params: dict[str, Any], versions: dict[str, str | None],
                    special_tokens: str = "text") -> CacheNamespace:
    """The namespace of results that the same weights, engine settings, tokenization, sampling and software
    would produce again (`versions`: llmbatch's and the engines' packages; a new release starts a new one)."""
    key_fields = {
        "format": CACHE_FORMAT,
        "special_tokens": special_tokens,
        "model_fingerprint": fingerprint,
        "versions": dict(sorted(versions.items())),
        "dtype": engine_kwargs.get("dtype"),
        "max_model_len": engine_kwargs.get("max_model_len"),
        "sampling": dict(sorted(sampling_params.items())),
    }
    namespace = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    return CacheNamespace(join(cache_path, namespace), namespace, key_fields)


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


class CacheIndex:
    """Entries of one namespace: sorted key hashes beside a columnar table of results (the keys themselves are
    compared on a lookup)."""

    def __init__(self, table: pa.Table):
        keys = table.column("key").to_pylist() if table.num_rows else []
        hashes = key_array(stable_hash(k) for k in keys)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.table = table.take(pa.array(order)) if table.num_rows else table

    def __len__(self) -> int:
        return self.table.num_rows

    def get(self, key: str) -> dict[str, Any] | None:
        if not len(self.hashes):
            return None
        wanted = np.array(stable_hash(key), dtype=KEY_DTYPE)
        at = int(np.searchsorted(self.hashes, wanted))
        while at < len(self.hashes) and self.hashes[at] == wanted:
            row = self.table.slice(at, 1).to_pylist()[0]
            if row["key"] == key:
                return {k: v for k, v in row.items() if k != "key"}
            at += 1
        return None


ENTRY_FIELDS = [pa.field("key", pa.string())] + [f for f in RESULT_FIELDS if f.name in RESULT_COLUMNS]


def conform_entries(table: pa.Table) -> pa.Table:
    """An entry file's rows in the entry schema, keyless rows dropped; ValueError when the file is not one."""
    missing = [f.name for f in ENTRY_FIELDS[:2] if f.name not in table.column_names]
    if missing:
        raise ValueError(f"not a cache entry file (no {', '.join(missing)} column)")
    fields = ENTRY_FIELDS + ([TOP_LOGPROBS_FIELD] if TOP_LOGPROBS_FIELD.name in table.column_names else [])
    columns = []
    for f in fields:
        column = table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        try:
            columns.append(column.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ValueError(f"column {f.name} is {column.type}, not {f.type}") from exc
    conformed = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    return conformed.filter(pc.is_valid(conformed.column("key")))


def load_index(uri: str, log=None) -> CacheIndex:
    """Read every entry file of a namespace; a file that cannot be read (cut short by a crash) or is not an
    entry file of this format is skipped with a warning, so one bad file never costs the others."""
    log = log or structlog.get_logger()
    fs, inner = filesystem_for(uri)
    tables = []
    with storage_errors(uri, "read the result cache at"):
        files = sorted(p for p in fs.find(inner) if p.endswith(".parquet")) if fs.exists(inner) else []
        for path in files:
            try:
                with fs.open(path, "rb") as handle:
                    tables.append(conform_entries(pq.read_table(handle)))
            except (pa.ArrowInvalid, OSError, EOFError, ValueError) as exc:
                log.warning("cache_file_skipped", file=path, error=str(exc)[:200])
    if not tables:
        return CacheIndex(pa.table({"key": pa.array([], pa.string())}))
    return CacheIndex(pa.concat_tables(tables, promote_options="permissive"))


class CacheLookupStage:
    """Ray Data stage (actor): loads a namespace's entries once; a row whose rendered prompt is there gets
    the cached result in `_cached_result` and skips the engine. Reads the prompt as rendered.
    """

    columns = StageColumns("cache lookup", needs=(PROMPT_COLUMN, ROW_ERROR_COLUMN), adds=(HIT_COLUMN,))

    def __init__(self, uri: str):
        self.index = load_index(uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.columns.check(batch.column_names)
        prompts = batch.column(PROMPT_COLUMN).to_pylist()
        errors = batch.column(ROW_ERROR_COLUMN).to_pylist()
        hits = []
        for prompt, error in zip(prompts, errors):
            result = self.index.get(prompt_key(prompt)) if prompt is not None and error is None else None
            hits.append(json.dumps(result) if result is not None else None)
        return batch.append_column(HIT_COLUMN, pa.array(hits, pa.string()))


def cached_result(row: dict[str, Any]) -> dict[str, Any] | None:
    hit = row.get(HIT_COLUMN)
    return json.loads(hit) if hit else None


def write_key_file(plan: CacheNamespace, model_source: str) -> str | None:
    """Write what the namespace stands for, once; returns why it could not be written (a read-only cache is
    still read from, and never costs the run)."""
    uri = join(plan.uri, KEY_FILE)
    try:
        fs, inner = filesystem_for(uri)
        with storage_errors(uri, "write the result cache at"):
            if not fs.exists(inner):
                write_whole(fs, inner, json.dumps({**plan.key_fields, "model_source": model_source},
                                                  indent=2).encode())
    except (UserError, OSError) as exc:
        return str(exc)
    return None


class CacheEntriesWriter:
    """A read-back visitor (pipelines/readback.py) that adds the rows this run generated (not those it took
    from the cache) to the namespace, one entry file per output part, and counts the hits.

    The cache never costs a run its commit: once a write fails (a read-only or throttled cache), no more
    entries are written, and `write_error` says why. Parts without a `cached` column (written before the job
    had a cache) are all fresh rows."""

    def __init__(self, cache: CacheNamespace, run_id: str):
        self.cache, self.run_id = cache, run_id
        self.hits = self.written = 0
        self.write_error: str | None = None
        self._batches: list[pa.RecordBatch] = []

    def finish(self, stack) -> None:
        pass

    def columns(self, part) -> list[str]:
        return [n for n in (PROMPT_COLUMN, CACHED_COLUMN, TOP_LOGPROBS, *RESULT_COLUMNS)
                if n in part.schema_arrow.names]

    def batch(self, batch) -> None:
        self._batches.append(batch)

    def part_done(self, number: int) -> None:
        batches, self._batches = self._batches, []
        if not batches:
            return
        table = pa.Table.from_batches(batches)
        cached = (table.column(CACHED_COLUMN).fill_null(False) if CACHED_COLUMN in table.column_names
                  else pa.array([False] * table.num_rows))
        self.hits += pc.sum(cached.cast(pa.int64())).as_py() or 0
        fresh = table.filter(pc.and_(pc.invert(cached), pc.is_valid(table.column("generated_text"))))
        if not fresh.num_rows or self.write_error is not None:
            return
        keys = pa.array([prompt_key(p) for p in fresh.column(PROMPT_COLUMN).to_pylist()], pa.string())
        entries = fresh.drop_columns([c for c in (PROMPT_COLUMN, CACHED_COLUMN) if c in fresh.column_names])
        entries = entries.add_column(0, "key", keys)
        sink = pa.BufferOutputStream()
        pq.write_table(entries, sink)
        try:
            cache_fs, cache_inner = filesystem_for(self.cache.uri)
            with storage_errors(self.cache.uri, "write the result cache at"):
                write_whole(cache_fs, f"{cache_inner}/{self.run_id}-{number:05d}.parquet",
                            sink.getvalue().to_pybytes())
        except (UserError, OSError) as exc:
            self.write_error = str(exc)
            return
        self.written += entries.num_rows
        crash_point("cache")

    def result(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"hits": int(self.hits), "entries_written": self.written}
        if self.write_error is not None:
            stats["write_error"] = self.write_error
        return stats


def write_entries(run_uri: str, cache: CacheNamespace, run_id: str) -> dict[str, int]:
    """Add the rows this run generated to the namespace; returns {hits, entries_written}."""
    writer = CacheEntriesWriter(cache, run_id)
    read_back(run_uri, [writer])
    return writer.result()
