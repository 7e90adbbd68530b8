"""The run lock on local disk: one holder per generation, staleness by the storage's clock, a superseded holder
writes nothing, and a run deletes and counts only the parts it wrote. (The same lock on S3, and two real
drivers, are in tests/integration/test_driver_lock.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmbatch.errors import UserError
from llmbatch.pipelines import run_lock
from llmbatch.pipelines.manifest import clear_uncommitted, remove_run
from llmbatch.pipelines.run_files import LOCK_DIR, output_parts, part_generation, part_name
from llmbatch.pipelines.run_lock import Fence, RunLock, RunLockLost, process_start, record_name, this_machine


def _record(run: Path, generation: int, **fields) -> Path:
    path = run / LOCK_DIR / record_name(generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generation": generation, **fields}))
    return path


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_of_drivers_racing_for_a_run_exactly_one_takes_it(tmp_path):
    run = str(tmp_path / "run")
    won, refused, barrier = [], [], threading.Barrier(8)

    def driver():
        barrier.wait()
        try:
            won.append(RunLock.acquire(run, "r"))
        except UserError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=driver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7 and won[0].generation == 1
    assert all("run r is still running" in m or "another driver took this run a moment ago" in m for m in refused)
    won[0].release()


def test_a_holder_on_another_machine_keeps_the_run_until_its_record_is_stale_by_the_storages_clock(
        tmp_path, monkeypatch):
    monkeypatch.setenv(run_lock.EXPIRY_ENV, "30")
    run = tmp_path / "run"
    record = _record(run, 1, host="node-7", boot_id="other-boot", pid_namespace=1, pid=4242)
    with pytest.raises(UserError) as refused:
        RunLock.acquire(str(run), "nightly-1")
    assert "run nightly-1 is still running: its driver (pid 4242 on node-7)" in str(refused.value)
    assert "--run-id" in str(refused.value) and "frees after 30 s" in str(refused.value)
    _age(record, 31)
    with RunLock.acquire(str(run), "nightly-1") as lock:
        assert lock.generation == 2
    assert record.exists()  # earlier generations stay: the token only ever grows


def test_a_holder_gone_from_this_machine_frees_the_run_at_once_and_a_live_one_does_not(tmp_path):
    here = this_machine()
    run = tmp_path / "run"
    _record(run, 1, **here, pid=_dead_pid(), pid_start="1")
    with RunLock.acquire(str(run), "r") as lock:
        assert lock.generation == 2
    _record(run, 3, **here, pid=os.getpid(), pid_start="0")  # this pid, but a newer process than the holder
    with RunLock.acquire(str(run), "r") as lock:
        assert lock.generation == 4
    _record(run, 5, **here, pid=os.getpid(), pid_start=process_start(os.getpid()))
    with pytest.raises(UserError, match="run r is still running"):
        RunLock.acquire(str(run), "r")
    _record(run, 6, **{**here, "pid_namespace": -1}, pid=_dead_pid(), pid_start="1")  # another container
    with pytest.raises(UserError, match="run r is still running"):
        RunLock.acquire(str(run), "r")


def test_a_superseded_holder_stops_before_any_write_and_leaves_the_new_record_alone(tmp_path):
    run = tmp_path / "run"
    lock = RunLock.acquire(str(run), "r")
    lock.check("anything")
    Fence(str(run), 1).check()
    newer = _record(run, 2, host="node-7", pid=1)
    with pytest.raises(RunLockLost, match="another driver took the run .lock generation 2 after this one's 1.; "
                                          "stopped before writing the manifest"):
        lock.check("writing the manifest")
    run_lock._last_fence_check.clear()
    with pytest.raises(RunLockLost, match="lock generation 2 after 1"):
        Fence(str(run), 1).check()
    lock.release()
    assert json.loads(newer.read_text()) == {"generation": 2, "host": "node-7", "pid": 1}
    assert not json.loads((run / LOCK_DIR / record_name(1)).read_text())["released"]


def test_a_held_lock_is_renewed_and_a_released_one_is_free_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(run_lock.EXPIRY_ENV, "2")
    run = tmp_path / "run"
    lock = RunLock.acquire(str(run), "r")
    record = run / LOCK_DIR / record_name(1)
    deadline = time.time() + 10
    while json.loads(record.read_text())["renewals"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads(record.read_text())["renewals"] >= 2
    with pytest.raises(UserError, match="still running"):
        RunLock.acquire(str(run), "r")
    lock.release()
    assert json.loads(record.read_text())["released"]
    with RunLock.acquire(str(run), "r") as again:
        assert again.generation == 2


def test_a_lock_that_cannot_be_renewed_for_its_expiry_is_lost(tmp_path, monkeypatch):
    monkeypatch.setenv(run_lock.EXPIRY_ENV, "2")
    lock = RunLock.acquire(str(tmp_path / "run"), "r")

    def refuse(self, generation, body):
        raise OSError("read-only file system")

    monkeypatch.setattr(run_lock._Folder, "overwrite", refuse)
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.1)
    with pytest.raises(RunLockLost, match="could not be renewed for .* s .read-only file system."):
        lock.check("committing")
    lock.release()


def _part(folder: Path, generation: int, task: int = 0) -> Path:
    path = folder / part_name(generation, "ab12", task)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1")
    return path


def test_a_run_deletes_and_counts_only_its_own_parts(tmp_path):
    run = tmp_path / "out" / "c"
    mine = [_part(run, 1, 0), _part(run, 2, 1)]
    foreign = [run / "data.parquet", run / "sub" / part_name(1, "ab12", 0), run / "notes.txt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not llmbatch's")
    from fsspec.implementations.local import LocalFileSystem

    assert [Path(p) for p in output_parts(LocalFileSystem(), str(run))] == mine
    assert [part_generation(str(p)) for p in mine] == [1, 2] and part_generation("data.parquet") is None
    assert clear_uncommitted(str(run)) == 2
    assert all(p.exists() for p in foreign) and not any(p.exists() for p in mine)

    _part(run, 3)
    (run / "_manifest.json").write_text("{}")
    (run / "_summary.json").write_text("{}")
    (run / "errors").mkdir()
    (run / "errors" / "errors.jsonl").write_text("{}\n")
    (run / "errors" / "mine.txt").write_text("a user's file")
    _record(run, 3, released=True)
    remove_run(str(run))
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == ["_lock/g000003.json", "data.parquet", "errors/mine.txt", "notes.txt",
                    f"sub/{part_name(1, 'ab12', 0)}"]
