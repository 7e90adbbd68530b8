"""Read stage: list input shards, scan them cheaply, and stream rows with a stable id."""
from __future__ import annotations

import bisect
import io
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llmbatch.pipelines.columns import (DUPLICATE_ID_ERROR, ID_COLUMN, INPUT_COLUMN, ROW_ERROR_COLUMN, StageColumns,
                                        is_done, key_array, row_key_hashes, stable_hash)
from llmbatch.errors import UserError
from llmbatch.storage import check_bucket, filesystem_for, full_uri, is_s3, storage_errors

FORMAT_BY_EXTENSION = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv",
}
# Whole-file compression of text shards (parquet compresses inside): the name ends in one of these after the
# format's own extension (`prompts.jsonl.gz`).
COMPRESSION_BY_EXTENSION = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
READ_CHUNK_ROWS = 1024
SEEK_EVERY = 256  # rows between the jsonl seek points the scan records
MAX_LINE_BYTES = 64 << 20     # a longer jsonl line is a row error, never read whole into memory
MAX_ARRAY_BYTES = 1 << 30     # a .json file holding one array is parsed whole, up to this size
WHOLE_FILE_PARQUET = ("a parquet file compressed as a whole cannot be read (parquet compresses inside it); "
                      "decompress it")
MAX_NESTING = 32              # a JSON value nested deeper is a row error (Arrow types cannot hold it usefully)


@dataclass(frozen=True)
class InputFile:
    uri: str          # full path or s3:// uri
    relpath: str      # path relative to the input root: the stable part of row ids
    size: int
    format: str
    version: str = ""  # what changes when the file is replaced: S3's ETag, else its modification time

    def identity(self) -> list[Any]:
        """What an attempt records of the file, to tell on a resume whether it still holds the same rows."""
        return [self.uri, self.size, self.version]


def file_version(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return mtime.isoformat() if hasattr(mtime, "isoformat") else repr(mtime) if mtime is not None else ""


@dataclass(frozen=True)
class ShardTask:
    """One unit of read work: a file and how many of its rows to take (None = all)."""
    uri: str
    relpath: str
    format: str
    take: int | None
    duplicates: str = "{}"  # JSON {row number: where that id was first seen} of rows whose id repeats
    start: int = 0          # first row number of this task's range
    seek_row: int = 0       # a jsonl place at or before `start` to read from: row number, line number, byte
    seek_line: int = 0
    seek_byte: int = 0


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def list_input_files(path: str, fmt: str = "auto") -> list[InputFile]:
    """Files under `path` (file, directory, glob or prefix), sorted, with sizes and formats."""
    fs, inner = filesystem_for(path)
    with storage_errors(path, "list input"):
        if _has_glob(inner):
            matches = fs.glob(inner, detail=True)
            root = inner[: min(inner.find(c) for c in "*?[" if c in inner)].rsplit("/", 1)[0]
        elif fs.isdir(inner):
            matches = fs.find(inner, detail=True)
            root = inner
        elif fs.isfile(inner):
            matches, root = {inner: fs.info(inner)}, inner.rsplit("/", 1)[0]
        else:
            matches = {}
            for match, info in (fs.glob(inner + "*", detail=True) if inner else {}).items():
                matches.update(fs.find(match, detail=True) if info.get("type") == "directory" else {match: info})
            root = inner.rsplit("/", 1)[0]
            if not matches and not is_s3(path):
                raise UserError(f"input.path: {path} does not exist")
            if not matches and is_s3(path):
                check_bucket(path, "input.path")
        files = []
        for match in sorted(matches):
            info = matches[match]
            if info.get("type") == "directory":
                continue
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
            files.append(InputFile(full_uri(path, match), rel or name, int(info.get("size") or 0), file_format,
                                   file_version(info)))
    if not files:
        raise UserError(f"input.path: no input files (.parquet, .jsonl, .csv) found at {path}")
    return files


def input_shape_problems(files: int, rows: int, schema: pa.Schema | None, required: dict[str, str]) -> list[str]:
    """What makes an input unusable for a job: no rows, or no column the job file names (`required`: column ->
    the job file's field that names it)."""
    if not rows:
        return [f"input.path: the input holds no rows ({files} file(s), all empty)"]
    names = schema.names if schema is not None else []
    have = ", ".join(names) or "(no columns)"
    return [f"{field}: column '{column}' is not in the input; it has: {have}"
            for column, field in required.items() if column not in names]


def compression_of(path: str) -> str | None:
    return COMPRESSION_BY_EXTENSION.get(os.path.splitext(path)[1].lower())


def format_extension(path: str) -> str:
    """The extension that names a file's format, under any compression extension (`a.jsonl.gz` -> .jsonl)."""
    stem, ext = os.path.splitext(path)
    if ext.lower() in COMPRESSION_BY_EXTENSION:
        ext = os.path.splitext(stem)[1]
    return ext.lower()


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    return FORMAT_BY_EXTENSION.get(format_extension(path))


# ---- reading one shard -------------------------------------------------------------------------

@dataclass(frozen=True)
class SeekPoint:
    """Where a jsonl row starts: its row number, its line number (1-based lines before it) and byte offset."""
    row: int = 0
    line: int = 0
    byte: int = 0


def iter_shard(uri: str, fmt: str, schema: pa.Schema | None = None, *, start: int = 0, stop: int | None = None,
               seek: SeekPoint | None = None, seek_points: list[SeekPoint] | None = None) -> Iterator[pa.Table]:
    """Stream a shard as tables of at most READ_CHUNK_ROWS rows, each row with its 0-based row number.

    Rows that cannot be parsed (a jsonl line that is not a JSON object) come through with
    `_row_error` set, so that every input row has an output row. Reading starts near row `start`
    (parquet: its row group; jsonl: `seek`), so earlier rows may come too; callers skip them. A jsonl
    shard is not parsed past row `stop`; other formats may yield rows past it.
    `seek_points`, for jsonl, collects a SeekPoint every SEEK_EVERY rows.
    """
    fs, inner = filesystem_for(uri)
    codec = compression_of(uri)
    with fs.open(inner, "rb") as raw:
        if codec is not None and fmt == "parquet":
            raise ValueError(WHOLE_FILE_PARQUET)
        handle = raw if codec is None else io.BufferedReader(
            pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), codec), buffer_size=1 << 20)
        if fmt == "parquet":
            yield from _iter_parquet(handle, schema, start)
        elif fmt == "jsonl":
            yield from _iter_jsonl(handle, schema, seek or SeekPoint(), seek_points, stop)
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


