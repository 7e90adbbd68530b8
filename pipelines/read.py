"""Read stage: list input shards, scan them cheaply, and stream rows with a stable id."""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from jobs.errors import UserError
from pipelines.storage import bucket_and_key, filesystem_for, full_uri, is_s3, s3_endpoint, storage_errors

FORMAT_BY_EXTENSION = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv",
}
ID_COLUMN = "id"
ROW_ERROR_COLUMN = "_row_error"
INPUT_COLUMN = "_input"
READ_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class InputFile:
    uri: str          # full path or s3:// uri
    relpath: str      # path relative to the input root: the stable part of row ids
    size: int
    format: str


@dataclass(frozen=True)
class ShardTask:
    """One unit of read work: a file and how many of its rows to take (None = all)."""
    uri: str
    relpath: str
    format: str
    take: int | None


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_input_files(path: str, fmt: str = "auto") -> list[InputFile]:
    """Files under `path` (file, directory, glob or prefix), sorted, with sizes and formats."""
    fs, inner = filesystem_for(path)
    with storage_errors(path, "list input"):
        if _has_glob(inner):
            matches = fs.glob(inner)
            root = inner[: min(inner.find(c) for c in "*?[" if c in inner)].rsplit("/", 1)[0]
        elif fs.isdir(inner):
            matches = fs.find(inner)
            root = inner
        elif fs.isfile(inner):
            matches, root = [inner], inner.rsplit("/", 1)[0]
        else:
            matches = []
            for match in fs.glob(inner + "*") if inner else []:
                matches.extend(fs.find(match) if fs.isdir(match) else [match])
            root = inner.rsplit("/", 1)[0]
            if not matches and not is_s3(path):
                raise UserError(f"input.path: {path} does not exist")
            if not matches and is_s3(path):
                _check_bucket(fs, path)
        files = []
        for match in sorted(set(matches)):
            name = match.rsplit("/", 1)[-1]
            rel = match[len(root):].lstrip("/") if match.startswith(root) else name
            if match != inner and any(part.startswith((".", "_")) for part in rel.split("/")):
                continue  # in listings: hidden files, _SUCCESS markers, _manifest.json of earlier runs
            file_format = _format_of(match, fmt)
            if file_format is None:
                if _has_glob(inner) or fs.isfile(inner):
                    raise UserError(f"input.path: cannot tell the format of {full_uri(path, match)}; "
                                    "set input.format to parquet, jsonl or csv")
                continue
            files.append(InputFile(full_uri(path, match), rel or name, int(fs.size(match) or 0), file_format))
    if not files:
        raise UserError(f"input.path: no input files (.parquet, .jsonl, .csv) found at {path}")
    return files


def _check_bucket(fs, path: str) -> None:
    bucket, _ = bucket_and_key(path)
    try:
        fs.ls(bucket)
    except FileNotFoundError:
        raise UserError(f"input.path: bucket '{bucket}' does not exist"
                        + (f" at {s3_endpoint()}" if s3_endpoint() else "")) from None


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    return FORMAT_BY_EXTENSION.get(os.path.splitext(path)[1].lower())


# ---- reading one shard -------------------------------------------------------------------------

def iter_shard(uri: str, fmt: str, schema: pa.Schema | None = None) -> Iterator[pa.Table]:
    """Stream a shard as tables of at most READ_CHUNK_ROWS rows, each row with its 0-based row number.

    Rows that cannot be parsed (a jsonl line that is not a JSON object) come through with
    `_row_error` set, so that every input row has an output row.
    """
    fs, inner = filesystem_for(uri)
    with fs.open(inner, "rb") as handle:
        if fmt == "parquet":
            yield from _iter_parquet(handle, schema)
        elif fmt == "jsonl":
            yield from _iter_jsonl(handle, schema)
        elif fmt == "csv":
            yield from _iter_csv(handle, schema)
        else:
            raise ValueError(f"unknown format {fmt}")


def _numbered(table: pa.Table, start: int, errors: list[str | None] | None = None) -> pa.Table:
    rows = len(errors) if errors is not None else table.num_rows
    numbers = pa.array(range(start, start + rows), pa.int64())
    errs = pa.array(errors if errors is not None else [None] * rows, pa.string())
    if table.num_rows != rows:  # a chunk of only unparseable lines has no columns, hence no rows
        return pa.table({"_row_number": numbers, ROW_ERROR_COLUMN: errs})
    return table.append_column("_row_number", numbers).append_column(ROW_ERROR_COLUMN, errs)


def _iter_parquet(handle, schema: pa.Schema | None) -> Iterator[pa.Table]:
    parquet = pq.ParquetFile(handle)
    start = 0
    for batch in parquet.iter_batches(batch_size=READ_CHUNK_ROWS):
        table = pa.Table.from_batches([batch])
        if schema is not None:
            table = conform(table, schema)
        yield _numbered(table, start)
        start += table.num_rows


