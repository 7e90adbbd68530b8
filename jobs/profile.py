"""`llmbatch profile`: measure a model's per-replica throughput on real prompts and store it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmbatch.jobs.spec import JobSpec, validate_spec
from llmbatch.run_manifest import Manifest

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
                  engine: dict[str, Any] | None = None, log=None) -> tuple[Manifest, Manifest]:
    """Run the sample through the real pipeline (one replica) twice: as configured, then with one output
    token per request so prefill is measured alone. Each run records itself in the profile store.
    Returns both manifests (generation, prefill)."""
    from llmbatch.cluster.home import llmbatch_home
    from llmbatch.jobs.feedback import PREFILL_SOURCE
    from llmbatch.jobs.run import new_run_id, run_job

    runs = str(llmbatch_home() / "profile-runs")
    spec = calibration_spec(source, input_path, samples, max_tokens, runs, engine)
    generation = run_job(spec, new_run_id("profile"), log=log, measurement_source="profile")
    prefill_spec = calibration_spec(source, input_path, samples, 1, runs, engine)
    prefill = run_job(prefill_spec, new_run_id("profile-prefill"), log=log, measurement_source=PREFILL_SOURCE)
    return generation.manifest, prefill.manifest