def _iter_parquet(handle, schema: pa.Schema | None, first_wanted: int = 0) -> Iterator[pa.Table]:
    parquet = pq.ParquetFile(handle)
    start, groups = 0, list(range(parquet.metadata.num_row_groups))
    while groups and start + parquet.metadata.row_group(groups[0]).num_rows <= first_wanted:
        start += parquet.metadata.row_group(groups.pop(0)).num_rows
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=READ_CHUNK_ROWS, row_groups=groups):
        table = pa.Table.from_batches([batch])
        errors: list[str | None] = [None] * table.num_rows
        if schema is not None:
            table = conform(table, schema, errors)
        yield _numbered(table, start, errors)
        start += table.num_rows


def _iter_jsonl(handle, schema: pa.Schema | None, seek: SeekPoint,
                seek_points: list[SeekPoint] | None = None, stop: int | None = None) -> Iterator[pa.Table]:
    rows: list[dict] = []
    errors: list[str | None] = []
    start = seek.row
    if seek.byte:
        handle.seek(seek.byte)
    elif _starts_an_array(handle):
        yield from _iter_json_array(handle, schema, stop)
        return
    offset = seek.byte
    for line_no, raw, length in _lines(handle, seek.line + 1):
        at, offset = offset, offset + length
        if line_no == 1 and raw is not None and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw is not None and not raw.strip():
            continue
        row_number = start + len(rows)
        if stop is not None and row_number >= stop:
            break
        if seek_points is not None and row_number % SEEK_EVERY == 0:
            seek_points.append(SeekPoint(row_number, line_no - 1, at))
        record, error = _parse_line(raw, line_no)
        rows.append(record)
        errors.append(error)
        if len(rows) >= READ_CHUNK_ROWS:
            yield _numbered(_rows_to_table(rows, schema, errors), start, errors)
            start += len(rows)
            rows, errors = [], []
    if rows:
        yield _numbered(_rows_to_table(rows, schema, errors), start, errors)


