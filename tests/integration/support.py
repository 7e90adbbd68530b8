"""Helpers for integration tests: run the real CLI, write job files, read output with the v1 schema."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads

from llmbatch.pipelines.schema import OutputRow

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("llmbatch"))
DEMO_MODEL = "smollm2-135m-instruct"


def run_cli(*args: str, env: dict | None = None, check: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([CLI, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmbatch {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def run_cli_in_terminal(*args: str, env: dict | None = None, timeout: int = 900) -> tuple[int, str]:
    """Run the CLI with its standard output and error on a pseudo-terminal, as a user at a terminal does;
    returns the exit code and everything the terminal received, escape sequences included."""
    import pty
    import select

    full_env = {**os.environ, "COLUMNS": "200", "LINES": "50", "TERM": "xterm-256color", **(env or {})}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([CLI, *args], cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=follower, start_new_session=True)
    os.close(follower)
    received = bytearray()
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: every process holding it has exited
                    break
                if not chunk:
                    break
                received += chunk
            elif proc.poll() is not None:
                break
        else:
            kill_session(proc)
            raise AssertionError(f"llmbatch {' '.join(args)} ran past {timeout} s\n{received.decode(errors='replace')}")
    finally:
        os.close(leader)
    return proc.wait(timeout=60), received.decode("utf-8", errors="replace")


def screen_text(received: str) -> str:
    """What a terminal shows of `received`, roughly: escape sequences and carriage returns removed."""
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r", "", received)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a CLI started with start_new_session and everything it started in its session (Ray, workers,
    vLLM engine processes), and wait until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            return
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def write_job(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def read_output(run_uri: str, filesystem=None) -> tuple[list[OutputRow], dict]:
    """Every output row, parsed with the project's own schema, and the manifest (written last)."""
    if run_uri.startswith("s3://"):
        inner = run_uri[len("s3://"):]
        manifest = json.loads(filesystem.cat_file(f"{inner}/_manifest.json"))
        files = [f"{inner}/{name}" for name in manifest["output"]["files"]]
        table = pads.dataset(files, format="parquet", filesystem=filesystem).to_table()
    else:
        manifest = json.loads(Path(run_uri, "_manifest.json").read_text())
        files = [str(Path(run_uri, name)) for name in manifest["output"]["files"]]
        table = pads.dataset(files, format="parquet").to_table()
    rows = [OutputRow.model_validate(r) for r in table.to_pylist()]
    return rows, manifest


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