def _iter_jsonl(handle, schema: pa.Schema | None) -> Iterator[pa.Table]:
    rows: list[dict] = []
    errors: list[str | None] = []
    start = 0
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="strict", newline="")
    line_no = 0
    while True:
        try:
            line = text.readline()
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 near line {line_no + 1}: {exc.reason}") from None
        if not line:
            break
        line_no += 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("expected a JSON object")
            rows.append(record)
            errors.append(None)
        except ValueError as exc:
            rows.append({})
            errors.append(f"input line {line_no}: not a JSON object ({exc})")
        if len(rows) >= READ_CHUNK_ROWS:
            yield _numbered(_rows_to_table(rows, schema), start, errors)
            start += len(rows)
            rows, errors = [], []
    if rows:
        yield _numbered(_rows_to_table(rows, schema), start, errors)


def _rows_to_table(rows: list[dict], schema: pa.Schema | None) -> pa.Table:
    if schema is None:
        return pa.Table.from_pylist(rows)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _iter_csv(handle, schema: pa.Schema | None) -> Iterator[pa.Table]:
    convert = pacsv.ConvertOptions(column_types=schema) if schema is not None else None
    reader = pacsv.open_csv(handle, convert_options=convert,
                            read_options=pacsv.ReadOptions(block_size=1 << 20))
    start = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        if schema is not None:
            table = conform(table, schema)
        yield _numbered(table, start)
        start += table.num_rows


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Give a shard's table the job-wide input schema: same columns, same order, nulls where absent."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# ---- the cheap pre-pass ------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardScan:
    uri: str
    rows: int
    schema: bytes  # serialized pa.Schema
    error: str | None = None


def scan_shard(uri: str, fmt: str) -> ShardScan:
    """Count a shard's rows and read its schema (parquet: from the footer; jsonl/csv: by parsing)."""
    try:
        if fmt == "parquet":
            fs, inner = filesystem_for(uri)
            with fs.open(inner, "rb") as handle:
                meta = pq.ParquetFile(handle)
                return ShardScan(uri, meta.metadata.num_rows, meta.schema_arrow.serialize().to_pybytes())
        rows, schemas = 0, []
        for table in iter_shard(uri, fmt):
            rows += table.num_rows
            data = table.drop_columns(["_row_number", ROW_ERROR_COLUMN])
            if data.num_columns:
                schemas.append(data.schema)
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        return ShardScan(uri, rows, schema.serialize().to_pybytes())
    except Exception as exc:  # reported per shard; the driver turns it into one clear error
        return ShardScan(uri, 0, b"", f"{type(exc).__name__}: {exc}")


def unify_input_schema(scans: list[ShardScan]) -> pa.Schema:
    schemas = [pa.ipc.read_schema(pa.py_buffer(s.schema)) for s in scans if s.schema]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"input.path: the shards' columns have types that cannot be combined ({exc})") from None
    # A column that is null in every sample becomes string: prompts and ids are text.
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in unified]
    return pa.schema(fields)


def plan_shard_tasks(files: list[InputFile], rows_per_file: dict[str, int], limit: int | None) -> list[ShardTask]:
    """One task per shard, honouring `input.limit` by taking rows from the shards in path order."""
    tasks, remaining = [], limit
    for f in files:
        n = rows_per_file[f.uri]
        if remaining is not None:
            if remaining <= 0:
                break
            take = min(n, remaining)
            remaining -= take
        else:
            take = None
        if n and (take is None or take > 0):
            tasks.append(ShardTask(f.uri, f.relpath, f.format, take))
    return tasks


# ---- the Ray Data stage ------------------------------------------------------------------------

def stable_id(relpath: str, row_number: int) -> str:
    return f"{relpath}#{row_number}"


class ReadShards:
    """Ray Data stage: one shard task in, that shard's rows out (streamed), with `id` and `_input`."""

    def __init__(self, schema_bytes: bytes, id_column: str | None):
        self.schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
        self.id_column = id_column

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        for uri, relpath, fmt, take in zip(batch["uri"], batch["relpath"], batch["format"], batch["take"]):
            take = None if take is None or take != take else int(take)  # NaN from pandas-free None
            emitted = 0
            for table in iter_shard(str(uri), str(fmt), self.schema):
                if take is not None:
                    if emitted >= take:
                        break
                    table = table.slice(0, take - emitted)
                emitted += table.num_rows
                yield self._with_ids(table, str(relpath))

    def _with_ids(self, table: pa.Table, relpath: str) -> pa.Table:
        numbers = table.column("_row_number").to_pylist()
        errors = table.column(ROW_ERROR_COLUMN).to_pylist()
        data = table.drop_columns(["_row_number", ROW_ERROR_COLUMN])
        if self.id_column:
            raw_ids = data.column(self.id_column).to_pylist()
            ids = [stable_id(relpath, n) if v is None else str(v) for v, n in zip(raw_ids, numbers)]
            errors = [e or (f"id column '{self.id_column}' is null" if v is None else None)
                      for e, v in zip(errors, raw_ids)]
        else:
            ids = [stable_id(relpath, n) for n in numbers]
        packed = pa.StructArray.from_arrays([c.combine_chunks() for c in data.columns], names=data.column_names) \
            if data.num_columns else pa.array([{}] * len(numbers), pa.struct([]))
        return pa.table({
            ID_COLUMN: pa.array(ids, pa.string()),
            INPUT_COLUMN: packed,
            ROW_ERROR_COLUMN: pa.array(errors, pa.string()),
        })


def shard_task_rows(tasks: list[ShardTask]) -> list[dict]:
    return [asdict(t) for t in tasks]
