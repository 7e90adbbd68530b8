"""The run folder's files: atomic writes, and one read-back pass feeding the tally, error rows and summary."""
from __future__ import annotations

import json
from contextlib import ExitStack

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmbatch.pipelines.run_files import part_name
from llmbatch.errors import UserError
from llmbatch.pipelines.error_rows import ErrorRowsWriter
from llmbatch.pipelines.manifest import OutputTally
from llmbatch.pipelines.readback import has_values, read_back
from llmbatch.pipelines.run_files import ATTEMPT_NAME, ERRORS_DIR, ERRORS_FILE, STAGING_DIR, RunFolder
from llmbatch.pipelines.run_summary import ScoreStats
from llmbatch.pipelines.scorer_specs import ExactMatchScorer


def test_a_json_file_is_written_whole_and_read_back(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    assert folder.read_json(ATTEMPT_NAME) is None
    folder.write_json(ATTEMPT_NAME, {"spec": {"name": "ü"}})
    assert folder.read_json(ATTEMPT_NAME) == {"spec": {"name": "ü"}}
    assert [p.name for p in (tmp_path / "run").iterdir()] == [ATTEMPT_NAME]  # no temporary file left


def test_a_streamed_file_that_fails_halfway_leaves_nothing(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    with pytest.raises(RuntimeError):
        with folder.writing(ERRORS_DIR, ERRORS_FILE) as out:
            out.write(b"half a line")
            raise RuntimeError("the reader died")
    assert not list((tmp_path / "run" / ERRORS_DIR).iterdir())
    with folder.writing(ERRORS_DIR, ERRORS_FILE) as out:
        out.write(b"{}\n")
    assert (tmp_path / "run" / ERRORS_DIR / ERRORS_FILE).read_bytes() == b"{}\n"

A, B = part_name(1, "a", 0), part_name(1, "b", 0)


def _part(path, ids, errors, scores=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"id": ids, "error": pa.array(errors, pa.string()), "num_input_tokens": [3] * len(ids),
               "num_generated_tokens": [2] * len(ids), "finish_reason": ["stop"] * len(ids)}
    if scores is not None:
        columns["score_ok"] = pa.array(scores, pa.bool_())
    pq.write_table(pa.table(columns), path)


def test_one_pass_feeds_the_tally_the_error_rows_and_the_summary(tmp_path):
    run = tmp_path / "run"
    _part(run / A, ["a", "b"], [None, "prompt is empty"], [True, None])
    _part(run / B, ["c"], [None], [False])
    _part(run / STAGING_DIR / "pass-1" / A, ["x"], ["not part of the output"], [True])
    tally, errors = OutputTally(), ErrorRowsWriter(str(run))
    stats = ScoreStats([ExactMatchScorer(name="ok", kind="exact_match", reference_column="answer")])
    files = read_back(str(run), [tally, errors, stats])
    assert files == [A, B]
    assert (tally.rows, tally.ok, tally.errors, tally.distinct_ids, tally.generated_tokens) == (3, 2, 1, 3, 6)
    assert errors.result() == {"path": "errors/errors.jsonl", "rows": 1,
                               "kinds": [{"kind": "prompt is empty", "rows": 1}]}
    lines = (run / ERRORS_DIR / ERRORS_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["b"]
    assert stats.scores["ok"].figures()["pass_rate"] == 0.5
    assert stats.finish_reasons == {"stop": 3} and stats.other_errors == 1


def test_parts_without_errors_are_skipped_by_the_error_writer_and_no_file_is_written(tmp_path):
    run = tmp_path / "run"
    _part(run / A, ["a"], [None])
    assert not has_values(pq.ParquetFile(run / A), "error")
    errors = ErrorRowsWriter(str(run))
    read_back(str(run), [errors])
    assert errors.result() is None and not (run / ERRORS_DIR).exists()


def test_a_failed_read_back_leaves_no_half_written_error_file(tmp_path):
    run = tmp_path / "run"
    _part(run / A, ["a"], ["boom"])

    class Broken:
        def finish(self, stack: ExitStack) -> None:
            pass

        def columns(self, part):
            return ["id"]

        def batch(self, batch):
            pass

        def part_done(self, number):
            raise OSError("disk gone")

    with pytest.raises(UserError, match="cannot read back output .*: disk gone"):
        read_back(str(run), [ErrorRowsWriter(str(run)), Broken()])
    assert not (run / ERRORS_DIR / ERRORS_FILE).exists()
