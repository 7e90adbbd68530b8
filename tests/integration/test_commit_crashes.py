"""A driver that dies at any step of writing a run (its attempt record, its parts, the cache entries, the
summary, the manifest), or whose disk fills up under it, leaves a run that the next submission of the same run
id finishes: exactly one row per input, one cache entry per prompt, nothing stuck. One engine start: after the
parts, every later attempt finds all rows written and only commits."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from llmbatch.crash_points import CRASH_ENV, CRASH_EXIT
from llmbatch.jobs.run_index import run_dir
from support import CLI, REPO, kill_session, read_output, run_cli, write_job

ROWS = 6


def _crash_at(job: Path, step: str) -> subprocess.CompletedProcess:
    """Submit the run with the driver set to die at `step`; whatever it started in its session goes with it."""
    proc = subprocess.Popen([CLI, "submit", str(job), "--run-id", "c1"], cwd=REPO, start_new_session=True,
                            env={**os.environ, CRASH_ENV: step}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        kill_session(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextmanager
def _disk_of_its_own(path: Path, size: str = "16m") -> Iterator[Path]:
    """A small tmpfs mounted at `path`, so that the test can fill it (mounting needs root, or sudo)."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    path.mkdir(parents=True)
    subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "llmbatch-test", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run([*sudo, "umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of `disk`; deleting the returned file gives them back."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    chunk = b"\0" * (1 << 20)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler
    finally:
        os.close(fd)


def _submit_onto_a_disk_that_fills(job: Path, run: Path, disk: Path, log: Path) -> subprocess.CompletedProcess:
    """Submit the run, and fill its disk the moment the driver has taken the run's lock."""
    records = len(list((run / "_lock").glob("g*.json")))
    with open(log, "w") as sink:
        proc = subprocess.Popen([CLI, "submit", str(job), "--run-id", "c1"], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.time() + 300
        while len(list((run / "_lock").glob("g*.json"))) == records:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the driver never took the lock"
            time.sleep(0.02)
        filler = _fill(disk)
        proc.wait(timeout=600)
    finally:
        kill_session(proc)
    filler.unlink()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", log.read_text())


def _rows_in_parts(run: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in run.glob("part-g*.parquet"))


def test_a_crash_at_each_step_of_writing_a_run_then_a_resubmission_finishes_it_exactly_once(tmp_path: Path,
                                                                                             demo_model: str):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i}", "prompt": f"Name the number {i}."}) + "\n"
                            for i in range(ROWS)), encoding="utf-8")
    cache = tmp_path / "cache"
    job = write_job(tmp_path / "job.yaml", name="crashes", model={"source": demo_model},
                    input={"path": str(data), "id_column": "qid"}, sampling={"max_tokens": 4},
                    output={"path": str(tmp_path / "out"), "rows_per_part": 2}, resources={"batch_size": 2},
                    cache={"path": str(cache)})
    with _disk_of_its_own(tmp_path / "out") as disk:
        _crash_then_finish(job, tmp_path / "out" / "c1", cache, disk, tmp_path / "disk-full.log")


def _crash_then_finish(job: Path, run: Path, cache: Path, disk: Path, disk_full_log: Path) -> None:
    def crashed(step: str) -> None:
        log = run_dir("c1") / "llmbatch.log"   # the driver's own output goes to the run's log file
        log.unlink(missing_ok=True)
        proc = _crash_at(job, step)
        assert proc.returncode == CRASH_EXIT, f"{step}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        assert f"{CRASH_ENV}={step}: the driver dies here" in log.read_text(encoding="utf-8")

    crashed("attempt")
    assert (run / "_attempt.json").is_file() and _rows_in_parts(run) == 0 and not (run / "_manifest.json").exists()
    crashed("parts")
    assert _rows_in_parts(run) == ROWS and not (run / "_summary.json").exists()
    crashed("cache")
    entry_files = list(cache.glob("*/*.parquet"))
    assert len(entry_files) == 1 and not (run / "_summary.json").exists()
    parts = {p.name: p.read_bytes() for p in run.glob("part-g*.parquet")}
    full = _submit_onto_a_disk_that_fills(job, run, disk, disk_full_log)
    assert full.returncode not in (0, CRASH_EXIT) and "no space left on the device" in full.stderr, full.stderr[-4000:]
    assert "Traceback" not in full.stderr and not (run / "_manifest.json").exists()
    assert {p.name: p.read_bytes() for p in run.glob("part-g*.parquet")} == parts
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    crashed("summary")
    assert (run / "_summary.json").is_file() and not (run / "_manifest.json").exists()
    crashed("manifest")
    assert (run / "_manifest.json").is_file()

    again = run_cli("submit", str(job), "--run-id", "c1")
    assert again.returncode == 2 and "already holds a committed run" in again.stderr, again.stderr[-2000:]
    rows, manifest = read_output(str(run))
    assert sorted(r.id for r in rows) == [f"q{i}" for i in range(ROWS)]
    assert all(r.error is None and r.generated_text for r in rows)
    assert manifest["status"] == "succeeded" and manifest["rows"]["in"] == manifest["rows"]["out"] == ROWS
    assert manifest["resumed"]["rows_skipped"] == ROWS and manifest["resumed"]["automatic"]
    entries = pads.dataset(sorted(str(p) for p in cache.glob("*/*.parquet")), format="parquet").to_table()
    assert entries.num_rows == ROWS and len(set(entries.column("key").to_pylist())) == ROWS
