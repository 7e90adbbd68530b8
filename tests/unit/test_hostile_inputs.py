"""Hostile and messy input files: each odd row becomes a row error, each odd file is read or refused with a
reason; none kills a shard or is skipped in silence (README, "Bad input: what each gets")."""
from __future__ import annotations

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import llmbatch.pipelines.read as read
from llmbatch.pipelines.read import (ReadShards, id_hashes, iter_shard, list_input_files,
                                     mark_duplicate_ids, plan_shard_tasks, scan_shard, shard_task_rows, split_tasks,
                                     unify_input_schema)

LINES = [{"qid": f"q{i}", "prompt": f"p{i}"} for i in range(4)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def rows_of(path, fmt: str, schema=None) -> list[dict]:
    return [r for t in iter_shard(str(path), fmt, schema) for r in t.to_pylist()]


def schema_of(path, fmt: str) -> pa.Schema:
    scan = scan_shard(str(path), fmt)
    assert scan.error is None, scan.error
    return pa.ipc.read_schema(pa.py_buffer(scan.schema)) if scan.schema else pa.schema([])


def read_stage(tasks, schema, id_column=None) -> list[dict]:
    rows = shard_task_rows(tasks)
    stage = ReadShards(schema.serialize().to_pybytes(), id_column)
    return [r for t in stage({k: [r[k] for r in rows] for k in rows[0]}) for r in t.to_pylist()]


def test_a_deeply_nested_line_is_a_row_error_and_the_shard_goes_on(tmp_path):
    deep, deeper = {"prompt": "x"}, "1"
    for _ in range(40):
        deep = {"a": deep}
    for _ in range(5000):
        deeper = "[" + deeper + "]"
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl([LINES[0]]) + json.dumps({"prompt": "p", "x": deep}).encode() + b"\n"
                  + b'{"prompt": "p", "x": ' + deeper.encode() + b"}\n" + jsonl([LINES[1]]))
    rows = rows_of(f, "jsonl")
    assert [r["_row_error"] for r in rows] == [None, "input line 2: nested deeper than 32 levels",
                                               "input line 3: nested deeper than 32 levels", None]
    assert rows[3]["prompt"] == "p1"


def test_a_line_longer_than_the_cap_is_a_row_error_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "MAX_LINE_BYTES", 1 << 20)
    monkeypatch.setattr(read, "SEEK_EVERY", 2)
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl(LINES[:2]) + b'{"prompt": "' + b"x" * (3 << 20) + b'"}\n' + jsonl(LINES[2:]))
    rows = rows_of(f, "jsonl")
    assert [r["_row_error"] for r in rows] == [None, None, "input line 3: longer than 1 MiB, not read", None, None]
    assert [r["prompt"] for r in rows] == ["p0", "p1", None, "p2", "p3"]
    points: list = []
    list(iter_shard(str(f), "jsonl", seek_points=points))
    resumed = [r for t in iter_shard(str(f), "jsonl", start=4, seek=points[2]) for r in t.to_pylist()]
    assert [(r["_row_number"], r["prompt"]) for r in resumed] == [(4, "p3")]


@pytest.mark.parametrize("name, pack", [("a.jsonl.gz", gzip.compress), ("a.jsonl.bz2", bz2.compress),
                                        ("a.jsonl.zst", None)])
def test_compressed_jsonl_shards_are_listed_and_read(tmp_path, name, pack):
    data = jsonl(LINES)
    if pack is None:
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        packed = sink.getvalue().to_pybytes()
    else:
        packed = pack(data)
    (tmp_path / name).write_bytes(packed)
    (only,) = list_input_files(str(tmp_path))
    assert only.format == "jsonl" and only.relpath == name
    assert [r["prompt"] for r in rows_of(only.uri, "jsonl")] == ["p0", "p1", "p2", "p3"]
    scan = scan_shard(only.uri, "jsonl")
    (task,) = split_tasks(plan_shard_tasks([only], {only.uri: 4}, None), 1, {only.uri: scan})
    assert (task.start, task.take) == (0, 4)  # read whole: no seeking inside a compressed stream


def test_a_compressed_csv_is_read_and_a_compressed_parquet_is_refused_with_the_reason(tmp_path):
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(b"qid,prompt\nq0,p0\nq1,p1\n"))
    assert [r["prompt"] for r in rows_of(tmp_path / "a.csv.gz", "csv")] == ["p0", "p1"]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": ["x"]}), sink)
    (tmp_path / "b.parquet.gz").write_bytes(gzip.compress(sink.getvalue().to_pybytes()))
    scan = scan_shard(str(tmp_path / "b.parquet.gz"), "parquet")
    assert "a parquet file compressed as a whole cannot be read" in scan.error


