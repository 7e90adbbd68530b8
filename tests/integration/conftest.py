"""Real processes only: the llmbatch CLI, an embedded Ray, vLLM on CPU, and a moto S3 server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipelines.schema import OutputRow

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("llmbatch"))
DEMO_MODEL = "smollm2-135m-instruct"
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A clean S3 endpoint for one test; the process env points s3fs at it."""
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).read()
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    from pipelines.storage import s3_filesystem

    return s3_filesystem()


@pytest.fixture(scope="session")
def demo_model() -> str:
    """The demo model, prepared once into the llmbatch cache (a no-op when already there)."""
    run_cli("models", "prepare", DEMO_MODEL, check=True)
    return DEMO_MODEL


def run_cli(*args: str, env: dict | None = None, check: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([CLI, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmbatch {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


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
