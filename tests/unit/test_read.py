"""Read stage: listing shards, reading jsonl/csv/parquet, scanning, planning, ids and `_input`."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llmbatch.pipelines.read as read
from llmbatch.errors import UserError
from llmbatch.pipelines.columns import row_key_hashes
from llmbatch.pipelines.read import (
    InputFile,
    ReadShards,
    ShardScan,
    ShardTask,
    conform,
    iter_shard,
    list_input_files,
    plan_shard_tasks,
    scan_shard,
    shard_task_rows,
    stable_id,
    unify_input_schema,
)


def touch(path, text: str = "{}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path, rows: list[dict]):
    return touch(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_all(uri: str, fmt: str, schema=None) -> list[dict]:
    out = []
    for table in iter_shard(str(uri), fmt, schema):
        out.extend(table.to_pylist())
    return out


def schema_of(scan: ShardScan) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(scan.schema))


# ---- stable_id -----------------------------------------------------------------------------------

def test_stable_id_is_relpath_hash_row_number():
    assert stable_id("part-0.jsonl", 0) == "part-0.jsonl#0"
    assert stable_id("sub/dir/a.parquet", 1234) == "sub/dir/a.parquet#1234"


# ---- list_input_files ----------------------------------------------------------------------------

def test_list_single_file(tmp_path):
    f = touch(tmp_path / "prompts.jsonl", '{"prompt": "x"}\n')
    (only,) = list_input_files(str(f))
    assert only == InputFile(str(f), "prompts.jsonl", f.stat().st_size, "jsonl", repr(f.stat().st_mtime))


def test_a_file_rewritten_with_the_same_size_gets_a_new_version(tmp_path):
    f = touch(tmp_path / "prompts.jsonl", '{"prompt": "a"}\n')
    (before,) = list_input_files(str(f))
    f.write_text('{"prompt": "b"}\n')
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    (after,) = list_input_files(str(f))
    assert before.size == after.size and before.version != after.version
    assert after.identity() == [str(f), after.size, after.version]


def test_list_directory_with_nested_files_sorted_with_relative_paths(tmp_path):
    touch(tmp_path / "b.jsonl")
    touch(tmp_path / "a.csv", "prompt\nx\n")
    touch(tmp_path / "sub" / "deeper" / "c.parquet", "")
    touch(tmp_path / "sub" / "d.ndjson")
    files = list_input_files(str(tmp_path))
    assert [f.relpath for f in files] == ["a.csv", "b.jsonl", "sub/d.ndjson", "sub/deeper/c.parquet"]
    assert [f.format for f in files] == ["csv", "jsonl", "jsonl", "parquet"]
    assert all(f.uri == str(tmp_path / f.relpath) for f in files)
    assert files[1].size == 3


def test_list_directory_skips_hidden_and_underscore_files_and_dirs(tmp_path):
    touch(tmp_path / "keep.jsonl")
    touch(tmp_path / ".hidden.jsonl")
    touch(tmp_path / "_SUCCESS", "")
    touch(tmp_path / "_manifest.json")
    touch(tmp_path / ".git" / "x.jsonl")
    touch(tmp_path / "_tmp" / "y.jsonl")
    touch(tmp_path / "sub" / "_part.jsonl")
    assert [f.relpath for f in list_input_files(str(tmp_path))] == ["keep.jsonl"]


def test_list_directory_ignores_files_with_unknown_extension(tmp_path):
    touch(tmp_path / "data.jsonl")
    touch(tmp_path / "README.md", "# readme")
    touch(tmp_path / "notes.txt", "x")
    assert [f.relpath for f in list_input_files(str(tmp_path))] == ["data.jsonl"]


def test_list_directory_with_explicit_format_takes_every_file(tmp_path):
    touch(tmp_path / "a.txt", "prompt\nx\n")
    touch(tmp_path / "b.data", "prompt\ny\n")
    files = list_input_files(str(tmp_path), "csv")
    assert [(f.relpath, f.format) for f in files] == [("a.txt", "csv"), ("b.data", "csv")]


def test_list_single_file_with_unknown_extension_is_a_user_error(tmp_path):
    f = touch(tmp_path / "prompts.txt", "x")
    with pytest.raises(UserError) as info:
        list_input_files(str(f))
    assert str(info.value) == (f"input.path: cannot tell the format of {f}; "
                               "set input.format to parquet, jsonl or csv")


def test_list_single_file_with_unknown_extension_and_explicit_format(tmp_path):
    f = touch(tmp_path / "prompts.txt", "prompt\nx\n")
    (only,) = list_input_files(str(f), "csv")
    assert only.format == "csv" and only.relpath == "prompts.txt"


def test_extension_match_is_case_insensitive(tmp_path):
    f = touch(tmp_path / "DATA.JSONL")
    assert list_input_files(str(f))[0].format == "jsonl"


def test_list_glob_matches_only_the_pattern_with_paths_relative_to_glob_root(tmp_path):
    touch(tmp_path / "a.jsonl")
    touch(tmp_path / "b.jsonl")
    touch(tmp_path / "c.csv", "prompt\nx\n")
    touch(tmp_path / "_skip.jsonl")
    files = list_input_files(str(tmp_path / "*.jsonl"))
    assert [f.relpath for f in files] == ["a.jsonl", "b.jsonl"]


def test_list_glob_over_subdirectories_keeps_subdir_in_relpath(tmp_path):
    touch(tmp_path / "day=1" / "x.jsonl")
    touch(tmp_path / "day=2" / "x.jsonl")
    touch(tmp_path / "_tmp" / "x.jsonl")
    files = list_input_files(str(tmp_path / "*" / "x.jsonl"))
    assert [f.relpath for f in files] == ["day=1/x.jsonl", "day=2/x.jsonl"]


def test_list_glob_matching_unknown_extension_is_a_user_error(tmp_path):
    touch(tmp_path / "a.jsonl")
    touch(tmp_path / "a.txt", "x")
    with pytest.raises(UserError, match="cannot tell the format of"):
        list_input_files(str(tmp_path / "a.*"))


def test_list_glob_matching_nothing_is_a_user_error(tmp_path):
    touch(tmp_path / "a.jsonl")
    with pytest.raises(UserError, match="no input files"):
        list_input_files(str(tmp_path / "*.parquet"))


def test_list_prefix_matches_files_and_directories_starting_with_it(tmp_path):
    touch(tmp_path / "part-0.jsonl")
    touch(tmp_path / "part-1.jsonl")
    touch(tmp_path / "partition" / "p.jsonl")
    touch(tmp_path / "other.jsonl")
    files = list_input_files(str(tmp_path / "part"))
    assert [f.relpath for f in files] == ["part-0.jsonl", "part-1.jsonl", "partition/p.jsonl"]


def test_list_prefix_skips_unknown_extensions(tmp_path):
    touch(tmp_path / "part-0.jsonl")
    touch(tmp_path / "part-0.log", "x")
    assert [f.relpath for f in list_input_files(str(tmp_path / "part"))] == ["part-0.jsonl"]


def test_list_missing_path_is_a_user_error(tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(UserError) as info:
        list_input_files(str(missing))
    assert str(info.value) == f"input.path: {missing} does not exist"


def test_list_empty_directory_is_a_user_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as info:
        list_input_files(str(empty))
    assert str(info.value) == f"input.path: no input files (.parquet, .jsonl, .csv) found at {empty}"


def test_list_directory_with_only_hidden_files_is_a_user_error(tmp_path):
    touch(tmp_path / "_SUCCESS", "")
    touch(tmp_path / ".x.jsonl")
    with pytest.raises(UserError, match="no input files"):
        list_input_files(str(tmp_path))


def test_list_relative_path_becomes_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "data" / "a.jsonl")
    monkeypatch.chdir(tmp_path)
    (only,) = list_input_files("data")
    assert only.uri == str(tmp_path / "data" / "a.jsonl")
    assert only.relpath == "a.jsonl"


def test_list_explicitly_named_underscore_file_is_read(tmp_path):
    """Skipping `_`/`.` names is for listings (markers, manifests); a file the user names must be read."""
    f = touch(tmp_path / "_train.jsonl", '{"prompt": "x"}\n')
    files = list_input_files(str(f))
    assert [x.uri for x in files] == [str(f)]


# ---- iter_shard: jsonl ---------------------------------------------------------------------------

def test_jsonl_rows_are_numbered_and_blank_lines_skipped(tmp_path):
    f = touch(tmp_path / "a.jsonl", '{"prompt": "a"}\n\n   \n{"prompt": "b"}\n{"prompt": "c"}')
    rows = read_all(f, "jsonl")
    assert [(r["prompt"], r["_row_number"], r["_row_error"]) for r in rows] == [
        ("a", 0, None), ("b", 1, None), ("c", 2, None)]


def test_jsonl_invalid_line_becomes_an_error_row_with_its_line_number(tmp_path):
    f = touch(tmp_path / "a.jsonl", '{"prompt": "a"}\n\n{"prompt": oops}\n[1, 2]\n{"prompt": "d"}\n')
    rows = read_all(f, "jsonl")
    assert len(rows) == 4  # nothing dropped
    assert [r["_row_number"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["_row_error"] is None and rows[3]["_row_error"] is None
    assert rows[1]["_row_error"].startswith("input line 3: not a JSON object (")
    assert rows[2]["_row_error"] == "input line 4: not a JSON object (expected a JSON object, got list)"
    assert rows[1]["prompt"] is None and rows[3]["prompt"] == "d"


def test_jsonl_chunk_of_only_invalid_lines_still_yields_error_rows(tmp_path, monkeypatch):
    """A chunk where every line is broken (e.g. a truncated last line after a full chunk) must not crash."""
    monkeypatch.setattr(read, "READ_CHUNK_ROWS", 2)
    f = touch(tmp_path / "a.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "trunc')
    rows = read_all(f, "jsonl")
    assert [r["_row_number"] for r in rows] == [0, 1, 2]
    assert rows[2]["_row_error"].startswith("input line 3: not a JSON object")


def test_jsonl_file_of_a_single_invalid_line_scans_as_one_error_row(tmp_path):
    f = touch(tmp_path / "a.jsonl", "not json at all\n")
    scan = scan_shard(str(f), "jsonl")
    assert scan.error is None
    assert scan.rows == 1


def test_jsonl_is_read_in_chunks_with_continuous_row_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "READ_CHUNK_ROWS", 2)
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": str(i)} for i in range(5)])
    tables = list(iter_shard(str(f), "jsonl"))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    assert [n for t in tables for n in t.column("_row_number").to_pylist()] == [0, 1, 2, 3, 4]


def test_jsonl_with_schema_conforms_columns_and_order(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"b": 1, "prompt": "x", "extra": True}, {"prompt": "y"}])
    schema = pa.schema([("prompt", pa.string()), ("b", pa.int64()), ("missing", pa.string())])
    (table,) = list(iter_shard(str(f), "jsonl", schema))
    assert table.column_names == ["prompt", "b", "missing", "_row_number", "_row_error"]
    assert table.to_pylist() == [
        {"prompt": "x", "b": 1, "missing": None, "_row_number": 0, "_row_error": None},
        {"prompt": "y", "b": None, "missing": None, "_row_number": 1, "_row_error": None},
    ]


def test_jsonl_non_ascii_and_crlf_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes('{"prompt": "你好 😀"}\r\n{"prompt": "مرحبا"}\r\n'.encode("utf-8"))
    assert [r["prompt"] for r in read_all(f, "jsonl")] == ["你好 😀", "مرحبا"]


def test_jsonl_line_not_utf8_is_an_error_row_naming_the_line(tmp_path):
    """Only the line with bad bytes fails; the rows around it are read, a BOM at the start is dropped."""
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n{"prompt": "c"}\n')
    rows = read_all(f, "jsonl")
    assert [r.get("prompt") for r in rows] == ["a", None, "c"]
    assert rows[1]["_row_error"] == "input line 2: not UTF-8 (byte 12: invalid start byte)"
    assert [r["_row_number"] for r in rows] == [0, 1, 2] and rows[0]["_row_error"] is None


def test_iter_shard_unknown_format_is_a_value_error(tmp_path):
    f = touch(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="unknown format xml"):
        read_all(f, "xml")


# ---- iter_shard: csv and parquet -----------------------------------------------------------------

def test_csv_rows_are_numbered_and_typed(tmp_path):
    f = touch(tmp_path / "a.csv", 'id,prompt,n\n7,hello,3\n8,"wo,rld",\n9,"中文",5\n')
    rows = read_all(f, "csv")
    assert rows == [
        {"id": 7, "prompt": "hello", "n": 3, "_row_number": 0, "_row_error": None},
        {"id": 8, "prompt": "wo,rld", "n": None, "_row_number": 1, "_row_error": None},
        {"id": 9, "prompt": "中文", "n": 5, "_row_number": 2, "_row_error": None},
    ]


def test_csv_with_schema_casts_and_fills_missing_columns(tmp_path):
    f = touch(tmp_path / "a.csv", "prompt,n\nhello,3\n")
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("n", pa.float64())])
    (table,) = list(iter_shard(str(f), "csv", schema))
    assert table.schema.field("n").type == pa.float64()
    assert table.to_pylist() == [{"id": None, "prompt": "hello", "n": 3.0, "_row_number": 0, "_row_error": None}]


def test_parquet_rows_are_numbered(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y", "z"], "k": [1, None, 3]}), f)
    rows = read_all(f, "parquet")
    assert [(r["prompt"], r["k"], r["_row_number"], r["_row_error"]) for r in rows] == [
        ("x", 1, 0, None), ("y", None, 1, None), ("z", 3, 2, None)]


def test_parquet_with_schema_conforms(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"k": pa.array([1, 2], pa.int32()), "prompt": ["x", "y"]}), f)
    schema = pa.schema([("prompt", pa.string()), ("k", pa.int64()), ("extra", pa.string())])
    (table,) = list(iter_shard(str(f), "parquet", schema))
    assert table.column_names == ["prompt", "k", "extra", "_row_number", "_row_error"]
    assert table.schema.field("k").type == pa.int64()
    assert table.column("extra").null_count == 2


def test_parquet_chunks_continue_row_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "READ_CHUNK_ROWS", 2)
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": [str(i) for i in range(5)]}), f)
    numbers = [n for t in iter_shard(str(f), "parquet") for n in t.column("_row_number").to_pylist()]
    assert numbers == [0, 1, 2, 3, 4]


# ---- scan_shard and unify_input_schema -----------------------------------------------------------

def test_scan_shard_counts_jsonl_rows_including_error_rows(tmp_path):
    f = touch(tmp_path / "a.jsonl", '{"prompt": "a", "n": 1}\n\nbroken\n{"prompt": "c", "n": 2.5}\n')
    scan = scan_shard(str(f), "jsonl")
    assert scan.error is None
    assert scan.rows == 3
    assert scan.uri == str(f)
    schema = schema_of(scan)
    assert schema.names == ["prompt", "n"]
    assert schema.field("n").type == pa.float64()


def test_scan_shard_counts_csv_rows(tmp_path):
    f = touch(tmp_path / "a.csv", "prompt\na\nb\nc\n")
    scan = scan_shard(str(f), "csv")
    assert (scan.rows, scan.error) == (3, None)
    assert schema_of(scan).names == ["prompt"]


def test_scan_shard_reads_parquet_footer(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["x"] * 7, "k": list(range(7))}), f)
    scan = scan_shard(str(f), "parquet")
    assert (scan.rows, scan.error) == (7, None)
    assert schema_of(scan) == pa.schema([("prompt", pa.string()), ("k", pa.int64())])


def test_scan_shard_of_empty_jsonl_has_no_rows_and_empty_schema(tmp_path):
    f = touch(tmp_path / "a.jsonl", "\n\n")
    scan = scan_shard(str(f), "jsonl")
    assert (scan.rows, scan.error) == (0, None)
    assert schema_of(scan).names == []


def test_scan_shard_reports_unreadable_shard_instead_of_raising(tmp_path):
    f = touch(tmp_path / "a.parquet", "this is not parquet")
    scan = scan_shard(str(f), "parquet")
    assert scan.rows == 0
    assert scan.schema == b""
    assert scan.error and scan.error.startswith("ArrowInvalid: ")


def test_unify_input_schema_makes_all_null_columns_strings():
    s1 = pa.schema([("prompt", pa.string()), ("note", pa.null())])
    s2 = pa.schema([("prompt", pa.string()), ("score", pa.int64())])
    scans = [ShardScan("a", 1, s1.serialize().to_pybytes()), ShardScan("b", 1, s2.serialize().to_pybytes())]
    unified = unify_input_schema(scans)
    assert unified == pa.schema([("prompt", pa.string()), ("note", pa.string()), ("score", pa.int64())])


def test_unify_input_schema_promotes_compatible_types_and_ignores_empty_scans():
    s1 = pa.schema([("n", pa.int64())])
    s2 = pa.schema([("n", pa.float64())])
    scans = [ShardScan("a", 1, s1.serialize().to_pybytes()), ShardScan("b", 0, b""),
             ShardScan("c", 1, s2.serialize().to_pybytes())]
    assert unify_input_schema(scans) == pa.schema([("n", pa.float64())])


def test_unify_input_schema_incompatible_types_is_a_user_error():
    s1 = pa.schema([("prompt", pa.string())])
    s2 = pa.schema([("prompt", pa.list_(pa.int64()))])
    scans = [ShardScan("a", 1, s1.serialize().to_pybytes()), ShardScan("b", 1, s2.serialize().to_pybytes())]
    with pytest.raises(UserError, match="column 'prompt' is string in a but list<item: int64> in b"):
        unify_input_schema(scans)


def test_unify_input_schema_from_real_jsonl_scans_with_null_column(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "id": None}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "y", "id": None}])
    unified = unify_input_schema([scan_shard(str(a), "jsonl"), scan_shard(str(b), "jsonl")])
    assert unified == pa.schema([("prompt", pa.string()), ("id", pa.string())])


# ---- plan_shard_tasks ----------------------------------------------------------------------------

def _files(*names):
    return [InputFile(f"/d/{n}", n, 10, "jsonl") for n in names]


def test_plan_without_limit_takes_every_non_empty_shard_whole_as_scanned():
    files = _files("a.jsonl", "b.jsonl", "c.jsonl")
    tasks = plan_shard_tasks(files, {"/d/a.jsonl": 3, "/d/b.jsonl": 0, "/d/c.jsonl": 5}, None)
    assert tasks == [ShardTask("/d/a.jsonl", "a.jsonl", "jsonl", 3),
                     ShardTask("/d/c.jsonl", "c.jsonl", "jsonl", 5)]


def test_plan_with_limit_takes_rows_from_shards_in_path_order():
    files = _files("a.jsonl", "b.jsonl", "c.jsonl")
    rows = {"/d/a.jsonl": 3, "/d/b.jsonl": 4, "/d/c.jsonl": 5}
    tasks = plan_shard_tasks(files, rows, 5)
    assert [(t.relpath, t.take) for t in tasks] == [("a.jsonl", 3), ("b.jsonl", 2)]
    assert sum(t.take for t in tasks) == 5


def test_plan_with_limit_skips_empty_shards_and_stops_at_the_limit():
    files = _files("a.jsonl", "b.jsonl", "c.jsonl")
    rows = {"/d/a.jsonl": 0, "/d/b.jsonl": 2, "/d/c.jsonl": 5}
    assert [(t.relpath, t.take) for t in plan_shard_tasks(files, rows, 2)] == [("b.jsonl", 2)]


def test_plan_with_limit_larger_than_input_takes_everything():
    files = _files("a.jsonl", "b.jsonl")
    tasks = plan_shard_tasks(files, {"/d/a.jsonl": 3, "/d/b.jsonl": 4}, 100)
    assert [(t.relpath, t.take) for t in tasks] == [("a.jsonl", 3), ("b.jsonl", 4)]


def test_plan_of_all_empty_shards_is_empty():
    assert plan_shard_tasks(_files("a.jsonl"), {"/d/a.jsonl": 0}, None) == []


def test_shard_task_rows_are_plain_dicts():
    rows = shard_task_rows([ShardTask("/d/a", "a", "csv", 2)])
    assert rows == [{"uri": "/d/a", "relpath": "a", "format": "csv", "take": 2, "duplicates": "{}", "start": 0,
                     "seek_row": 0, "seek_line": 0, "seek_byte": 0}]


# ---- conform -------------------------------------------------------------------------------------

def test_conform_reorders_casts_and_fills_missing_columns_with_nulls():
    table = pa.table({"b": pa.array([1, 2], pa.int32()), "a": ["x", "y"], "dropped": [0, 0]})
    schema = pa.schema([("a", pa.string()), ("b", pa.int64()), ("c", pa.string())])
    out = conform(table, schema)
    assert out.schema == schema
    assert out.to_pylist() == [{"a": "x", "b": 1, "c": None}, {"a": "y", "b": 2, "c": None}]


# ---- ReadShards ----------------------------------------------------------------------------------

def _batch(*tasks):
    return {
        "uri": [t[0] for t in tasks],
        "relpath": [t[1] for t in tasks],
        "format": [t[2] for t in tasks],
        "take": [t[3] for t in tasks],
    }


def _run(stage: ReadShards, batch: dict) -> pa.Table:
    tables = list(stage(batch))
    assert all(isinstance(t, pa.Table) for t in tables)
    return pa.concat_tables(tables)


def test_read_shards_ids_are_relpath_and_row_number(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "n": 1}, {"prompt": "y", "n": 2}])
    schema = pa.schema([("prompt", pa.string()), ("n", pa.int64())])
    stage = ReadShards(schema.serialize().to_pybytes(), None)
    out = _run(stage, _batch((str(a), "sub/a.jsonl", "jsonl", None)))
    assert out.column_names == ["id", "_input", "_row_error"]
    assert out.schema.field("id").type == pa.string()
    assert out.schema.field("_input").type == pa.struct([("prompt", pa.string()), ("n", pa.int64())])
    assert out.to_pylist() == [
        {"id": "sub/a.jsonl#0", "_input": {"prompt": "x", "n": 1}, "_row_error": None},
        {"id": "sub/a.jsonl#1", "_input": {"prompt": "y", "n": 2}, "_row_error": None},
    ]


def test_read_shards_uses_id_column_and_flags_null_ids(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"key": 10, "prompt": "x"}, {"key": None, "prompt": "y"},
                                           {"key": 12, "prompt": "z"}])
    schema = pa.schema([("key", pa.int64()), ("prompt", pa.string())])
    stage = ReadShards(schema.serialize().to_pybytes(), "key")
    out = _run(stage, _batch((str(a), "a.jsonl", "jsonl", None)))
    assert out.column("id").to_pylist() == ["10", "a.jsonl#1", "12"]
    assert out.column("_row_error").to_pylist() == [None, "id column 'key' is null", None]
    assert out.column("_input").to_pylist()[1] == {"key": None, "prompt": "y"}


def test_read_shards_keeps_parse_error_over_null_id_error(tmp_path):
    a = touch(tmp_path / "a.jsonl", '{"key": "k0", "prompt": "x"}\nbroken\n')
    schema = pa.schema([("key", pa.string()), ("prompt", pa.string())])
    out = _run(ReadShards(schema.serialize().to_pybytes(), "key"), _batch((str(a), "a.jsonl", "jsonl", None)))
    assert out.column("id").to_pylist() == ["k0", "a.jsonl#1"]
    errors = out.column("_row_error").to_pylist()
    assert errors[0] is None
    assert errors[1].startswith("input line 2: not a JSON object")


def test_read_shards_honours_take_across_several_shards_and_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(4)])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": [f"b{i}" for i in range(3)]}), b)
    c = touch(tmp_path / "c.csv", "prompt\nc0\nc1\n")
    schema = pa.schema([("prompt", pa.string())])
    stage = ReadShards(schema.serialize().to_pybytes(), None)
    out = _run(stage, _batch((str(a), "a.jsonl", "jsonl", 2), (str(b), "b.parquet", "parquet", None),
                             (str(c), "c.csv", "csv", float("nan"))))
    assert out.column("id").to_pylist() == ["a.jsonl#0", "a.jsonl#1", "b.parquet#0", "b.parquet#1",
                                            "b.parquet#2", "c.csv#0", "c.csv#1"]
    assert [r["prompt"] for r in out.column("_input").to_pylist()] == ["a0", "a1", "b0", "b1", "b2", "c0", "c1"]


def test_read_shards_take_spanning_chunks_stops_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "READ_CHUNK_ROWS", 2)
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": str(i)} for i in range(7)])
    schema = pa.schema([("prompt", pa.string())])
    out = _run(ReadShards(schema.serialize().to_pybytes(), None), _batch((str(a), "a.jsonl", "jsonl", 3)))
    assert out.column("id").to_pylist() == ["a.jsonl#0", "a.jsonl#1", "a.jsonl#2"]


def test_read_shards_input_struct_holds_all_schema_columns_even_if_shard_lacks_them(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}])
    schema = pa.schema([("prompt", pa.string()), ("context", pa.string())])
    out = _run(ReadShards(schema.serialize().to_pybytes(), None), _batch((str(a), "a.jsonl", "jsonl", None)))
    assert out.column("_input").to_pylist() == [{"prompt": "x", "context": None}]


def test_read_shards_non_ascii_text_survives(tmp_path):
    texts = ["用一句话解释量子纠缠。", "emoji 😀🚀", "ما هي عاصمة فرنسا؟"]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": t} for t in texts])
    schema = pa.schema([("prompt", pa.string())])
    out = _run(ReadShards(schema.serialize().to_pybytes(), None), _batch((str(a), "a.jsonl", "jsonl", None)))
    assert [r["prompt"] for r in out.column("_input").to_pylist()] == texts


def test_listing_then_reading_gives_ids_relative_to_the_input_root(tmp_path):
    write_jsonl(tmp_path / "in" / "sub" / "p.jsonl", [{"prompt": "x"}])
    files = list_input_files(str(tmp_path / "in"))
    scans = [scan_shard(f.uri, f.format) for f in files]
    schema = unify_input_schema(scans)
    tasks = plan_shard_tasks(files, {s.uri: s.rows for s in scans}, None)
    stage = ReadShards(schema.serialize().to_pybytes(), None)
    rows = shard_task_rows(tasks)
    out = _run(stage, {k: [r[k] for r in rows] for k in ("uri", "relpath", "format", "take")})
    assert out.column("id").to_pylist() == ["sub/p.jsonl#0"]
    assert os.path.isabs(files[0].uri)


def test_repeated_ids_across_shards_are_marked_after_their_first_occurrence(tmp_path):
    """The first row with an id (in path, then row order) is kept; later rows with it become error rows
    naming where it was first seen; null ids are not duplicates of each other; take limits what is looked at."""
    from llmbatch.pipelines.read import id_hashes, mark_duplicate_ids

    a = write_jsonl(tmp_path / "a.jsonl", [{"key": "k1", "prompt": "x"}, {"key": None, "prompt": "y"},
                                           {"key": "k1", "prompt": "z"}, {"key": None, "prompt": "w"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"key": "k2", "prompt": "p"}, {"key": "k1", "prompt": "q"},
                                           {"key": "k2", "prompt": "r"}])
    schema = pa.schema([("key", pa.string()), ("prompt", pa.string())])
    tasks = [ShardTask(str(a), "a.jsonl", "jsonl", None), ShardTask(str(b), "b.jsonl", "jsonl", 2)]
    hashes = [id_hashes(t, schema, "key") for t in tasks]
    assert [len(h) for h in hashes] == [4, 2]
    marked, count = mark_duplicate_ids(tasks, hashes)
    assert count == 2
    assert json.loads(marked[0].duplicates) == {"2": "a.jsonl row 0"}
    assert json.loads(marked[1].duplicates) == {"1": "a.jsonl row 0"}
    stage = ReadShards(schema.serialize().to_pybytes(), "key")
    rows = shard_task_rows(marked)
    out = _run(stage, {k: [r[k] for r in rows] for k in rows[0]})
    assert out.column("id").to_pylist() == ["k1", "a.jsonl#1", "k1", "a.jsonl#3", "k2", "k1"]
    assert out.column("_row_error").to_pylist() == [
        None, "id column 'key' is null", "duplicate id 'k1' at a.jsonl row 2 (first at a.jsonl row 0)",
        "id column 'key' is null", None, "duplicate id 'k1' at b.jsonl row 1 (first at a.jsonl row 0)"]
    assert mark_duplicate_ids([], []) == ([], 0)


def test_shards_whose_column_types_cannot_combine_are_named():
    def scan(uri, schema):
        return ShardScan(uri, 1, schema.serialize().to_pybytes())

    a = scan("s3://b/a.parquet", pa.schema([("prompt", pa.string()), ("n", pa.int64())]))
    b = scan("s3://b/b.parquet", pa.schema([("prompt", pa.string()), ("n", pa.float64())]))
    c = scan("s3://b/c.parquet", pa.schema([("prompt", pa.string()), ("n", pa.list_(pa.int64()))]))
    assert unify_input_schema([a, b]).field("n").type == pa.float64()
    with pytest.raises(UserError) as info:
        unify_input_schema([a, b, c])
    assert str(info.value) == ("input.path: column 'n' is int64 in s3://b/a.parquet but list<item: int64> in "
                               "s3://b/c.parquet; make the shards agree (or cast the column when writing them)")


def test_large_shards_split_into_row_ranges_that_read_exactly_their_rows(tmp_path, monkeypatch):
    """jsonl ranges start from the nearest seek point the scan recorded, parquet ranges are whole row groups;
    each range yields exactly its rows with their shard row numbers; csv shards stay whole."""
    from llmbatch.pipelines.read import split_tasks

    monkeypatch.setattr(read, "SEEK_EVERY", 4)
    lines = [json.dumps({"k": f"k{i}", "prompt": f"p{i}"}) for i in range(23)]
    lines.insert(5, "")            # a blank line: line numbers and row numbers part ways
    lines[9] = "broken"            # row 8 (line 10, k8's) does not parse
    j = touch(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"k": [f"b{i}" for i in range(10)], "prompt": ["x"] * 10}), p, row_group_size=3)
    c = touch(tmp_path / "c.csv", "k,prompt\n" + "".join(f"c{i},y\n" for i in range(10)))
    scans = {str(f): scan_shard(str(f), fmt) for f, fmt in ((j, "jsonl"), (p, "parquet"), (c, "csv"))}
    assert scans[str(j)].rows == 23 and [sp.row for sp in scans[str(j)].seek_points] == [0, 4, 8, 12, 16, 20]
    tasks = [ShardTask(str(j), "a.jsonl", "jsonl", None, json.dumps({"9": "a.jsonl row 1"})),
             ShardTask(str(p), "b.parquet", "parquet", 8), ShardTask(str(c), "c.csv", "csv", None)]
    assert scans[str(p)].row_groups == (3, 3, 3, 1)
    ranges = split_tasks(tasks, 5, scans)
    assert [(t.relpath, t.start, t.take, t.seek_row) for t in ranges] == [
        ("a.jsonl", 0, 5, 0), ("a.jsonl", 5, 5, 4), ("a.jsonl", 10, 5, 8), ("a.jsonl", 15, 5, 12),
        ("a.jsonl", 20, 3, 20), ("b.parquet", 0, 6, 0), ("b.parquet", 6, 2, 0), ("c.csv", 0, None, 0)]
    assert json.loads(ranges[1].duplicates) == {"9": "a.jsonl row 1"} and ranges[0].duplicates == "{}"
    schema = pa.schema([("k", pa.string()), ("prompt", pa.string())])
    stage = ReadShards(schema.serialize().to_pybytes(), "k")
    rows = shard_task_rows(ranges)
    out = pa.concat_tables(list(stage({key: [r[key] for r in rows] for key in rows[0]}))).to_pylist()
    ids = [r["id"] for r in out]
    assert ids == [f"k{i}" for i in range(8)] + ["a.jsonl#8"] + [f"k{i}" for i in range(9, 23)] + \
        [f"b{i}" for i in range(8)] + [f"c{i}" for i in range(10)]
    errors = {r["id"]: r["_row_error"] for r in out if r["_row_error"]}
    assert errors["a.jsonl#8"].startswith("input line 10: not a JSON object")
    assert errors["k9"] == "duplicate id 'k9' at a.jsonl row 9 (first at a.jsonl row 1)"


def test_a_value_of_the_wrong_type_is_a_row_error_not_an_unreadable_shard(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "ok", "n": 1}, {"prompt": 42, "n": 2},
                                           {"prompt": ["a"], "n": "three"}, {"prompt": None, "n": 4}])
    scan = scan_shard(str(f), "jsonl")
    assert scan.error is None and scan.rows == 4
    assert schema_of(scan) == pa.schema([("prompt", pa.string()), ("n", pa.int64())])
    rows = read_all(f, "jsonl", schema_of(scan))
    assert [r["prompt"] for r in rows] == ["ok", None, None, None]
    assert [r["_row_error"] for r in rows] == [None, "column 'prompt' holds int, expected text",
                                               "column 'prompt' holds list, expected text", None]
    assert rows[2]["n"] is None


def test_a_jsonl_range_is_not_parsed_past_its_end(tmp_path, monkeypatch):
    from llmbatch.pipelines.read import SeekPoint

    monkeypatch.setattr(read, "SEEK_EVERY", 8)
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}"} for i in range(50)])
    points: list = []
    list(iter_shard(str(f), "jsonl", seek_points=points))
    assert points[0] == SeekPoint(0, 0, 0) and [p.row for p in points] == [0, 8, 16, 24, 32, 40, 48]
    rows = [r for t in iter_shard(str(f), "jsonl", start=18, stop=21, seek=points[2]) for r in t.to_pylist()]
    assert [r["_row_number"] for r in rows] == [16, 17, 18, 19, 20]
    assert rows[-1]["prompt"] == "p20"


def test_an_explicit_id_spelled_like_a_null_ids_place_is_a_repeat_not_a_second_row_with_that_key(tmp_path):
    """A null id is spelled by its place (a.jsonl#1); a later row whose id is that text would share its output id
    and its resume key, so it is marked as a repeat and keyed by its own place."""
    from llmbatch.pipelines.read import id_hashes, mark_duplicate_ids

    f = write_jsonl(tmp_path / "a.jsonl", [{"qid": "x", "prompt": "p"}, {"qid": None, "prompt": "q"},
                                           {"qid": "a.jsonl#1", "prompt": "r"}])
    schema = pa.schema([("qid", pa.string()), ("prompt", pa.string())])
    tasks, count = mark_duplicate_ids([ShardTask(str(f), "a.jsonl", "jsonl", None)],
                                      [id_hashes(ShardTask(str(f), "a.jsonl", "jsonl", None), schema, "qid")])
    assert count == 1
    rows = shard_task_rows(tasks)
    out = _run(ReadShards(schema.serialize().to_pybytes(), "qid"), {k: [r[k] for r in rows] for k in rows[0]})
    assert out.column("_row_error").to_pylist() == [
        None, "id column 'qid' is null", "duplicate id 'a.jsonl#1' at a.jsonl row 2 (first at a.jsonl row 1)"]
    keys = row_key_hashes(out.column("id").to_pylist(), out.column("_row_error").to_pylist())
    assert len(np.unique(keys)) == 3 and keys.dtype.itemsize == 16


def test_a_repeated_id_is_named_first_even_when_the_row_has_another_error(tmp_path):
    from llmbatch.pipelines.read import id_hashes, mark_duplicate_ids

    f = write_jsonl(tmp_path / "a.jsonl", [{"qid": "a", "prompt": "x"}, {"qid": "b", "prompt": "y"},
                                           {"qid": "a", "prompt": 5}])
    schema = schema_of(scan_shard(str(f), "jsonl"))
    assert schema.field("prompt").type == pa.string()
    tasks, count = mark_duplicate_ids([ShardTask(str(f), "a.jsonl", "jsonl", None)],
                                      [id_hashes(ShardTask(str(f), "a.jsonl", "jsonl", None), schema, "qid")])
    rows = shard_task_rows(tasks)
    out = _run(ReadShards(schema.serialize().to_pybytes(), "qid"), {k: [r[k] for r in rows] for k in rows[0]})
    assert out.column("_row_error").to_pylist()[2] == \
        "duplicate id 'a' at a.jsonl row 2 (first at a.jsonl row 0); column 'prompt' holds int, expected text"


def test_column_types_follow_most_values_and_clashing_chunks_become_text(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": 5}] + [{"prompt": f"p{i}"} for i in range(4)])
    assert schema_of(scan_shard(str(f), "jsonl")).field("prompt").type == pa.string()
    monkeypatch.setattr(read, "READ_CHUNK_ROWS", 2)
    g = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": 1}, {"prompt": 2}])
    scan = scan_shard(str(g), "jsonl")
    assert scan.error is None and schema_of(scan).field("prompt").type == pa.string()
    errors = [r["_row_error"] for r in read_all(g, "jsonl", schema_of(scan))]
    assert errors == [None, None, "column 'prompt' holds int, expected text", "column 'prompt' holds int, expected text"]


def test_read_tasks_are_a_batch_each_until_there_would_be_too_many():
    from llmbatch.pipelines.read import MAX_READ_TASKS, read_task_rows

    assert read_task_rows(12, 16) == 16
    assert read_task_rows(MAX_READ_TASKS * 32, 32) == 32
    one_million = read_task_rows(1_000_000, 32)
    assert one_million > 32 and -(-1_000_000 // one_million) <= MAX_READ_TASKS
