"""Resume bookkeeping: finished rows found in an attempt's parts, cut-short parts removed, rows skipped."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmbatch.pipelines.run_files import part_name
from llmbatch.pipelines.columns import KEY_DTYPE, is_done, row_key, row_key_hashes
from llmbatch.pipelines.read import ReadShards
from llmbatch.pipelines.resume import changed_settings, finished_work

A, B, C = (part_name(1, name, 0) for name in "abc")


def _part(path, ids, errors):
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "error": pa.array(errors, pa.string()),
                             "generated_text": pa.array(["x"] * len(ids), pa.string())}), path)


def test_finished_work_counts_written_rows_and_deletes_parts_cut_short(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _part(run / A, ["r0", "r1"], [None, "prompt is empty"])
    _part(run / B, ["k", "k"], [None, "duplicate id 'k' at a.jsonl row 5 (first at a.jsonl row 2)"])
    (run / C).write_bytes(b"PAR1 cut short")
    (run / "_staging").mkdir()
    _part(run / "_staging" / A, ["z"], [None])
    work = finished_work(str(run))
    assert work.rows == 4 and work.parts_kept == 2 and work.parts_removed == [C] and work.kept == [A, B]
    assert not (run / C).exists() and (run / "_staging" / A).exists()
    keys = row_key_hashes(["r1", "k", "k", "k", "r9"],
                          [None, None, "duplicate id 'k' at a.jsonl row 5 (first at a.jsonl row 2)",
                           "duplicate id 'k' at a.jsonl row 7 (first at a.jsonl row 2)", None])
    assert is_done(keys, work.done).tolist() == [True, True, True, False, False]
    assert is_done(keys, np.array([], dtype=KEY_DTYPE)).tolist() == [False] * 5
    assert finished_work(str(tmp_path / "none")).rows == 0
    assert row_key("x", "prompt is empty") == "x"


def test_read_stage_skips_rows_an_earlier_attempt_wrote(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)), encoding="utf-8")
    schema = pa.schema([("prompt", pa.string())])
    done = np.sort(row_key_hashes(["a.jsonl#1", "a.jsonl#3"], [None, "x"]))
    stage = ReadShards(schema.serialize().to_pybytes(), None, done)
    batch = {"uri": [str(data)], "relpath": ["a.jsonl"], "format": ["jsonl"], "take": [None], "duplicates": ["{}"]}
    out = pa.concat_tables(list(stage(batch)))
    assert out.column("id").to_pylist() == ["a.jsonl#0", "a.jsonl#2", "a.jsonl#4"]
    everything = np.sort(row_key_hashes([f"a.jsonl#{i}" for i in range(5)], [None] * 5))
    assert list(ReadShards(schema.serialize().to_pybytes(), None, everything)(batch)) == []


def test_only_settings_that_change_speed_may_change_on_resume():
    before = {"name": "a", "sampling": {"max_tokens": 64, "seed": 1}, "resources": {"replicas": 1},
              "input": {"path": "p", "limit": None}}
    now = {"name": "a", "sampling": {"max_tokens": 32, "seed": 1}, "resources": {"replicas": 4},
           "input": {"path": "p", "limit": 10}}
    assert changed_settings(before, now) == ["input.limit", "sampling.max_tokens"]
    assert changed_settings(before, {**before, "resources": {"replicas": "auto"}}) == []


def test_a_part_the_storage_cannot_read_is_never_taken_for_one_cut_short(tmp_path, monkeypatch):
    """Denied or throttled reads stop the resume with the storage's error; the part stays for the next one."""
    import fsspec
    import pytest

    from llmbatch.errors import UserError
    from llmbatch.pipelines import resume

    run = tmp_path / "run"
    run.mkdir()
    _part(run / A, ["r0"], [None])

    class Denied(fsspec.implementations.local.LocalFileSystem):
        def cat_file(self, path, *args, **kwargs):
            raise PermissionError(13, "Access Denied", path)

    monkeypatch.setattr(resume, "filesystem_for", lambda uri: (Denied(), uri))
    with pytest.raises(UserError, match="read the earlier attempt at"):
        resume.finished_work(str(run))
    assert (run / A).exists()
