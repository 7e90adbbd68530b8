"""Plans before a run and measurements after it: every finished run makes the next plan closer."""
from __future__ import annotations

from typing import Any

from cluster import profiles
from cluster.accelerators import Accelerator
from jobs.spec import JobSpec


def device_for(spec: JobSpec, accelerator: str) -> Accelerator:
    """The priced accelerator a run uses: CPU, or the job's GPU type (A10G when it names none)."""
    from jobs.plan import accelerator_for

    if accelerator == "cpu":
        return accelerator_for(spec.model_copy(update={"resources": spec.resources.model_copy(
            update={"accelerator": "cpu", "accelerator_type": None})}), None)
    return accelerator_for(spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"accelerator": "gpu"})}), None)


def predict(spec: JobSpec, device: Accelerator, fingerprint: str, log, *, required: bool):
    """The plan for this run when a profile exists to base it on, or when `replicas: auto` needs one anyway."""
    from jobs.plan import engine_settings, plan_job

    if not required and profiles.load(profiles.profile_key(fingerprint, device.name,
                                                           engine_settings(spec, device))) is None:
        return None
    return plan_job(spec, device.name, log=log)


def record_run(manifest: dict[str, Any], fingerprint: str, device: Accelerator, engine: dict[str, Any],
               plan, source: str, log) -> None:
    """Add the run's measured rates (and how far the plan was off) to the model's profile."""
    key = profiles.profile_key(fingerprint, device.name, engine)
    measurement = profiles.measurement_from_manifest(manifest, f"{source}:{manifest['run_id']}")
    prediction = None
    if plan is not None:
        prediction = {"run_id": manifest["run_id"], "predicted_wall_seconds": plan.wall_seconds,
                      "measured_wall_seconds": manifest["wall_seconds"], "rows": manifest["rows"]["in"],
                      "replicas": plan.replicas}
    identity = {"model_source": manifest["model"]["source"], "model_fingerprint": fingerprint,
                "accelerator": device.name, "engine": engine}
    try:
        profiles.record(key, identity, measurement, prediction)
        log.info("profile_updated", profile=key, measured=bool(measurement))
    except Exception as exc:  # a profile store outage must not fail a finished run
        log.warning("profile_update_failed", profile=key, error=f"{type(exc).__name__}: {exc}")
