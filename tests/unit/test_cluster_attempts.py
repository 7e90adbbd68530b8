"""A run id submitted again to a cluster becomes a new attempt (the Jobs API keeps every submission id);
status, logs and cancel follow the newest attempt; a run still going is not submitted twice."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

import llmbatch.jobs.remote as remote
from llmbatch.errors import UserError
from llmbatch.jobs.spec import JobSpec, validate_spec


@dataclass
class FakeJobsApi:
    """Stands in for ray.job_submission.JobSubmissionClient (unit test only)."""
    jobs: list = field(default_factory=list)
    clock: int = 1000

    def add(self, submission_id, status, run_id=None, marked=True):
        meta = {"llmbatch": "1", "run_id": run_id or submission_id, "job": "j", "model": "m", "output": None}
        self.clock += 1
        self.jobs.append(SimpleNamespace(submission_id=submission_id, status=status, metadata=meta if marked else {},
                                         start_time=self.clock, end_time=None, message=""))

    def list_jobs(self):
        return list(self.jobs)

    def submit_job(self, *, entrypoint, submission_id, runtime_env, metadata):
        if any(j.submission_id == submission_id for j in self.jobs):
            raise RuntimeError(f"Job with submission_id {submission_id} already exists")
        self.add(submission_id, "PENDING", metadata["run_id"])
        self.jobs[-1].entrypoint = entrypoint
        self.runtime_env, self.metadata = runtime_env, metadata
        shipped = Path(runtime_env["py_modules"][0], remote.SHIPPED_JOB)
        self.shipped = shipped.read_text() if shipped.is_file() else None

    def get_job_logs(self, submission_id):
        return f"logs of {submission_id}"

    def stop_job(self, submission_id):
        self.stopped = submission_id
        next(j for j in self.jobs if j.submission_id == submission_id).status = "STOPPED"

    def get_job_status(self, submission_id):
        return SimpleNamespace(value=next(j for j in self.jobs if j.submission_id == submission_id).status)


@pytest.fixture
def api(monkeypatch):
    fake = FakeJobsApi()
    monkeypatch.setattr(remote, "client", lambda address: fake)
    return fake


def _spec(tmp_path) -> JobSpec:
    return JobSpec.model_validate({"name": "j", "model": {"source": "m"}, "input": {"path": str(tmp_path / "in")},
                                   "output": {"path": str(tmp_path / "out")}})


def test_the_first_submission_is_the_run_id_and_later_ones_are_numbered_attempts(api, tmp_path):
    spec = _spec(tmp_path)
    assert remote.submit_to_cluster(spec, "nightly", "http://h:8265").submission_id == "nightly"
    api.jobs[-1].status = "STOPPED"
    second = remote.submit_to_cluster(spec, "nightly", "http://h:8265", resume=True)
    assert second.submission_id == "nightly.attempt-2"
    assert api.jobs[-1].entrypoint.endswith("--run-id nightly --on-cluster --resume nightly")
    api.jobs[-1].status = "FAILED"
    assert remote.submit_to_cluster(spec, "nightly", "http://h:8265").submission_id == "nightly.attempt-3"
    assert "--resume" not in api.jobs[-1].entrypoint


def test_a_run_still_going_on_the_cluster_is_not_submitted_again(api, tmp_path):
    api.add("nightly", "RUNNING")
    with pytest.raises(UserError) as refused:
        remote.submit_to_cluster(_spec(tmp_path), "nightly", "http://h:8265", resume=True)
    assert "still RUNNING" in str(refused.value) and "llmbatch cancel nightly --address http://h:8265" in str(refused.value)
    assert len(api.jobs) == 1


def test_a_run_that_crashed_elsewhere_resumes_under_its_own_id(api, tmp_path):
    """The attempt record lives with the output, so the cluster's driver decides whether there is one."""
    assert remote.submit_to_cluster(_spec(tmp_path), "local-1", "http://h:8265", resume=True).submission_id == "local-1"
    assert api.jobs[-1].entrypoint.endswith("--resume local-1")