def _lines(handle, first_line: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line, bytes it takes) of each line; a line longer than MAX_LINE_BYTES comes as None,
    skipped over without holding it."""
    line_no = first_line
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        length = len(raw)
        if length > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = handle.readline(1 << 20)
                length += len(raw)
            yield line_no, None, length
        else:
            yield line_no, raw, length
        line_no += 1


def _parse_line(raw: bytes | None, line_no: int) -> tuple[dict, str | None]:
    """A jsonl line's record, or an empty record and the row error that says why it is not one."""
    if raw is None:
        return {}, f"input line {line_no}: longer than {MAX_LINE_BYTES >> 20} MiB, not read"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {}, f"input line {line_no}: not UTF-8 (byte {exc.start}: {exc.reason})"
    try:
        record = json.loads(line)
    except RecursionError:
        return {}, f"input line {line_no}: nested deeper than {MAX_NESTING} levels"
    except ValueError as exc:
        return {}, f"input line {line_no}: not a JSON object ({exc})"
    return _checked_record(record, f"input line {line_no}", raw.count(b"[") + raw.count(b"{"))


def _checked_record(record: Any, where: str, brackets: int) -> tuple[dict, str | None]:
    if not isinstance(record, dict):
        return {}, f"{where}: not a JSON object (expected a JSON object, got {type(record).__name__})"
    if brackets > MAX_NESTING and _depth(record) > MAX_NESTING:
        return {}, f"{where}: nested deeper than {MAX_NESTING} levels"
    return record, None


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((inner, depth + 1) for inner in item if isinstance(inner, (dict, list)))
    return deepest


def _starts_an_array(handle) -> bool:
    """Whether the file holds one JSON array rather than JSON lines (its first non-blank character is `[`)."""
    head = handle.peek(4096)[:4096] if hasattr(handle, "peek") else handle.read(4096)
    if not hasattr(handle, "peek"):
        handle.seek(0)
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return text.startswith(b"[")


def _iter_json_array(handle, schema: pa.Schema | None, stop: int | None) -> Iterator[pa.Table]:
    """A .json file holding one array: each element a row (an element that is not an object: a row error)."""
    data = handle.read(MAX_ARRAY_BYTES + 1)
    if len(data) > MAX_ARRAY_BYTES:
        raise ValueError(f"a JSON array file larger than {MAX_ARRAY_BYTES >> 30} GiB; write it as JSON Lines "
                         "(one object per line), which is read as it streams")
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_NESTING} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON Lines, and not one JSON array either ({exc})") from None
    if not isinstance(items, list):
        raise ValueError("not JSON Lines, and not one JSON array either")
    items = items if stop is None else items[:stop]
    for first in range(0, len(items), READ_CHUNK_ROWS):
        rows, errors = [], []
        for number, item in enumerate(items[first:first + READ_CHUNK_ROWS], start=first):
            record, error = _checked_record(item, f"input item {number}", MAX_NESTING + 1)
            rows.append(record)
            errors.append(error)
        yield _numbered(_rows_to_table(rows, schema, errors), first, errors)


def _rows_to_table(rows: list[dict], schema: pa.Schema | None, errors: list[str | None] | None = None) -> pa.Table:
    """Rows as a table. A value whose type does not fit its column (an int among texts, say) is set to null
    and its row gets an error in `errors`, so one odd row never makes its whole shard unreadable."""
    if schema is not None:
        text_ids = [f.name for f in schema if f.metadata == ID_FIELD_METADATA]
        rows = [{k: _as_text(r.get(k)) if k in text_ids else r.get(k) for k in schema.names} for r in rows]
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        if errors is None:
            raise
    schema = schema or _first_value_schema(rows)
    clean = []
    for i, row in enumerate(rows):
        fitted = {}
        for field in schema:
            value = row.get(field.name)
            if value is not None and not _fits(value, field.type):
                errors[i] = errors[i] or (f"column '{field.name}' holds {type(value).__name__}, "
                                          f"expected {_type_word(field.type)}")
                value = None
            fitted[field.name] = value
        clean.append(fitted)
    return pa.Table.from_pylist(clean, schema=schema)


def _as_text(value: Any) -> Any:
    """An id as text: numbers and booleans as JSON spells them; text, null and objects unchanged."""
    return json.dumps(value) if isinstance(value, (int, float)) else value


