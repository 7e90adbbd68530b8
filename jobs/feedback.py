"""Plans before a run and measurements after it: every finished run makes the next plan closer."""
from __future__ import annotations

from typing import Any

from llmbatch.cluster import profiles
from llmbatch.cluster.accelerators import ACCELERATORS, Accelerator
from llmbatch.jobs.spec import JobSpec
from llmbatch.run_manifest import Manifest

PREFILL_SOURCE = "profile-prefill"  # a calibration run of one output token per request


def device_for(spec: JobSpec, accelerator: str) -> Accelerator:
    """The priced accelerator a run uses: CPU, or the job's GPU type (A10G when it names none)."""
    from llmbatch.jobs.plan import accelerator_for

    if accelerator == "cpu":
        return ACCELERATORS["CPU"]
    return accelerator_for(spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"accelerator": "gpu"})}), None)


def predict(spec: JobSpec, accelerator: str, fingerprint: str, log, *, required: bool):
    """(priced accelerator, plan) for this run. The plan exists when a profile backs it, or always for
    `replicas: auto`; for a fixed pool, sizing is advice and its failures only warn."""
    from llmbatch.jobs.plan import engine_settings, plan_job

    device = None
    try:
        device = device_for(spec, accelerator)
        if not required and profiles.load(profiles.profile_key(fingerprint, device.name,
                                                               engine_settings(spec, device))) is None:
            return device, None
        return device, plan_job(spec, device.name, log=log)
    except Exception as exc:  # for a fixed pool the plan is advice: the run goes on, priced when the device is known
        if required:
            raise
        log.warning("no_prediction", reason=f"{type(exc).__name__}: {exc}")
        return device, None


def record_run(manifest: Manifest | dict[str, Any], fingerprint: str, device: Accelerator, engine: dict[str, Any],
               plan, source: str, log) -> None:
    """Add the run's measured rates (and how far the plan was off) to the model's profile."""
    manifest = Manifest.model_validate(manifest)
    key = profiles.profile_key(fingerprint, device.name, engine)
    label = f"{source}:{manifest.run_id}"
    if source == PREFILL_SOURCE:
        measurement, prefill = None, profiles.prefill_from_manifest(manifest, label)
    else:
        measurement, prefill = profiles.measurement_from_manifest(manifest, label), None
    prediction = None
    if plan is not None and source != PREFILL_SOURCE:
        prediction = {"run_id": manifest.run_id, "predicted_wall_seconds": plan.wall_seconds,
                      "measured_wall_seconds": manifest.measured_seconds, "rows": manifest.rows.in_,
                      "replicas": plan.replicas}
    identity = {"model_source": manifest.model.source, "model_fingerprint": fingerprint,
                "accelerator": device.name, "engine": engine}
    try:
        profiles.record(key, identity, measurement, prediction, prefill)
        log.info("profile_updated", profile=key, measured=bool(measurement or prefill))
    except Exception as exc:  # a profile store outage must not fail a finished run
        log.warning("profile_update_failed", profile=key, error=f"{type(exc).__name__}: {exc}")