def test_a_json_file_holding_an_array_is_read_element_by_element(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("\ufeff  " + json.dumps([LINES[0], "not an object", LINES[1]]), encoding="utf-8")
    rows = rows_of(f, "jsonl")
    assert [r["prompt"] for r in rows] == ["p0", None, "p1"]
    assert rows[1]["_row_error"] == "input item 1: not a JSON object (expected a JSON object, got str)"
    scan = scan_shard(str(f), "jsonl")
    assert scan.rows == 3 and scan.seek_points == ()
    (file,) = list_input_files(str(f))
    assert len(split_tasks(plan_shard_tasks([file], {file.uri: 3}, None), 1, {file.uri: scan})) == 1
    (tmp_path / "b.json").write_text('[{"prompt": "x"}, ')
    assert "not JSON Lines, and not one JSON array either" in scan_shard(str(tmp_path / "b.json"), "jsonl").error


def test_a_byte_order_mark_and_crlf_line_ends_read_as_plain_text(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(LINES[:2]).replace(b"\n", b"\r\n"))
    assert [(r["qid"], r["prompt"], r["_row_error"]) for r in rows_of(tmp_path / "a.jsonl", "jsonl")] == [
        ("q0", "p0", None), ("q1", "p1", None)]
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbfqid,prompt\r\nq0,p0\r\nq1,p1\r\n")
    schema = schema_of(tmp_path / "a.csv", "csv")
    assert schema.names == ["qid", "prompt"]
    assert [(r["qid"], r["prompt"]) for r in rows_of(tmp_path / "a.csv", "csv", schema)] == [("q0", "p0"), ("q1", "p1")]


def test_nan_and_infinity_are_numbers_so_as_a_prompt_they_are_a_row_error(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"prompt": "p0", "w": NaN}\n{"prompt": NaN, "w": 1.0}\n{"prompt": "p2", "w": Infinity}\n')
    schema = schema_of(f, "jsonl")
    assert schema.field("prompt").type == pa.string()
    rows = rows_of(f, "jsonl", schema)
    assert [r["_row_error"] for r in rows] == [None, "column 'prompt' holds float, expected text", None]
    assert rows[2]["w"] == float("inf")


def test_zero_byte_shards_are_empty_not_corrupt(tmp_path):
    for name, fmt in (("a.parquet", "parquet"), ("b.jsonl", "jsonl"), ("c.csv", "csv")):
        (tmp_path / name).write_bytes(b"")
        scan = scan_shard(str(tmp_path / name), fmt)
        assert (scan.rows, scan.error) == (0, None)
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "d.parquet")
    files = list_input_files(str(tmp_path))
    scans = [scan_shard(f.uri, f.format) for f in files]
    assert unify_input_schema(scans).names == ["prompt"]
    assert [t.relpath for t in plan_shard_tasks(files, {s.uri: s.rows for s in scans}, None)] == ["d.parquet"]


def test_rows_appended_to_a_file_after_its_scan_are_not_read(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl(LINES[:2]))
    (file,) = list_input_files(str(f))
    scan = scan_shard(file.uri, "jsonl")
    tasks = plan_shard_tasks([file], {file.uri: scan.rows}, None)
    with open(f, "ab") as handle:
        handle.write(jsonl(LINES[2:]))
    assert [r["id"] for r in read_stage(tasks, schema_of(f, "jsonl"))] == ["a.jsonl#0", "a.jsonl#1"]
    (again,) = list_input_files(str(f))
    assert again.identity() != file.identity()


def test_ids_that_are_int64_in_one_parquet_shard_and_double_in_another_are_spelled_as_written(tmp_path):
    pq.write_table(pa.table({"qid": pa.array([1, 2 ** 60], pa.int64()), "prompt": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"qid": pa.array([1.5, 1.0]), "prompt": ["c", "d"]}), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"qid": 7, "prompt": "e"}, {"qid": "q8", "prompt": "f"}]))
    files = list_input_files(str(tmp_path))
    scans = [scan_shard(f.uri, f.format) for f in files]
    schema = unify_input_schema(scans, "qid")
    assert schema.field("qid").type == pa.string()
    tasks = plan_shard_tasks(files, {s.uri: s.rows for s in scans}, None)
    tasks, repeated = mark_duplicate_ids(tasks, [id_hashes(t, schema, "qid") for t in tasks])
    rows = read_stage(tasks, schema, "qid")
    assert [r["id"] for r in rows] == ["1", str(2 ** 60), "1.5", "1", "7", "q8"]
    assert repeated == 1 and rows[3]["_row_error"].startswith("duplicate id '1' at b.parquet row 1")
    same = [scan_shard(str(tmp_path / "a.parquet"), "parquet")]
    assert unify_input_schema(same, "qid").field("qid").type == pa.int64()


def test_a_value_that_does_not_fit_its_columns_job_wide_type_is_a_row_error(tmp_path):
    pq.write_table(pa.table({"n": pa.array([1, 2 ** 60], pa.int64()), "prompt": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"n": pa.array([0.5]), "prompt": ["c"]}), tmp_path / "b.parquet")
    scans = [scan_shard(str(tmp_path / n), "parquet") for n in ("a.parquet", "b.parquet")]
    schema = unify_input_schema(scans)
    rows = rows_of(tmp_path / "a.parquet", "parquet", schema)
    assert [r["n"] for r in rows] == [1.0, None]
    assert rows[1]["_row_error"] == (f"column 'n' holds {2 ** 60}, which does not fit a number (the type its "
                                     "other shards give it)")


def test_ragged_csv_rows_are_row_errors_after_the_shards_other_rows(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("qid,prompt\nq0,p0\nq1,p1,extra\nq2\nq3,p3\n")
    scan = scan_shard(str(f), "csv")
    assert (scan.rows, scan.error) == (4, None)
    rows = rows_of(f, "csv", schema_of(f, "csv"))
    assert [(r["qid"], r["_row_number"], r["_row_error"]) for r in rows] == [
        ("q0", 0, None), ("q3", 1, None), (None, 2, "csv row 'q1,p1,extra': 3 fields, the header has 2"),
        (None, 3, "csv row 'q2': 1 fields, the header has 2")]
