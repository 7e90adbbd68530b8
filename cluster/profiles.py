"""Throughput profiles: measured per-replica rates of a model on an accelerator with given engine settings.

Stored as one JSON file per key under $LLMBATCH_HOME/profiles, or under LLMBATCH_PROFILE_STORE
(a local directory or an s3:// prefix) so a team shares them.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from llmbatch.cluster.home import llmbatch_home
from llmbatch.run_manifest import Manifest
from llmbatch.storage import filesystem_for, full_uri, join, read_json, storage_errors, write_whole

STORE_ENV = "LLMBATCH_PROFILE_STORE"


def store_root() -> str:
    return os.environ.get(STORE_ENV) or str(llmbatch_home() / "profiles")


def profile_key(fingerprint: str, accelerator: str, engine: dict[str, Any]) -> str:
    settings = {k: engine.get(k) for k in ("dtype", "max_model_len", "tensor_parallel_size", "enable_prefix_caching")}
    blob = json.dumps([fingerprint, accelerator.upper(), settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Rates:
    """What a plan needs from a profile."""
    output_tokens_per_second: float   # per replica, while busy
    input_tokens_per_second: float    # per replica, prompt tokens processed while busy (with decoding)
    requests_per_second: float
    startup_seconds: float            # submit until the first batch finished: Ray, engine load, warm-up
    mean_input_tokens: float
    mean_output_tokens: float
    measurements: int
    prefill_tokens_per_second: float | None = None  # per replica, measured alone (one output token per request)

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Output tokens per second of decoding alone: the busy time minus what prefill took."""
        if not self.prefill_tokens_per_second or not self.requests_per_second:
            return None
        per_request = 1.0 / self.requests_per_second
        prefill = self.mean_input_tokens / self.prefill_tokens_per_second
        decoding = max(per_request - prefill, 0.1 * per_request)
        return self.mean_output_tokens / decoding if self.mean_output_tokens else None

    def replica_seconds(self, input_tokens: float, output_tokens: float) -> float:
        """Busy replica-seconds for this much work: prefill and decode apart when both were measured."""
        decode = self.decode_tokens_per_second
        if decode:
            return input_tokens / self.prefill_tokens_per_second + output_tokens / decode
        return output_tokens / self.output_tokens_per_second


def measurement_from_manifest(manifest: Manifest | dict[str, Any], source: str) -> dict[str, Any] | None:
    """Per-replica rates from a finished run's manifest (None when no replica reported work)."""
    manifest = Manifest.model_validate(manifest)
    replicas, busy = _busy_replicas(manifest)
    rows, tokens = manifest.rows, manifest.tokens
    if busy <= 0 or not rows.ok:
        return None
    return {
        "source": source,
        "at": datetime.now(timezone.utc).isoformat(),
        "rows": rows.ok,
        "replicas": len(replicas),
        "replica_busy_seconds": round(busy, 3),
        "wall_seconds": manifest.measured_seconds,  # judge passes excluded
        "startup_seconds": manifest.startup_seconds,
        "input_tokens": tokens.input,
        "output_tokens": tokens.generated,
        "output_tokens_per_second": round(tokens.generated / busy, 3),
        "input_tokens_per_second": round(tokens.input / busy, 3),
        "requests_per_second": round(rows.ok / busy, 4),
        "mean_input_tokens": round(tokens.input / max(1, rows.in_), 2),
        "mean_output_tokens": round(tokens.generated / max(1, rows.ok), 2),
        "max_tokens": manifest.spec["sampling"]["max_tokens"],
    }


def prefill_from_manifest(manifest: Manifest | dict[str, Any], source: str) -> dict[str, Any] | None:
    """Prompt tokens per second of a run that generated one token per request (prefill alone)."""
    manifest = Manifest.model_validate(manifest)
    _, busy = _busy_replicas(manifest)
    tokens = manifest.tokens
    if busy <= 0 or not manifest.rows.ok or not tokens.input:
        return None
    return {
        "source": source,
        "at": datetime.now(timezone.utc).isoformat(),
        "rows": manifest.rows.ok,
        "input_tokens": tokens.input,
        "replica_busy_seconds": round(busy, 3),
        "prefill_tokens_per_second": round(tokens.input / busy, 3),
    }


