"""Real processes only: the llmbatch CLI, an embedded Ray, vLLM on CPU, and a moto S3 server on 127.0.0.1."""
from __future__ import annotations

import urllib.request

import pytest

from support import DEMO_MODEL, free_port, run_cli

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
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
    from llmbatch.storage import s3_filesystem

    return s3_filesystem()


@pytest.fixture(scope="session")
def demo_model() -> str:
    """The demo model, prepared once into the llmbatch cache (a no-op when already there)."""
    run_cli("models", "prepare", DEMO_MODEL, check=True)
    return DEMO_MODEL