def _first_value_schema(rows: list[dict]) -> pa.Schema:
    """Each column typed by what most of its non-null values are; text when text is as common as any other
    kind (or the column has no values)."""
    kinds: dict[str, dict[type, list]] = {}
    for row in rows:
        for name, value in row.items():
            by_kind = kinds.setdefault(name, {})
            if value is not None:
                by_kind.setdefault(type(value), []).append(value)
    fields = []
    for name, by_kind in kinds.items():
        counts = {kind: len(values) for kind, values in by_kind.items()}
        if not counts or counts.get(str, 0) >= max(counts.values()):
            fields.append((name, pa.string()))
            continue
        kind = max(counts, key=counts.get)
        try:
            fields.append((name, pa.array(by_kind[kind]).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            fields.append((name, pa.string()))
    return pa.schema(fields)


def merge_chunk_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for a shard's chunks; a column whose chunks disagree beyond promotion becomes text
    (its odd values then become row errors when read)."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    fields: dict[str, pa.DataType] = {}
    for schema in schemas:
        for field in schema:
            if field.name not in fields:
                fields[field.name] = field.type
                continue
            try:
                fields[field.name] = pa.unify_schemas(
                    [pa.schema([(field.name, fields[field.name])]), pa.schema([field])],
                    promote_options="permissive").field(0).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                fields[field.name] = pa.string()
    return pa.schema(list(fields.items()))


def _fits(value, type_: pa.DataType) -> bool:
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return isinstance(value, str)
    try:
        pa.array([value], type_)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return False


def _type_word(type_: pa.DataType) -> str:
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return "text"
    if pa.types.is_integer(type_):
        return "an integer"
    if pa.types.is_floating(type_):
        return "a number"
    if pa.types.is_boolean(type_):
        return "true/false"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return "a list"
    if pa.types.is_struct(type_):
        return "an object"
    return str(type_)


def _iter_csv(handle, schema: pa.Schema | None) -> Iterator[pa.Table]:
    """CSV rows; a row with more or fewer fields than the header becomes a row error, after the shard's other
    rows (in file order), so that where it lands does not depend on how the reader's blocks fall."""
    ragged: list[str] = []

    def refuse_row(row) -> str:
        text = row.text if len(row.text) <= 60 else row.text[:57] + "..."
        ragged.append(f"csv row {text!r}: {row.actual_columns} fields, the header has {row.expected_columns}")
        return "skip"

    convert = pacsv.ConvertOptions(column_types=schema) if schema is not None else None
    reader = pacsv.open_csv(handle, convert_options=convert, read_options=pacsv.ReadOptions(block_size=1 << 20),
                            parse_options=pacsv.ParseOptions(invalid_row_handler=refuse_row))
    start = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        errors: list[str | None] = [None] * table.num_rows
        if schema is not None:
            table = conform(table, schema, errors)
        yield _numbered(table, start, errors)
        start += table.num_rows
    if ragged:
        errors = list(ragged)
        yield _numbered(_rows_to_table([{} for _ in ragged], schema, errors), start, errors)


def conform(table: pa.Table, schema: pa.Schema, errors: list[str | None] | None = None) -> pa.Table:
    """Give a shard's table the job-wide input schema: same columns, same order, nulls where absent. A value
    that does not fit its column's type (an int64 beyond a double's exact range, say) becomes null, and its
    row's entry in `errors` says so; without `errors`, such a value raises."""
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            if errors is None:
                raise
            columns.append(_cast_each(column, field, errors))
    return pa.Table.from_arrays(columns, schema=schema)


def _cast_each(column: pa.ChunkedArray, field: pa.Field, errors: list[str | None]) -> pa.Array:
    values = []
    for i, value in enumerate(column.to_pylist()):
        try:
            values.append(pa.array([value], column.type).cast(field.type)[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            values.append(None)
            errors[i] = errors[i] or (f"column '{field.name}' holds {value!r}, which does not fit "
                                      f"{_type_word(field.type)} (the type its other shards give it)")
    return pa.array(values, field.type)


# The input schema marks the job's id column with this metadata when it makes it text (unify_input_schema).
ID_FIELD_METADATA = {b"llmbatch": b"id_column"}


# ---- the cheap pre-pass ------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardScan:
    uri: str
    rows: int
    schema: bytes  # serialized pa.Schema
    error: str | None = None
    seek_points: tuple[SeekPoint, ...] = ()  # jsonl: where every SEEK_EVERY-th row starts
    row_groups: tuple[int, ...] = ()          # parquet: rows in each row group


def scan_shard(uri: str, fmt: str) -> ShardScan:
    """Count a shard's rows and read its schema (parquet: from the footer; jsonl/csv: by parsing)."""
    try:
        fs, inner = filesystem_for(uri)
        if not fs.size(inner):  # an empty placeholder (a zero-byte file): no rows, whatever its format
            return ShardScan(uri, 0, b"")
        if fmt == "parquet" and compression_of(uri) is not None:
            raise ValueError(WHOLE_FILE_PARQUET)
        if fmt == "parquet":
            with fs.open(inner, "rb") as handle:
                meta = pq.ParquetFile(handle)
                groups = tuple(meta.metadata.row_group(i).num_rows for i in range(meta.metadata.num_row_groups))
                return ShardScan(uri, meta.metadata.num_rows, meta.schema_arrow.serialize().to_pybytes(),
                                 row_groups=groups)
        rows, schemas, points = 0, [], []
        for table in iter_shard(uri, fmt, seek_points=points if fmt == "jsonl" else None):
            rows += table.num_rows
            data = table.drop_columns(["_row_number", ROW_ERROR_COLUMN])
            if data.num_columns:
                schemas.append(data.schema)
        schema = merge_chunk_schemas(schemas) if schemas else pa.schema([])
        return ShardScan(uri, rows, schema.serialize().to_pybytes(), seek_points=tuple(points))
    except Exception as exc:  # reported per shard; the driver turns it into one clear error
        return ShardScan(uri, 0, b"", f"{type(exc).__name__}: {exc}")


def unify_input_schema(scans: list[ShardScan], id_column: str | None = None) -> pa.Schema:
    """One schema for the job's shards. The id column, when the shards give it different types, becomes text,
    so that each shard's ids are spelled as written there (int64 ids in one shard and doubles or texts in
    another would otherwise meet as doubles or not at all, and an int64 beyond a double's range would fail)."""
    named = [(s.uri, pa.ipc.read_schema(pa.py_buffer(s.schema))) for s in scans if s.schema]
    id_types = {str(f.type) for _, schema in named for f in schema if f.name == id_column} - {"null"}
    text_id = len(id_types) > 1
    if text_id:
        named = [(uri, schema.remove(schema.get_field_index(id_column)) if id_column in schema.names else schema)
                 for uri, schema in named]
    try:
        unified = pa.unify_schemas([schema for _, schema in named], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(_schema_conflict(named) or
                        f"input.path: the shards' columns have types that cannot be combined ({exc})") from None
    # A column that is null in every sample becomes string: prompts and ids are text.
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in unified]
    if text_id:
        fields.insert(0, pa.field(id_column, pa.string(), metadata=ID_FIELD_METADATA))
    return pa.schema(fields)


def _schema_conflict(named: list[tuple[str, pa.Schema]]) -> str | None:
    """Name the first column whose types in two shards cannot be combined, and the two shards."""
    seen: dict[str, tuple[str, pa.Field]] = {}
    for uri, schema in named:
        for field in schema:
            if field.name not in seen:
                seen[field.name] = (uri, field)
                continue
            first_uri, first = seen[field.name]
            try:
                pa.unify_schemas([pa.schema([first]), pa.schema([field])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                return (f"input.path: column '{field.name}' is {first.type} in {first_uri} but {field.type} in "
                        f"{uri}; make the shards agree (or cast the column when writing them)")
    return None


def plan_shard_tasks(files: list[InputFile], rows_per_file: dict[str, int], limit: int | None) -> list[ShardTask]:
    """One task per shard, honouring `input.limit` by taking rows from the shards in path order. Each takes
    the rows its scan counted, so rows appended to a file while the job runs are not read (the next
    attempt finds the file changed)."""
    tasks, remaining = [], limit
    for f in files:
        n = rows_per_file[f.uri]
        take = n
        if remaining is not None:
            if remaining <= 0:
                break
            take = min(n, remaining)
            remaining -= take
        if n and take > 0:
            tasks.append(ShardTask(f.uri, f.relpath, f.format, take))
    return tasks


def id_hashes(task: ShardTask, schema: pa.Schema, id_column: str) -> np.ndarray:
    """A stable 128-bit hash of each row's id as the read stage will spell it: a null id is spelled by its
    place (`relpath#row`), so that an explicit id equal to that spelling counts as a repeat of it."""
    hashes: list[bytes] = []
    for table in iter_shard(task.uri, task.format, schema, stop=task.take):
        numbers = table.column("_row_number").to_pylist()
        for value, number in zip(table.column(id_column).to_pylist(), numbers):
            hashes.append(stable_hash(stable_id(task.relpath, number) if value is None else str(value)))
        if task.take is not None and len(hashes) >= task.take:
            break
    return key_array(hashes[:task.take] if task.take is not None else hashes)


def mark_duplicate_ids(tasks: list[ShardTask], hashes: list[np.ndarray]) -> tuple[list[ShardTask], int]:
    """Tasks whose later rows repeating an earlier row's id (in path and row order) are marked; the count."""
    if not tasks:
        return tasks, 0
    every = np.concatenate(hashes)
    _, first, inverse = np.unique(every, return_index=True, return_inverse=True)
    first_seen = first[inverse]
    repeated = first_seen != np.arange(len(every))
    owner = np.repeat(np.arange(len(tasks)), [len(h) for h in hashes])
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hashes])])
    marked = [dict() for _ in tasks]
    for position in np.flatnonzero(repeated):
        origin = int(first_seen[position])
        o_task = tasks[owner[origin]]
        marked[owner[position]][int(position - offsets[owner[position]])] = \
            f"{o_task.relpath} row {int(origin - offsets[owner[origin]])}"
    out = [replace(t, duplicates=json.dumps(m)) if m else t for t, m in zip(tasks, marked)]
    return out, int(repeated.sum())


# Read tasks a run is cut into at most (whole CSV shards aside). A task streams its rows, so a larger one costs
# no memory; thousands of small ones cost the driver planning time and the engines' CPU at start-up.
MAX_READ_TASKS = 256


def read_task_rows(total_rows: int, batch_size: int) -> int:
    """Rows per read task: a batch, or more once a batch each would make more than MAX_READ_TASKS tasks."""
    return max(batch_size, -(-total_rows // MAX_READ_TASKS))


def split_tasks(tasks: list[ShardTask], rows_per_task: int, scans: dict[str, "ShardScan"]) -> list[ShardTask]:
    """Cut each shard's task into ranges of about `rows_per_task` rows, so that a large shard spreads over
    every engine replica and its rows are written (and resumed) a range at a time. A jsonl range starts at
    the seek point before it; a parquet range is whole row groups (a row group is decoded from its start);
    CSV, compressed and JSON-array shards stay whole (they cannot be read from a place in the middle)."""
    out: list[ShardTask] = []
    for task in tasks:
        scan = scans[task.uri]
        total = task.take if task.take is not None else scan.rows
        whole = task.format == "csv" or compression_of(task.uri) is not None or \
            (task.format == "jsonl" and not scan.seek_points)  # csv, compressed, a .json array: no seeking
        if whole or total <= rows_per_task:
            out.append(task)
            continue
        repeated = {int(k): v for k, v in json.loads(task.duplicates).items()}
        repeated_rows = sorted(repeated)
        point_rows = [p.row for p in scan.seek_points]  # ascending
        for start, take in _ranges(task.format, total, rows_per_task, scan.row_groups):
            at = bisect.bisect_right(point_rows, start) - 1
            seek = scan.seek_points[at] if at >= 0 else SeekPoint()
            mine = {str(n): repeated[n] for n in repeated_rows[bisect.bisect_left(repeated_rows, start):
                                                               bisect.bisect_left(repeated_rows, start + take)]}
            out.append(replace(task, start=start, take=take, duplicates=json.dumps(mine) if mine else "{}",
                               seek_row=seek.row, seek_line=seek.line, seek_byte=seek.byte))
    return out


def _ranges(fmt: str, total: int, rows_per_task: int, row_groups: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, rows) of each range; parquet ranges end on row-group boundaries."""
    if fmt != "parquet":
        return [(start, min(rows_per_task, total - start)) for start in range(0, total, rows_per_task)]
    ranges, start, size = [], 0, 0
    for group in row_groups:
        size += group
        if size >= rows_per_task or start + size >= total:
            ranges.append((start, min(size, total - start)))
            start, size = start + size, 0
        if start >= total:
            break
    if start < total and size:
        ranges.append((start, total - start))
    return ranges


# ---- the Ray Data stage ------------------------------------------------------------------------

def stable_id(relpath: str, row_number: int) -> str:
    return f"{relpath}#{row_number}"


class ReadShards:
    """Ray Data stage: one shard task in, that shard's rows out (streamed), with `id` and `_input`."""

    columns = StageColumns("read", adds=(ID_COLUMN, INPUT_COLUMN, ROW_ERROR_COLUMN), keeps=False)

    def __init__(self, schema_bytes: bytes, id_column: str | None, done: np.ndarray | None = None):
        self.schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
        self.id_column = id_column
        self.done = done if done is not None and len(done) else None  # rows an earlier attempt wrote

    def __call__(self, batch: dict) -> Iterator[pa.Table]:
        n = len(batch["uri"])
        for i in range(n):
            uri, relpath, fmt = str(batch["uri"][i]), str(batch["relpath"][i]), str(batch["format"][i])
            take = batch["take"][i]
            take = None if take is None or take != take else int(take)  # NaN from pandas-free None
            repeated = {int(k): v for k, v in json.loads(_field(batch, "duplicates", i, "{}")).items()}
            start = int(_field(batch, "start", i, 0))
            seek = SeekPoint(int(_field(batch, "seek_row", i, 0)), int(_field(batch, "seek_line", i, 0)),
                             int(_field(batch, "seek_byte", i, 0)))
            emitted = 0
            stop = start + take if take is not None else None
            for table in iter_shard(uri, fmt, self.schema, start=start, stop=stop, seek=seek):
                if take is not None and emitted >= take:
                    break
                if not table.num_rows:
                    continue
                numbers = table.column("_row_number")
                if numbers[0].as_py() < start:
                    table = table.filter(pc.greater_equal(numbers, start))
                if take is not None:
                    table = table.slice(0, take - emitted)
                if not table.num_rows:
                    continue
                emitted += table.num_rows
                rows = self._with_ids(table, str(relpath), repeated)
                if self.done is not None:
                    finished = is_done(row_key_hashes(rows.column(ID_COLUMN).to_pylist(),
                                                      rows.column(ROW_ERROR_COLUMN).to_pylist()), self.done)
                    rows = rows.filter(pa.array(~finished))
                if rows.num_rows:
                    yield rows

    def _with_ids(self, table: pa.Table, relpath: str, repeated: dict[int, str] | None = None) -> pa.Table:
        numbers = table.column("_row_number").to_pylist()
        errors = table.column(ROW_ERROR_COLUMN).to_pylist()
        data = table.drop_columns(["_row_number", ROW_ERROR_COLUMN])
        if self.id_column:
            raw_ids = data.column(self.id_column).to_pylist()
            ids = [stable_id(relpath, n) if v is None else str(v) for v, n in zip(raw_ids, numbers)]
            errors = [e or (f"id column '{self.id_column}' is null" if v is None else None)
                      for e, v in zip(errors, raw_ids)]
            repeated = repeated or {}
            # a repeated id comes first whatever else is wrong with the row: resume keys such rows by this text
            errors = [f"{DUPLICATE_ID_ERROR}'{i}' at {relpath} row {n} (first at {repeated[n]})"
                      + (f"; {e}" if e else "") if n in repeated else e for e, i, n in zip(errors, ids, numbers)]
        else:
            ids = [stable_id(relpath, n) for n in numbers]
        packed = pa.StructArray.from_arrays([c.combine_chunks() for c in data.columns], names=data.column_names) \
            if data.num_columns else pa.array([{}] * len(numbers), pa.struct([]))
        return pa.table({
            ID_COLUMN: pa.array(ids, pa.string()),
            INPUT_COLUMN: packed,
            ROW_ERROR_COLUMN: pa.array(errors, pa.string()),
        })


def _field(batch: dict, name: str, i: int, default):
    column = batch.get(name)
    return default if column is None else column[i]


def shard_task_rows(tasks: list[ShardTask]) -> list[dict]:
    return [asdict(t) for t in tasks]
