"""Credentials in URLs never reach a message: errors, log lines, the submit output."""
from __future__ import annotations

import json

import pytest
import structlog
from click.testing import CliRunner

from llmbatch.jobs.cli import main
from llmbatch.jobs.logs import configure_logging
from llmbatch.redact import redact_event, strip_url_credentials


@pytest.fixture(autouse=True)
def default_logging():
    """The CLI configures structlog onto the streams of the moment; later tests get structlog's defaults."""
    yield
    structlog.reset_defaults()


def test_user_and_password_in_a_url_are_masked_and_the_rest_kept():
    assert strip_url_credentials("cannot reach http://ann:s3cr3t@head:8265/api") == "cannot reach http://***@head:8265/api"
    assert strip_url_credentials("at https://token@minio.local:9000 and s3://bucket/key") == \
        "at https://***@minio.local:9000 and s3://bucket/key"
    assert strip_url_credentials("mail ann@example.com, http://head:8265") == "mail ann@example.com, http://head:8265"
    assert redact_event(None, "info", {"event": "x", "address": "http://a:b@h", "more": ["http://c:d@h"]}) == \
        {"event": "x", "address": "http://***@h", "more": ["http://***@h"]}


def test_a_failing_submit_to_an_address_with_credentials_never_prints_them(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"name": "j", "model": {"source": "m"}, "input": {"path": str(tmp_path)},
                               "output": {"path": str(tmp_path / "out")}}))
    result = CliRunner().invoke(main, ["submit", str(job), "--address", "http://ann:s3cr3t@127.0.0.1:9"])
    assert result.exit_code == 2
    assert "s3cr3t" not in result.output and "http://***@127.0.0.1:9" in result.output
    configure_logging("json")
    structlog.get_logger().warning("probe", endpoint="http://ann:s3cr3t@minio:9000")
    logged = capsys.readouterr().err
    assert "http://***@minio:9000" in logged and "s3cr3t" not in logged
