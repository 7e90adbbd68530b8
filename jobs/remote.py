"""Jobs on a Ray cluster through the Jobs API: submit, status, logs, list, cancel."""
from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import shlex
import shutil
import site
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from llmbatch.cluster.jobs_api import METADATA_MARK, client, jobs_api_errors
from llmbatch.cluster.profiles import STORE_ENV as PROFILE_STORE_ENV
from llmbatch.errors import UserError
from llmbatch.jobs.spec import JobSpec
from llmbatch.pipelines.manifest import read_manifest
from llmbatch.storage import is_s3, join

# The resolved job file travels inside the shipped package (uploaded to the cluster's own storage), never in the
# job's environment variables, entrypoint or metadata, which the Ray dashboard shows to everyone who can open it.
SHIPPED_JOB = "submitted_job.yaml"
# Endpoint and region settings the cluster needs to reach the same storage; never credentials.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "deploy")


@dataclass
class Submission:
    run_id: str
    address: str
    run_uri: str
    submission_id: str


def submit_to_cluster(spec: JobSpec, run_id: str, address: str, *, overwrite: bool = False,
                      resume: bool = False, extra_metadata: dict[str, str] | None = None) -> Submission:
    """Send the job to the cluster: the project code and the resolved job file travel as the runtime env's
    package; the entrypoint names only the run.

    The first attempt at a run id is submitted under the run id itself; a later one (a resume, or a rerun
    that continues an uncommitted attempt) under `RUN_ID.attempt-N`, since the Jobs API keeps every
    submission id once used. Status, logs and cancel follow the newest attempt."""
    run_uri = join(spec.output.path, run_id)
    earlier = attempts(address, run_id)
    if earlier and _status(earlier[-1]) not in TERMINAL:
        raise UserError(f"run {run_id} is still {_status(earlier[-1])} on the cluster (submission "
                        f"{earlier[-1].submission_id}); wait for it to end, or stop it with "
                        f"llmbatch cancel {run_id} --address {address}")
    # No working_dir: Ray may re-extract a job's working_dir under its running driver.
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if is_s3(os.environ.get(PROFILE_STORE_ENV, "")):  # a shared store; a local folder means nothing there
        env_vars[PROFILE_STORE_ENV] = os.environ[PROFILE_STORE_ENV]
    job_text = yaml.safe_dump(spec.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
    metadata = {**(extra_metadata or {}), METADATA_MARK: "1", "job": spec.name, "run_id": run_id,
                "model": spec.model.source, "output": run_uri}
    # The driver logs JSON lines: the submitter's view (jobs/cluster_watch.py) reads its events back from them.
    entrypoint = f"python -m llmbatch.jobs.cli --log-format json submit {SHIPPED_JOB} --run-id {run_id} --on-cluster"
    if overwrite:
        entrypoint += " --overwrite"
    if resume:
        entrypoint += f" --resume {run_id}"
    taken = {info.submission_id for info in earlier}
    submission_id = next(candidate for candidate in _submission_ids(run_id) if candidate not in taken)
    jobs = client(address)
    with shipped_package(job_text) as package, shipped_modules(own_modules(spec)) as modules, \
            jobs_api_errors(address), ray_client_quiet():
        runtime_env: dict[str, Any] = {"py_modules": [package, *modules], "env_vars": env_vars}
        jobs.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                        metadata=metadata)
    return Submission(run_id, address, run_uri, submission_id)


@contextmanager
def ray_client_quiet() -> Iterator[None]:
    """Ray's job client logs each package it uploads at INFO, on the submitter's terminal: warnings only. (Its
    loggers set their own levels, so the filter is on the handlers of Ray's logger.)"""
    handlers = logging.getLogger("ray").handlers
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


@contextmanager
def shipped_package(job_text: str | None = None) -> Iterator[str]:
    """The installed `llmbatch` package assembled in one folder, as Ray's `py_modules` uploads it, with the
    resolved job file (`job_text`) as SHIPPED_JOB in it.

    The layers live in their own folders in a source checkout, so the package is put together from
    wherever each one is installed."""
    import llmbatch
    import llmbatch.cluster
    import llmbatch.jobs
    import llmbatch.pipelines

    with tempfile.TemporaryDirectory(prefix="llmbatch-ship-") as folder:
        root = Path(folder) / "llmbatch"
        shutil.copytree(Path(llmbatch.__file__).parent, root, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "jobs", "cluster", "pipelines"))
        for layer in (llmbatch.jobs, llmbatch.cluster, llmbatch.pipelines):
            shutil.copytree(Path(layer.__file__).parent, root / layer.__name__.rsplit(".", 1)[1],
                            ignore=NOT_SHIPPED, dirs_exist_ok=True)
        if job_text is not None:
            (root / SHIPPED_JOB).write_text(job_text, encoding="utf-8")
        yield str(root)


