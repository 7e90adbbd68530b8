"""`llmbatch profile`: measure a model's per-replica throughput on real prompts and store it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.spec import JobSpec, validate_spec

CALIBRATION_PROMPTS = Path(__file__).resolve().parent / "data" / "calibration.jsonl"


def calibration_spec(source: str, input_path: str | None, samples: int, max_tokens: int, output: str,
                     engine: dict[str, Any] | None = None) -> JobSpec:
    return validate_spec({
        "name": "profile",
        "model": {"source": source, "engine": engine or {}},
        "input": {"path": input_path or str(CALIBRATION_PROMPTS), "limit": samples},
        "sampling": {"max_tokens": max_tokens, "temperature": 0.0},
        "output": {"path": output},
        "resources": {"replicas": 1},
    })


def profile_model(source: str, *, input_path: str | None, samples: int, max_tokens: int,
                  engine: dict[str, Any] | None = None, log=None) -> dict[str, Any]:
    """Run the sample through the real pipeline (one replica); the run records itself in the profile store."""
    from cluster.home import llmbatch_home
    from jobs.run import new_run_id, run_job

    spec = calibration_spec(source, input_path, samples, max_tokens, str(llmbatch_home() / "profile-runs"), engine)
    result = run_job(spec, new_run_id("profile"), log=log, measurement_source="profile")
    return result.manifest
