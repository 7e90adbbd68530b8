"""Exit codes and the one error format of the command line: `error: ` lines, or one JSON object per error."""
from __future__ import annotations

import json

import pytest
import structlog
from click.testing import CliRunner

import llmbatch.jobs.spec
from llmbatch.errors import (
    EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_USER, JobFailed, SpecError, UserError,
)
from llmbatch.jobs.cli import main

GOOD_JOB = "name: demo\nmodel: {source: m}\ninput: {path: data.jsonl}\noutput: {path: out}\n"


@pytest.fixture(autouse=True)
def default_logging():
    """The CLI configures structlog onto the streams of the moment; later tests get structlog's defaults."""
    yield
    structlog.reset_defaults()


def run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="llmbatch")


def stderr_lines(result) -> list[str]:
    return result.stderr.strip().splitlines()


def json_errors(result) -> list[dict]:
    return [json.loads(line) for line in stderr_lines(result)]


def job_file(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def raising(exc: BaseException):
    def load_spec(*_args, **_kwargs):
        raise exc
    return load_spec


def test_the_codes_and_the_errors_that_carry_them():
    assert (EXIT_OK, EXIT_JOB_FAILED, EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED) == (0, 1, 2, 3, 130)
    assert UserError("x").exit_code == SpecError(["x"]).exit_code == EXIT_USER
    assert JobFailed.exit_code == EXIT_JOB_FAILED


def test_help_names_the_exit_codes():
    result = run("--help")
    assert result.exit_code == EXIT_OK
    assert "Exit codes:" in result.stdout
    for line in ("0    ok", "1    the job failed", "2    a user error", "3    an internal error", "130  interrupted"):
        assert line in result.stdout


def test_invalid_job_file_exits_2_with_a_header_and_one_line_per_problem(tmp_path):
    path = job_file(tmp_path, GOOD_JOB.replace("name: demo", "name: Demo") + "sampling: {max_tokens: 0}\n")
    result = run("validate", path)
    assert result.exit_code == EXIT_USER
    assert stderr_lines(result) == [
        f"error: {path}: invalid job spec",
        "  name: 'Demo' has 'D'; use lowercase letters, digits and '-', starting with a letter or digit "
        "(did you mean 'demo'?)",
        "  sampling.max_tokens: must be greater than 0",
    ]


def test_missing_job_file_is_an_error_line(tmp_path):
    result = run("validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == EXIT_USER
    (line,) = stderr_lines(result)
    assert line.startswith(f"error: {tmp_path / 'nope.yaml'}: no such job file")


def test_malformed_yaml_is_an_error_line_with_file_line_and_column(tmp_path):
    path = job_file(tmp_path, "name: x\nmodel: [unclosed\n")
    result = run("validate", path)
    assert result.exit_code == EXIT_USER
    (line,) = stderr_lines(result)
    assert line.startswith(f"error: {path}:3:1: not valid YAML")


def test_a_bad_set_override_is_an_error_line(tmp_path):
    result = run("validate", job_file(tmp_path, GOOD_JOB), "--set", "sampling")
    assert result.exit_code == EXIT_USER
    assert stderr_lines(result) == ["error: --set sampling: expected key.path=value"]


@pytest.mark.parametrize("args, message, usage", [
    (["validate", "--bogus", "job.yaml"], "No such option '--bogus'", "llmbatch validate [OPTIONS] JOB_FILE"),
    (["validate"], "Missing argument 'JOB_FILE'", "llmbatch validate [OPTIONS] JOB_FILE"),
    (["nosuch"], "No such command 'nosuch'", "llmbatch [OPTIONS] COMMAND [ARGS]..."),
    (["--bogus", "validate"], "No such option '--bogus'", "llmbatch [OPTIONS] COMMAND [ARGS]..."),
])
def test_usage_errors_exit_2_as_error_lines(args, message, usage):
    result = run(*args)
    assert result.exit_code == EXIT_USER
    lines = stderr_lines(result)
    assert lines[0].startswith(f"error: {message}")
    assert f"  usage: {usage}" in lines


def test_json_log_format_prints_an_invalid_job_file_as_one_json_object(tmp_path):
    path = job_file(tmp_path, GOOD_JOB.replace("path: data.jsonl", "path: ''"))
    for args in (["--log-format", "json", "validate", path], ["validate", path, "--log-format=json"]):
        result = run(*args)
        assert result.exit_code == EXIT_USER
        assert json_errors(result) == [{
            "level": "error", "event": "invalid_job_spec", "error": f"{path}: invalid job spec",
            "problems": ["input.path: must not be empty (File, directory, glob or prefix; local or s3://)"],
            "exit_code": EXIT_USER}]


@pytest.mark.parametrize("args, usage", [
    (["--log-format", "json", "validate", "--bogus", "job.yaml"], "llmbatch validate [OPTIONS] JOB_FILE"),
    (["--log-format=json", "--bogus"], "llmbatch [OPTIONS] COMMAND [ARGS]..."),
])
def test_json_log_format_prints_usage_errors_as_json(args, usage):
    result = run(*args)
    assert result.exit_code == EXIT_USER
    (error,) = json_errors(result)
    assert error["event"] == "usage_error" and error["usage"] == usage and error["exit_code"] == EXIT_USER
    assert "--bogus" in error["error"]


def test_an_unexpected_exception_is_an_internal_error_exit_3(tmp_path, monkeypatch):
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(RuntimeError("boom\nsecond line")))
    result = run("validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code == EXIT_INTERNAL
    assert stderr_lines(result) == ["error: RuntimeError: boom", "  second line",
                                    "  (an internal error in llmbatch; run with --debug for the traceback)"]
    assert "Traceback" not in result.stderr


def test_an_internal_error_with_debug_shows_the_traceback_and_still_exits_3(tmp_path, monkeypatch):
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(RuntimeError("boom")))
    result = run("--debug", "validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code == EXIT_INTERNAL
    assert result.stderr.startswith("Traceback") and stderr_lines(result)[-1] == "error: RuntimeError: boom"


def test_an_internal_error_in_json_is_one_object(tmp_path, monkeypatch):
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(RuntimeError("boom")))
    result = run("--log-format", "json", "validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code == EXIT_INTERNAL
    assert json_errors(result) == [{
        "level": "error", "event": "internal_error", "error": "RuntimeError: boom", "exception": "RuntimeError",
        "hint": "an internal error in llmbatch; run with --debug for the traceback", "exit_code": EXIT_INTERNAL}]
    debugged = run("--log-format", "json", "--debug", "validate", job_file(tmp_path, GOOD_JOB))
    (error,) = json_errors(debugged)
    assert error["traceback"].startswith("Traceback") and "hint" not in error


def test_a_failed_job_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(JobFailed("12 of 19 rows are errors")))
    result = run("validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code == EXIT_JOB_FAILED
    assert stderr_lines(result) == ["error: job failed: 12 of 19 rows are errors"]
    as_json = json_errors(run("--log-format", "json", "validate", job_file(tmp_path, GOOD_JOB)))
    assert as_json == [{"level": "error", "event": "job_failed", "error": "job failed: 12 of 19 rows are errors",
                        "exit_code": EXIT_JOB_FAILED}]


def test_a_user_error_prints_each_line_and_exits_2(tmp_path, monkeypatch):
    error = UserError("input.path: nothing there", lines=["input.path: nothing there", "model.source: no such model"])
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(error))
    result = run("validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code == EXIT_USER
    assert stderr_lines(result) == ["error: input.path: nothing there", "error: model.source: no such model"]
    (as_json,) = json_errors(run("--log-format", "json", "validate", job_file(tmp_path, GOOD_JOB)))
    assert as_json["event"] == "user_error" and as_json["problems"] == error.lines


def test_interrupted_exits_130(tmp_path, monkeypatch):
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(KeyboardInterrupt()))
    result = run("validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code == EXIT_INTERRUPTED
    assert stderr_lines(result) == ["error: interrupted"]


@pytest.mark.parametrize("exc", [UserError("cannot read s3://ann:s3cr3t@bucket/x"),
                                 RuntimeError("cannot reach http://ann:s3cr3t@head:8265")])
@pytest.mark.parametrize("log_format", ["console", "json"])
def test_credentials_in_urls_never_reach_an_error(tmp_path, monkeypatch, exc, log_format):
    monkeypatch.setattr(llmbatch.jobs.spec, "load_spec", raising(exc))
    result = run("--log-format", log_format, "--debug", "validate", job_file(tmp_path, GOOD_JOB))
    assert result.exit_code in (EXIT_USER, EXIT_INTERNAL)
    assert "s3cr3t" not in result.stderr and "://***@" in result.stderr


def test_the_installed_command_exits_with_the_codes(tmp_path):
    """The console script, not the test runner: the exit status a shell sees."""
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).parent / "llmbatch"
    bad = job_file(tmp_path, "name: x\nmodel: [unclosed\n")
    proc = subprocess.run([str(command), "validate", bad, "--log-format", "json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_USER
    (error,) = [json.loads(line) for line in proc.stderr.strip().splitlines()]
    assert error["event"] == "invalid_job_spec" and error["exit_code"] == EXIT_USER
    assert error["problems"][0].startswith(f"{bad}:3:1: not valid YAML")
    usage = subprocess.run([str(command), "validate", "--bogus"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == EXIT_USER and usage.stderr.startswith("error: No such option '--bogus'")