def own_modules(spec: JobSpec) -> list[Path]:
    """The top-level modules of the job's python scorers that are the submitter's own code (a file or folder
    outside the installed packages): they ship with the job, as Ray's py_modules."""
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages(), *(
        sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib"))] if p}
    found: list[Path] = []
    for scorer in spec.scoring:
        if scorer.kind != "python":
            continue
        top = scorer.function.split(":", 1)[0].split(".", 1)[0]
        module = importlib.util.find_spec(top) if top != "llmbatch" else None
        if module is None:
            continue
        if module.submodule_search_locations:
            place = Path(list(module.submodule_search_locations)[0])
        elif module.origin and module.origin.endswith(".py"):
            place = Path(module.origin)
        else:
            continue
        if not any(parent in installed for parent in place.resolve().parents) and place not in found:
            found.append(place)
    return found


@contextmanager
def shipped_modules(places: list[Path]) -> Iterator[list[str]]:
    """Each module of `places` as a folder Ray's py_modules uploads: a package as it is, a single-file module
    as a package of that name whose __init__.py is the file."""
    if not places:
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="llmbatch-ship-own-") as folder:
        shipped = []
        for place in places:
            target = Path(folder) / (place.name if place.is_dir() else place.stem)
            if place.is_dir():
                shutil.copytree(place, target, ignore=NOT_SHIPPED)
            else:
                target.mkdir()
                shutil.copy(place, target / "__init__.py")
            shipped.append(str(target))
        yield shipped


def shipped_job_file() -> str:
    """Where the job file submit_to_cluster shipped is: in the `llmbatch` folder of the runtime env's package,
    which Ray puts on the driver's path (an llmbatch installed on the node may be the one imported)."""
    import llmbatch

    places = [Path(llmbatch.__file__).parent] + [Path(entry) / "llmbatch" for entry in sys.path if entry]
    for place in places:
        if (place / SHIPPED_JOB).is_file():
            return str(place / SHIPPED_JOB)
    raise UserError(f"--on-cluster: no {SHIPPED_JOB} in the llmbatch package on this driver's path; this driver "
                    "was not started by llmbatch submit --address")


def _submission_ids(run_id: str) -> Iterator[str]:
    yield run_id
    for number in itertools.count(2):
        yield f"{run_id}.attempt-{number}"


def _status(info) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def attempts(address: str, run_id: str) -> list:
    """Every submission of `run_id` on the cluster, oldest first."""
    jobs = client(address)
    with jobs_api_errors(address):
        details = jobs.list_jobs()
    mine = [info for info in details if info.submission_id == run_id
            or ((info.metadata or {}).get(METADATA_MARK) == "1" and (info.metadata or {}).get("run_id") == run_id)]
    return sorted(mine, key=lambda info: info.start_time or 0)


def job_info(address: str, run_id: str):
    """The newest submission of `run_id`."""
    return _newest(attempts(address, run_id), address, run_id)


def _newest(found: list, address: str, run_id: str):
    if not found:
        raise UserError(f"no run '{run_id}' on the Ray cluster at {address}")
    return found[-1]


def describe_status(address: str, run_id: str) -> dict[str, Any]:
    found = attempts(address, run_id)
    info = _newest(found, address, run_id)
    status = {
        "run_id": run_id,
        "status": _status(info),
        "message": info.message,
        "job": (info.metadata or {}).get("job"),
        "model": (info.metadata or {}).get("model"),
        "output": (info.metadata or {}).get("output"),
        "started": _timestamp(info.start_time),
        "ended": _timestamp(info.end_time),
        "attempts": len(found),
        "submission": info.submission_id,
    }
    if status["status"] in TERMINAL and status["output"]:
        status.update(manifest_counts(status["output"]))
    return status


def manifest_counts(run_uri: str) -> dict[str, Any]:
    """Row counts from the run's manifest, when the client can read the output location."""
    try:
        manifest = read_manifest(run_uri)
    except (UserError, OSError, ValueError):
        return {}
    return {"rows_ok": manifest.rows.ok, "rows_error": manifest.rows.error, "run_status": manifest.status,
            "wall_seconds": manifest.wall_seconds, "cost_usd": manifest.cost.usd if manifest.cost else None}


