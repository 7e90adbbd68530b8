"""Jobs on a Ray cluster through the Jobs API: submit, status, logs, list, cancel."""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from cluster.jobs_api import METADATA_MARK, client, jobs_api_errors
from jobs.errors import UserError
from jobs.spec import JobSpec
from pipelines.manifest import read_manifest
from pipelines.storage import join

PACKAGES = ("jobs", "cluster", "pipelines")
SPEC_ENV = "LLMBATCH_JOB_SPEC"
# Endpoint and region settings the cluster needs to reach the same storage; never credentials.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class Submission:
    run_id: str
    address: str
    run_uri: str


def submit_to_cluster(spec: JobSpec, run_id: str, address: str, *, overwrite: bool = False) -> Submission:
    """Send the job to the cluster: the project code and the resolved job file travel in the runtime env."""
    run_uri = join(spec.output.path, run_id)
    package_root = Path(__file__).resolve().parents[1]
    # No working_dir: Ray may re-extract a job's working_dir under its running driver. The resolved
    # job file travels in the job's environment and reaches the entrypoint on standard input.
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env_vars[SPEC_ENV] = yaml.safe_dump(spec.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
    runtime_env: dict[str, Any] = {
        "py_modules": [str(package_root / name) for name in PACKAGES],
        "env_vars": env_vars,
    }
    metadata = {METADATA_MARK: "1", "job": spec.name, "run_id": run_id, "model": spec.model.source,
                "output": run_uri}
    entrypoint = f'printenv {SPEC_ENV} | python -m jobs.cli submit - --run-id {run_id} --on-cluster'
    if overwrite:
        entrypoint += " --overwrite"
    jobs = client(address)
    with jobs_api_errors(address):
        jobs.submit_job(entrypoint=entrypoint, submission_id=run_id, runtime_env=runtime_env, metadata=metadata)
    return Submission(run_id, address, run_uri)


def job_info(address: str, run_id: str):
    jobs = client(address)
    with jobs_api_errors(address):
        try:
            return jobs.get_job_info(run_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                raise UserError(f"no run '{run_id}' on the Ray cluster at {address}") from None
            raise


def describe_status(address: str, run_id: str) -> dict[str, Any]:
    info = job_info(address, run_id)
    status = {
        "run_id": run_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "job": (info.metadata or {}).get("job"),
        "model": (info.metadata or {}).get("model"),
        "output": (info.metadata or {}).get("output"),
        "started": _timestamp(info.start_time),
        "ended": _timestamp(info.end_time),
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
    return {"rows_ok": manifest["rows"]["ok"], "rows_error": manifest["rows"]["error"],
            "run_status": manifest["status"]}


def list_runs(address: str) -> list[dict[str, Any]]:
    jobs = client(address)
    with jobs_api_errors(address):
        details = jobs.list_jobs()
    runs = []
    for info in details:
        meta = info.metadata or {}
        if meta.get(METADATA_MARK) != "1":
            continue
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        row = {"run_id": info.submission_id, "status": status, "job": meta.get("job"), "model": meta.get("model"),
               "started": _timestamp(info.start_time), "start_ms": info.start_time or 0}
        if status in TERMINAL and meta.get("output"):
            row.update(manifest_counts(meta["output"]))
        runs.append(row)
    return sorted(runs, key=lambda r: r["start_ms"], reverse=True)


def logs(address: str, run_id: str) -> str:
    job_info(address, run_id)
    jobs = client(address)
    with jobs_api_errors(address):
        return jobs.get_job_logs(run_id)


def follow_logs(address: str, run_id: str, emit: Callable[[str], None]) -> None:
    job_info(address, run_id)
    jobs = client(address)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(run_id):
            emit(chunk)

    with jobs_api_errors(address):
        asyncio.run(tail())


def cancel(address: str, run_id: str, timeout: float = 120.0) -> str:
    job_info(address, run_id)
    jobs = client(address)
    with jobs_api_errors(address):
        jobs.stop_job(run_id)
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = str(jobs.get_job_status(run_id).value)
            if status in TERMINAL:
                return status
            time.sleep(1)
    return "STOPPING"


def wait_for(address: str, run_id: str, emit: Callable[[str], None]) -> str:
    """Stream the run's logs until it ends; return its final status."""
    follow_logs(address, run_id, emit)
    jobs = client(address)
    with jobs_api_errors(address):
        for _ in range(60):
            status = str(jobs.get_job_status(run_id).value)
            if status in TERMINAL:
                return status
            time.sleep(1)
    return status


def _timestamp(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"
