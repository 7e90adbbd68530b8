"""How a run starts in its folder: every case of the decision, and what preparing the folder keeps."""
from __future__ import annotations

import json

import pytest
import structlog

from llmbatch.pipelines.run_files import part_name
from llmbatch.errors import UserError
from llmbatch.pipelines.run_files import MANIFEST_NAME
from llmbatch.pipelines.resume import write_attempt
from llmbatch.pipelines.run_folder import (
    AUTOMATIC_RESUME, FRESH, REPLACE, RESTART, RESUME, FolderState, RunStart, decide_start, prepare_run_folder,
    read_folder_state,
)

RUN = "out/job/r1"


def attempt(path="a.jsonl", size=10, tokens=8, replicas=1, version="v1"):
    return {"spec": {"name": "j", "sampling": {"max_tokens": tokens}, "resources": {"replicas": replicas}},
            "input_files": [[path, size, version]]}


def decide(state: FolderState, now=None, *, resume=False, overwrite=False) -> RunStart:
    return decide_start(state, now or attempt(), resume=resume, overwrite=overwrite, run_id="r1", run_uri=RUN)


EMPTY = FolderState(committed=False, earlier_attempt=None)
UNCOMMITTED = FolderState(committed=False, earlier_attempt=attempt())
COMMITTED = FolderState(committed=True, earlier_attempt=attempt())


def test_an_empty_folder_starts_fresh_with_or_without_overwrite():
    assert decide(EMPTY) == RunStart(FRESH)
    assert decide(EMPTY, overwrite=True) == RunStart(FRESH)


def test_a_plain_rerun_continues_an_uncommitted_attempt_of_the_same_job():
    assert decide(UNCOMMITTED) == RunStart(AUTOMATIC_RESUME)
    assert decide(UNCOMMITTED, attempt(replicas=4)) == RunStart(AUTOMATIC_RESUME)  # resources may change
    assert decide(UNCOMMITTED).resumes


@pytest.mark.parametrize("changed, named", [(dict(tokens=16), "sampling.max_tokens"), (dict(size=11), "input files"),
                                            (dict(path="b.jsonl"), "input files"), (dict(version="v2"), "input files")])
def test_a_plain_rerun_of_a_changed_job_starts_over_and_says_why(changed, named):
    start = decide(UNCOMMITTED, attempt(**changed))
    assert start == RunStart(RESTART, (named,))
    assert not start.resumes


def test_overwrite_of_an_uncommitted_attempt_starts_fresh():
    assert decide(UNCOMMITTED, overwrite=True) == RunStart(FRESH)


def test_resume_continues_the_same_job_and_refuses_anything_else():
    assert decide(UNCOMMITTED, resume=True) == RunStart(RESUME)
    with pytest.raises(UserError, match="no earlier attempt at out/job/r1"):
        decide(EMPTY, resume=True)
    with pytest.raises(UserError, match=r"the job changed since the earlier attempt \(sampling.max_tokens\)"):
        decide(UNCOMMITTED, attempt(tokens=16), resume=True)
    with pytest.raises(UserError, match=r"the input files changed since the earlier attempt \(a.jsonl was rewritten "
                                        r"\(size 10 -> 11\)\)"):
        decide(UNCOMMITTED, attempt(size=11), resume=True)
    with pytest.raises(UserError, match=r"\(a.jsonl was rewritten \(same size, modified since\)\)"):
        decide(UNCOMMITTED, attempt(version="v2"), resume=True)
    with pytest.raises(UserError, match=r"\(a.jsonl is gone; b.jsonl is new\)"):
        decide(UNCOMMITTED, attempt(path="b.jsonl"), resume=True)


def test_an_attempt_recorded_without_file_versions_is_compared_by_names_and_sizes():
    older = FolderState(committed=False, earlier_attempt={**attempt(), "input_files": [["a.jsonl", 10]]})
    assert decide(older, attempt(version="v9"), resume=True) == RunStart(RESUME)
    with pytest.raises(UserError, match="the input files changed"):
        decide(older, attempt(size=12), resume=True)


def test_a_committed_run_is_replaced_only_with_overwrite_and_never_resumed():
    assert decide(COMMITTED, overwrite=True) == RunStart(REPLACE)
    with pytest.raises(UserError, match="already holds a committed run; choose another --run-id"):
        decide(COMMITTED)
    with pytest.raises(UserError, match="already committed, so there is nothing to resume"):
        decide(COMMITTED, resume=True)


def test_the_folder_state_is_read_from_the_manifest_and_the_attempt(tmp_path):
    run = tmp_path / "run"
    assert read_folder_state(str(run)) == EMPTY
    write_attempt(str(run), attempt())
    assert read_folder_state(str(run)) == FolderState(False, attempt())
    (run / MANIFEST_NAME).write_text(json.dumps({"status": "succeeded"}))
    assert read_folder_state(str(run)).committed


PART = part_name(1, "0", 0)


def _part(folder, name=PART):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ["a"], "error": [None]}), folder / name)


def test_preparing_keeps_the_parts_of_a_resume_and_clears_them_otherwise(tmp_path):
    run = tmp_path / "run"
    _part(run)
    (run / "errors").mkdir()
    (run / "errors" / "errors.jsonl").write_text("{}")
    finished = prepare_run_folder(RunStart(AUTOMATIC_RESUME), str(run), str(run), 0, structlog.get_logger())
    assert finished.rows == 1 and (run / PART).exists()
    assert not (run / "errors" / "errors.jsonl").exists()
    with structlog.testing.capture_logs() as logs:
        assert prepare_run_folder(RunStart(RESTART, ("input files",)), str(run), str(run), 0,
                                  structlog.get_logger()) is None
    assert not (run / PART).exists()
    assert [e["event"] for e in logs] == ["earlier_attempt_restarted", "uncommitted_parts_removed"]
    assert logs[0]["changed"] == ["input files"]


def test_preparing_a_replacement_removes_the_committed_run(tmp_path):
    run = tmp_path / "run"
    _part(run)
    (run / MANIFEST_NAME).write_text("{}")
    prepare_run_folder(RunStart(REPLACE), str(run), str(run), 0, structlog.get_logger())
    assert not (run / MANIFEST_NAME).exists() and not (run / PART).exists()


def test_a_resume_whose_engine_would_make_rows_differently_is_refused():
    from llmbatch.pipelines.run_folder import check_same_engine

    earlier = {"spec": {"name": "j"}, "input_files": [], "engine": {"dtype": "float32", "engine": "vllm"}}
    start = decide_start(FolderState(False, earlier), {"spec": {"name": "j"}, "input_files": []}, resume=False,
                         overwrite=False, run_id="r", run_uri="out/r")
    assert start.mode == AUTOMATIC_RESUME
    check_same_engine(start, {"dtype": "float32", "engine": "vllm"}, "r")
    with pytest.raises(UserError, match=r"another engine setting \(dtype float32 -> bfloat16\)"):
        check_same_engine(start, {"dtype": "bfloat16", "engine": "vllm"}, "r")
    check_same_engine(RunStart(RESTART), {"dtype": "bfloat16"}, "r")