def list_runs(address: str) -> list[dict[str, Any]]:
    """One row per run id: its newest attempt."""
    jobs = client(address)
    with jobs_api_errors(address):
        details = jobs.list_jobs()
    newest: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for info in details:
        meta = info.metadata or {}
        if meta.get(METADATA_MARK) != "1":
            continue
        run_id = meta.get("run_id") or info.submission_id
        counts[run_id] = counts.get(run_id, 0) + 1
        if run_id not in newest or (info.start_time or 0) >= (newest[run_id].start_time or 0):
            newest[run_id] = info
    runs = []
    for run_id, info in newest.items():
        meta = info.metadata or {}
        status = _status(info)
        row = {"run_id": run_id, "status": status, "job": meta.get("job"), "model": meta.get("model"),
               "started": _timestamp(info.start_time), "start_ms": info.start_time or 0,
               "attempts": counts[run_id], "output": meta.get("output")}
        if status in TERMINAL and meta.get("output"):
            row.update(manifest_counts(meta["output"]))
        runs.append(row)
    return sorted(runs, key=lambda r: r["start_ms"], reverse=True)


def logs(address: str, run_id: str) -> str:
    submission = job_info(address, run_id).submission_id
    jobs = client(address)
    with jobs_api_errors(address):
        return jobs.get_job_logs(submission)


def follow_logs(address: str, run_id: str, emit: Callable[[str], None], submission: str | None = None) -> None:
    submission = submission or job_info(address, run_id).submission_id
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(submission):
            emit(chunk)

    with jobs_api_errors(address), ray_client_quiet():
        asyncio.run(tail())


def cancel(address: str, run_id: str, timeout: float = 120.0) -> str:
    submission = job_info(address, run_id).submission_id
    jobs = client(address)
    with jobs_api_errors(address):
        jobs.stop_job(submission)
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = str(jobs.get_job_status(submission).value)
            if status in TERMINAL:
                return status
            time.sleep(1)
    return "STOPPING"


def wait_for(address: str, run_id: str, emit: Callable[[str], None], submission: str | None = None) -> str:
    """Stream an attempt's logs (default: the newest) until it ends; return its final status."""
    submission = submission or job_info(address, run_id).submission_id
    follow_logs(address, run_id, emit, submission)
    jobs = client(address)
    with jobs_api_errors(address):
        for _ in range(60):
            status = str(jobs.get_job_status(submission).value)
            if status in TERMINAL:
                return status
            time.sleep(1)
    return status


def _timestamp(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def submit_command(address: str, args: list[str], submission_id: str, metadata: dict[str, str]) -> str:
    """Run `python -m llmbatch.jobs.cli ARGS` on the cluster as a Ray job, with the llmbatch package shipped the
    way submit_to_cluster ships it (for commands that set up the cluster, such as deploying the scheduler)."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    entrypoint = " ".join(["python", "-m", "llmbatch.jobs.cli", *(shlex.quote(a) for a in args)])
    jobs = client(address)
    with shipped_package() as package, jobs_api_errors(address):
        jobs.submit_job(entrypoint=entrypoint, submission_id=submission_id, metadata=metadata,
                        runtime_env={"py_modules": [package], "env_vars": env_vars})
    return submission_id


def wait_until_done(address: str, submission_id: str, timeout: float) -> tuple[str, str]:
    """(status, logs) of a submission once it ended, or after `timeout` seconds."""
    jobs = client(address)
    deadline = time.time() + timeout
    with jobs_api_errors(address):
        status = str(jobs.get_job_status(submission_id).value)
        while status not in TERMINAL and time.time() < deadline:
            time.sleep(1)
            status = str(jobs.get_job_status(submission_id).value)
        return status, jobs.get_job_logs(submission_id)


class JobsApiRunner:
    """The scheduler's way to the cluster: runs submitted, watched and stopped through the Jobs API as
    `submit --address` does, outcomes read from the runs' manifests."""

    def __init__(self, address: str):
        self.address = address

    def submit(self, spec: JobSpec, run_id: str, metadata: dict[str, str], overwrite: bool = False) -> str:
        return submit_to_cluster(spec, run_id, self.address, overwrite=overwrite,
                                 extra_metadata=metadata).submission_id

    def status(self, run_id: str) -> tuple[str | None, str | None]:
        found = attempts(self.address, run_id)
        if not found:
            return None, None
        return _status(found[-1]), found[-1].message

    def stop(self, run_id: str) -> None:
        jobs = client(self.address)
        with jobs_api_errors(self.address):
            jobs.stop_job(job_info(self.address, run_id).submission_id)

    def outcome(self, run_uri: str) -> dict[str, Any] | None:
        try:
            manifest = read_manifest(run_uri)
        except (UserError, OSError, ValueError):
            return None
        return {"status": manifest.status, "rows_ok": manifest.rows.ok, "rows_error": manifest.rows.error,
                "wall_seconds": manifest.wall_seconds, "cost_usd": manifest.cost.usd if manifest.cost else None}
