"""How a run starts in its folder: fresh, resumed, resumed automatically, replacing a committed run, or refused.

`decide_start` is the whole decision, from what the folder holds and what the user asked; `prepare_run_folder`
carries it out, and only once every check of the job has passed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmbatch.errors import UserError
from llmbatch.pipelines.manifest import clear_uncommitted, manifest_exists, remove_run, remove_tree, staging_uri
from llmbatch.pipelines.resume import (
    FinishedWork, changed_settings, finished_work, input_changes, read_attempt,
)
from llmbatch.pipelines.run_files import ATTEMPT_NAME, ERRORS_DIR, ERRORS_FILE, RunFolder

FRESH = "fresh"                        # nothing to keep: an empty folder, or --overwrite of an uncommitted one
RESUME = "resume"                      # --resume: keep the earlier attempt's rows
AUTOMATIC_RESUME = "automatic_resume"  # a plain resubmission of the same job over the same files
RESTART = "restart"                    # an uncommitted earlier attempt of another job or input: start over
REPLACE = "replace"                    # --overwrite of a committed run


@dataclass(frozen=True)
class FolderState:
    committed: bool
    earlier_attempt: dict[str, Any] | None   # the last attempt's record (_attempt.json), committed or not


@dataclass(frozen=True)
class RunStart:
    mode: str
    changed: tuple[str, ...] = field(default=())   # RESTART: what differs from the earlier attempt
    earlier_engine: dict[str, Any] | None = None   # a resume: the engine settings the earlier attempt recorded

    @property
    def resumes(self) -> bool:
        return self.mode in (RESUME, AUTOMATIC_RESUME)


def read_folder_state(run_uri: str) -> FolderState:
    return FolderState(manifest_exists(run_uri), read_attempt(run_uri))


def decide_start(state: FolderState, attempt: dict[str, Any], *, resume: bool, overwrite: bool, run_id: str,
                 run_uri: str) -> RunStart:
    """`attempt`: this attempt's record ({"spec": ..., "input_files": [[uri, size, version], ...]}). Refusals are
    UserErrors that say what to pass instead."""
    if state.committed:
        if resume:
            raise UserError(f"--resume {run_id}: {run_uri} is already committed, so there is nothing to resume; "
                            "pass --overwrite to run it again")
        if not overwrite:
            raise UserError(f"{run_uri} already holds a committed run; choose another --run-id, "
                            "or pass --overwrite to replace it")
        return RunStart(REPLACE)
    earlier = state.earlier_attempt
    if resume:
        if earlier is None:
            raise UserError(f"--resume {run_id}: no earlier attempt at {run_uri} (an attempt leaves {ATTEMPT_NAME}); "
                            "check output.path and the run id, or submit without --resume")
        changed = changed_settings(earlier["spec"], attempt["spec"])
        if changed:
            raise UserError(f"--resume {run_id}: the job changed since the earlier attempt ({', '.join(changed)}), "
                            "so its finished rows would not match the rest; submit under a new --run-id, "
                            "or pass --overwrite to start this one again")
        changes = input_changes(earlier, attempt["input_files"])
        if changes:
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            raise UserError(f"--resume {run_id}: the input files changed since the earlier attempt ({shown}), so its "
                            "finished rows would not match; submit under a new --run-id")
        return RunStart(RESUME, earlier_engine=earlier.get("engine"))
    if overwrite or earlier is None:
        return RunStart(FRESH)
    changed = changed_settings(earlier["spec"], attempt["spec"])
    if input_changes(earlier, attempt["input_files"]):
        changed.append("input files")
    return RunStart(RESTART, tuple(changed)) if changed else RunStart(AUTOMATIC_RESUME,
                                                                      earlier_engine=earlier.get("engine"))


def check_same_engine(start: RunStart, engine: dict[str, Any], run_id: str) -> None:
    """A resume keeps rows an engine made; refuse one whose engine would make the rest differently (a new
    `resources.accelerator` that turns float32 into bfloat16, say)."""
    if not start.resumes or start.earlier_engine is None:
        return
    changed = sorted(k for k in set(engine) | set(start.earlier_engine)
                     if engine.get(k) != start.earlier_engine.get(k))
    if changed:
        what = ", ".join(f"{k} {start.earlier_engine.get(k)} -> {engine.get(k)}" for k in changed)
        raise UserError(f"run {run_id}: resuming would finish the rows with another engine setting ({what}) than "
                        "the earlier attempt wrote its rows with; set resources back, or pass --overwrite to start "
                        "over")


def prepare_run_folder(start: RunStart, run_uri: str, first_pass: str, judge_passes: int, log) -> FinishedWork | None:
    """Clear what this start does not keep; for a resume, what the earlier attempt finished in `first_pass`."""
    finished = None
    if start.resumes:
        if judge_passes:  # judge passes run again over every row; the first pass resumes
            clear_uncommitted(run_uri, keep_staging=True)
            for number in range(1, judge_passes + 1):
                remove_tree(staging_uri(run_uri, number))
        finished = finished_work(first_pass)
        log.info("resuming", rows_skipped=finished.rows, parts_kept=finished.parts_kept,
                 parts_removed=len(finished.parts_removed), output=run_uri,
                 automatic=start.mode == AUTOMATIC_RESUME)
    elif start.mode == REPLACE:
        remove_run(run_uri)
        log.warning("committed_run_replaced", output=run_uri)
    else:
        if start.mode == RESTART:
            log.warning("earlier_attempt_restarted", output=run_uri, changed=list(start.changed),
                        note="the job differs from the uncommitted earlier attempt, so its rows are not reused")
        stale = clear_uncommitted(run_uri)
        if stale:
            log.warning("uncommitted_parts_removed", parts=stale, output=run_uri)
    RunFolder(run_uri).remove(f"{ERRORS_DIR}/{ERRORS_FILE}")
    return finished
