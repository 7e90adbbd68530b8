"""Where a run's time went: its phases, from the moments the driver and the engine replicas recorded."""
from __future__ import annotations

from typing import Any

from llmbatch.run_manifest import Timings


def run_timings(marks: dict[str, float], replicas: list[dict[str, Any]]) -> dict[str, float | None]:
    """Seconds per phase. `marks` holds epoch seconds the driver took:

    process (the CLI process started), started (the run began), started_ray, ray_ready, pre_pass_done,
    dataset_started (engine replicas were asked for), dataset_done (the last part was written), judges_done,
    commit_done (all but the manifest written). `replicas` are the progress counter's replica entries.

    - launch: process start to run start (imports, reading the job file)
    - prepare: input listing, the model's resolution and fingerprint, the run folder's checks
    - ray_start: the embedded Ray started (or the cluster joined)
    - pre_pass: the checks before any engine starts: sizing, the input scan
    - engine_start: replicas asked for to the first replica ready to take rows (process, imports, weights,
      KV cache)
    - first_row: the run's start to its first finished batch
    - generation: the first replica ready to the last batch finished
    - write: the last batch finished to the last part written
    - judges: the judge passes, each rereading the parts and running its own engines
    - commit: the tally, error rows, summary and cache entries
    A phase that did not happen (a resume with nothing left starts no engine) is None.
    """
    def span(start: float | None, end: float | None) -> float | None:
        if start is None or end is None:
            return None
        return round(max(0.0, end - start), 3)

    ready = _earliest(r.get("engine_ready_at") for r in replicas)
    first_batch = _earliest(r.get("first_batch_at") for r in replicas)
    last_batch = _latest(r.get("last_batch_at") for r in replicas)
    return {
        "launch": span(marks.get("process"), marks.get("started")),
        "prepare": span(marks.get("started"), marks.get("started_ray")),
        "ray_start": span(marks.get("started_ray"), marks.get("ray_ready")),
        "pre_pass": span(marks.get("ray_ready"), marks.get("pre_pass_done")),
        "engine_start": span(marks.get("dataset_started"), ready),
        "first_row": span(marks.get("started"), first_batch),
        "generation": span(ready, last_batch),
        "write": span(last_batch, marks.get("dataset_done")),
        "judges": span(marks.get("dataset_done"), marks.get("judges_done")),
        "commit": span(marks.get("judges_done") or marks.get("dataset_done") or marks.get("pre_pass_done"),
                       marks.get("commit_done")),
    }


def startup_line(timings: Timings | None) -> str | None:
    """One line for the final screen: start-up against generation."""
    if timings is None or timings.first_row is None:
        return None
    parts = [f"{label} {seconds:.1f}" for seconds, label in
             ((timings.ray_start, "Ray"), (timings.pre_pass, "pre-pass"), (timings.engine_start, "engines"))
             if seconds is not None]
    line = f"{timings.first_row:.1f} s to the first rows ({', '.join(parts)})"
    if timings.generation is not None:
        line += f", generation {timings.generation:.1f} s"
    return line


def _earliest(values) -> float | None:
    found = [v for v in values if v]
    return min(found) if found else None


def _latest(values) -> float | None:
    found = [v for v in values if v]
    return max(found) if found else None