def _busy_replicas(manifest: Manifest) -> tuple[list[dict[str, Any]], float]:
    """The replicas that finished a batch, and their seconds from first to last batch, summed."""
    replicas = [r for r in manifest.replicas if r.get("first_batch_at") and r.get("last_batch_at")]
    return replicas, sum(r["last_batch_at"] - r["first_batch_at"] for r in replicas)


def load(key: str) -> dict[str, Any] | None:
    return read_json(join(store_root(), f"{key}.json"), "read profile")


def for_model(fingerprint: str) -> list[dict[str, Any]]:
    """Every stored profile of the model with this fingerprint: on any accelerator, with any engine settings."""
    root = store_root()
    fs, inner = filesystem_for(root)
    with storage_errors(root, "list profiles"):
        if not fs.isdir(inner):
            return []
        names = sorted(name for name in fs.ls(inner, detail=False) if name.endswith(".json"))
    found = []
    for name in names:
        profile = read_json(full_uri(root, name), "read profile")
        if isinstance(profile, dict) and profile.get("model_fingerprint") == fingerprint:
            found.append(profile)
    return found


def save(profile: dict[str, Any]) -> str:
    uri = join(store_root(), f"{profile['key']}.json")
    fs, inner = filesystem_for(uri)
    with storage_errors(uri, "write profile"):
        write_whole(fs, inner, json.dumps(profile, indent=2).encode())
    return uri


def record(key: str, identity: dict[str, Any], measurement: dict[str, Any] | None,
           prediction: dict[str, Any] | None = None, prefill: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add a measurement (and the prediction it is checked against, or a prefill measurement) to the
    profile, creating it if new."""
    profile = load(key) or {"key": key, **identity, "measurements": [], "predictions": []}
    if measurement:
        profile["measurements"] = (profile["measurements"] + [measurement])[-50:]
    if prediction:
        profile["predictions"] = (profile["predictions"] + [prediction])[-50:]
    if prefill:
        profile["prefill"] = (profile.get("prefill", []) + [prefill])[-50:]
    save(profile)
    return profile


def rates(profile: dict[str, Any] | None) -> Rates | None:
    """Token-weighted rates over every measurement; startup is the median of those that recorded it."""
    if not profile or not profile.get("measurements"):
        return None
    ms = profile["measurements"]
    prefill = profile.get("prefill") or []
    prefill_busy = sum(p["replica_busy_seconds"] for p in prefill)
    busy = sum(m["replica_busy_seconds"] for m in ms)
    rows = sum(m["rows"] for m in ms)
    startups = [m["startup_seconds"] for m in ms if m.get("startup_seconds") is not None]
    return Rates(
        output_tokens_per_second=sum(m["output_tokens"] for m in ms) / busy,
        input_tokens_per_second=sum(m["input_tokens"] for m in ms) / busy,
        requests_per_second=rows / busy,
        startup_seconds=statistics.median(startups) if startups else 0.0,
        mean_input_tokens=sum(m["input_tokens"] for m in ms) / max(1, rows),
        mean_output_tokens=sum(m["output_tokens"] for m in ms) / max(1, rows),
        measurements=len(ms),
        prefill_tokens_per_second=sum(p["input_tokens"] for p in prefill) / prefill_busy if prefill_busy else None,
    )


def prediction_errors(profile: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for p in (profile or {}).get("predictions", []):
        if p.get("predicted_wall_seconds") and p.get("measured_wall_seconds"):
            error = (p["predicted_wall_seconds"] - p["measured_wall_seconds"]) / p["measured_wall_seconds"]
            out.append({**p, "error": round(error, 4)})
    return out