def test_status_logs_cancel_and_list_follow_the_newest_attempt(api):
    api.add("nightly", "STOPPED")
    api.add("other", "SUCCEEDED")
    api.add("nightly.attempt-2", "RUNNING", run_id="nightly")
    api.add("unrelated", "SUCCEEDED", marked=False)
    status = remote.describe_status("http://h:8265", "nightly")
    assert status["status"] == "RUNNING" and status["attempts"] == 2 and status["submission"] == "nightly.attempt-2"
    assert remote.logs("http://h:8265", "nightly") == "logs of nightly.attempt-2"
    assert remote.cancel("http://h:8265", "nightly") == "STOPPED" and api.stopped == "nightly.attempt-2"
    runs = {r["run_id"]: r for r in remote.list_runs("http://h:8265")}
    assert set(runs) == {"nightly", "other"} and runs["nightly"]["attempts"] == 2
    with pytest.raises(UserError, match="no run 'ghost'"):
        remote.describe_status("http://h:8265", "ghost")


def test_the_job_file_travels_in_the_shipped_package_not_where_the_dashboard_shows_it(api, tmp_path, monkeypatch):
    """Environment variables, entrypoint and metadata of a Ray job are on the dashboard: the job file (and any
    scorer option in it) is in none of them; a ${VAR} reference stays a reference."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-shipped")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    spec = JobSpec.model_validate({
        "name": "j", "model": {"source": "m"}, "input": {"path": str(tmp_path / "in")},
        "output": {"path": str(tmp_path / "out")},
        "scoring": [{"name": "s", "kind": "python", "function": "m:f", "options": {"api_key": "${SCORER_KEY}"}}]})
    remote.submit_to_cluster(spec, "r1", "http://h:8265")
    shown = repr((api.runtime_env["env_vars"], api.jobs[-1].entrypoint, api.metadata))
    assert "SCORER_KEY" not in shown and "scoring" not in shown and "never-shipped" not in shown
    assert api.runtime_env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert api.jobs[-1].entrypoint == (f"python -m llmbatch.jobs.cli --log-format json submit {remote.SHIPPED_JOB} --run-id r1 "
                                          "--on-cluster")
    assert "api_key: ${SCORER_KEY}" in api.shipped and "never-shipped" not in api.shipped


def test_the_cluster_driver_finds_the_shipped_job_file_on_its_path_even_beside_an_installed_llmbatch(
        tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not started by llmbatch submit --address"):
        remote.shipped_job_file()
    with remote.shipped_package("name: shipped\n") as package:
        monkeypatch.syspath_prepend(str(Path(package).parent))
        found = remote.shipped_job_file()
        assert found == str(Path(package) / remote.SHIPPED_JOB) and Path(found).read_text() == "name: shipped\n"


def test_a_python_scorers_own_module_ships_with_the_job_and_installed_ones_do_not(tmp_path, monkeypatch):
    (tmp_path / "team_scorers.py").write_text("def score(row):\n    return 1.0\n")
    (tmp_path / "team_pkg").mkdir()
    (tmp_path / "team_pkg" / "__init__.py").write_text("")
    (tmp_path / "team_pkg" / "metrics.py").write_text("def score(row):\n    return 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorers = [{"name": "a", "kind": "python", "function": "team_scorers:score"},
               {"name": "b", "kind": "python", "function": "team_pkg.metrics:score"},
               {"name": "c", "kind": "python", "function": "yaml:safe_load"},
               {"name": "d", "kind": "python", "function": "team_scorers:score"}]
    spec = validate_spec({"name": "s", "model": {"source": "m"}, "input": {"path": "p"}, "output": {"path": "o"},
                          "scoring": scorers})
    places = remote.own_modules(spec)
    assert places == [tmp_path / "team_scorers.py", tmp_path / "team_pkg"]
    with remote.shipped_modules(places) as shipped:
        folders = [Path(p) for p in shipped]
        assert [f.name for f in folders] == ["team_scorers", "team_pkg"]
        assert (folders[0] / "__init__.py").read_text() == (tmp_path / "team_scorers.py").read_text()
        assert (folders[1] / "metrics.py").is_file()
    assert not folders[0].exists()


def test_ray_clients_upload_notes_stay_off_the_submitters_terminal():
    import logging

    from ray.dashboard.modules.dashboard_sdk import logger as sdk_logger

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("ray").addHandler(handler)
    try:
        with remote.ray_client_quiet():
            sdk_logger.info("Uploading package gcs://_ray_pkg_x.zip.")
            sdk_logger.warning("a warning still shows")
        sdk_logger.info("after it, as before")
    finally:
        logging.getLogger("ray").removeHandler(handler)
    assert seen == ["a warning still shows", "after it, as before"]
