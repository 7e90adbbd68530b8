"""Finalizing a run: count what it wrote, check it against its input, and commit the manifest last."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from llmbatch.crash_points import crash_point
from llmbatch.jobs.resolve import ResolvedJob
from llmbatch.jobs.spec import JobSpec
from llmbatch.pipelines.error_rows import ErrorRowsWriter
from llmbatch.pipelines.manifest import OutputTally, remove_parts, remove_staging, write_manifest
from llmbatch.pipelines.readback import read_back
from llmbatch.pipelines.result_cache import CacheEntriesWriter, CacheNamespace
from llmbatch.pipelines.resume import FinishedWork
from llmbatch.pipelines.run_files import ERRORS_DIR, STAGING_DIR, SUMMARY_NAME, output_parts, part_generation
from llmbatch.pipelines.run_summary import ScoreStats, summary_of, write_summary
from llmbatch.pipelines.timings import run_timings
from llmbatch.run_manifest import Manifest
from llmbatch.storage import filesystem_for, join, storage_errors
from llmbatch.versions import software_versions


@dataclass
class Execution:
    """What running the passes produced, beside the parts they wrote."""
    run_id: str
    run_uri: str
    started: float
    started_at: str
    marks: dict[str, float | None]
    input_rows: int
    duplicate_ids: int
    rows_per_file: dict[str, int | None]
    replicas: list[dict[str, Any]]            # each replica's report (ProgressCounter)
    engine: dict[str, Any]                    # the manifest's engine section
    fingerprint: str
    generation_seconds: float
    finished: FinishedWork | None             # the earlier attempt's rows a resume kept
    automatic_resume: bool
    cache: CacheNamespace | None             # the result cache this run reads and adds to
    judge_stats: dict[str, Any]
    sizing: Any                               # jobs.plan.Plan, or None without a prediction
    device: Any                               # the priced accelerator (cluster.accelerators), or None
    cost: dict[str, Any] | None
    judges_staged: bool


def own_parts(run: Execution, generation: int) -> set[str]:
    """The parts that make this run's output: those this attempt's lock generation wrote, and those the resume
    kept (when the first pass wrote into the run folder itself)."""
    fs, inner = filesystem_for(run.run_uri)
    with storage_errors(run.run_uri, "list the parts of"):
        names = [p[len(inner):].lstrip("/") for p in output_parts(fs, inner)]
    kept = set(run.finished.kept) if run.finished and not run.judges_staged else set()
    return {name for name in names if part_generation(name) == generation} | kept


def commit(job: ResolvedJob, run: Execution, lock, log) -> tuple[Manifest, dict[str, Any]]:
    """Read the parts back once (tally, error rows, the summary's figures, new cache entries), write the
    summary, then the manifest (the commit marker). Returns (manifest, summary). Only while `lock` (the run's
    RunLock) is held: the run's parts are this attempt's and those the resume kept, and nothing is written for
    a run another driver took."""
    spec = job.spec
    lock.check("committing")
    strays = remove_parts(run.run_uri, own_parts(run, lock.generation))
    if strays:
        log.warning("stray_parts_removed", parts=strays, note="written under an earlier lock generation after "
                    "this attempt started; their rows are in this attempt's own parts")
    scorers = list(spec.scoring)
    tally, errors, stats = OutputTally(), ErrorRowsWriter(run.run_uri), ScoreStats(scorers)
    entries = CacheEntriesWriter(run.cache, run.run_id) if run.cache else None
    tally.files = read_back(run.run_uri, [tally, errors, stats] + ([entries] if entries else []))
    cache_stats = entries.result() if entries else None
    if cache_stats and cache_stats.get("write_error"):
        log.warning("cache_write_failed", error=cache_stats["write_error"], entries_written=cache_stats[
            "entries_written"], note="the run commits without adding the rest of its rows to the cache")
    elif cache_stats:
        log.info("cache_updated", hits=cache_stats["hits"], entries_written=cache_stats["entries_written"],
                 cache=run.cache.uri)
    error_rows = errors.result()
    problems = output_problems(spec, tally, run.input_rows, run.duplicate_ids, run.run_uri)
    status = "failed" if problems else "succeeded" if tally.errors == 0 else "succeeded_with_errors"
    reused = bool(run.finished and run.finished.rows) or bool(cache_stats and cache_stats["hits"])
    # a resumed or cached run generated only the rows it did not find written or cached
    generated_now = sum(r.get("generated_tokens", 0) for r in run.replicas) if reused else tally.generated_tokens
    run.marks["commit_done"] = now = time.time()
    timings = run_timings(run.marks, run.replicas)
    seconds = run.generation_seconds
    record = {
        "schema_version": 1,
        "run_id": run.run_id,
        "job": spec.name,
        "status": status,
        "problems": problems,
        "started_at": run.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "spec": spec.model_dump(mode="json"),
        "versions": software_versions(),
        "model": {"source": spec.model.source, "path": str(job.model.path), "fingerprint": run.fingerprint},
        "engine": run.engine,
        "replicas": run.replicas,
        "input": {"files": [{"path": f.uri, "size": f.size, "rows": run.rows_per_file.get(f.uri)}
                            for f in job.input.files]},
        "output": {"path": run.run_uri, "files": tally.files},
        "rows": {"in": run.input_rows, "out": tally.rows, "ok": tally.ok, "error": tally.errors,
                 "duplicate_ids": run.duplicate_ids},
        "errors": error_rows,
        "resumed": {**run.finished.to_dict(), "automatic": run.automatic_resume} if run.finished else None,
        "cache": cache_section(spec, run.cache, cache_stats, run.input_rows),
        "tokens": {"input": tally.input_tokens, "generated": tally.generated_tokens},
        "wall_seconds": round(now - run.started, 3),
        "startup_seconds": timings["first_row"],
        "timings": timings,
        "plan": run.sizing.to_dict() if run.sizing is not None else None,
        "judges": run.judge_stats,
        "generation_seconds": round(seconds, 3),
        "output_tokens_per_second": round(generated_now / seconds, 3) if seconds > 0 else None,
        "cost": run.cost,
    }
    summary = summary_of(stats, scorers, record)
    lock.check("writing the manifest")
    write_summary(run.run_uri, summary)
    crash_point("summary")
    manifest = Manifest.model_validate({**record, "summary": SUMMARY_NAME})
    write_manifest(run.run_uri, manifest)
    crash_point("manifest")
    if run.judges_staged:
        remove_staging(join(run.run_uri, STAGING_DIR))
    return manifest, summary


def output_problems(spec: JobSpec, tally, input_rows: int, duplicate_ids: int, run_uri: str) -> list[str]:
    """Why the written output cannot be committed as a success."""
    problems = []
    error_rate = tally.errors / tally.rows if tally.rows else 0.0
    if error_rate > spec.output.max_error_rate:
        problems.append(f"{tally.errors} of {tally.rows} rows ({error_rate:.1%}) are errors, more than "
                        f"output.max_error_rate {spec.output.max_error_rate:g}; see {join(run_uri, ERRORS_DIR)}")
    if tally.rows != input_rows:
        problems.append(f"wrote {tally.rows} rows for {input_rows} input rows")
    if tally.distinct_ids != tally.rows - duplicate_ids:
        problems.append(f"{tally.rows - duplicate_ids - tally.distinct_ids} unexpected duplicate ids in the output")
    return problems


def cache_section(spec: JobSpec, cache: CacheNamespace | None, stats: dict[str, int] | None,
                  rows: int) -> dict[str, Any] | None:
    if spec.cache is None:
        return None
    if cache is None:
        return {"path": spec.cache.path, "used": False,
                "reason": "sampling is not repeatable (temperature > 0, no seed)"}
    hits = stats["hits"] if stats else 0
    return {"path": spec.cache.path, "used": True, "namespace": cache.namespace, "hits": hits,
            "hit_rate": round(hits / rows, 4) if rows else 0.0,
            "entries_written": stats["entries_written"] if stats else 0,
            **({"write_error": stats["write_error"]} if stats and stats.get("write_error") else {})}


def run_cost(generation_seconds: float, devices: int, device, judges: dict[str, Any]) -> dict[str, Any] | None:
    """What the run's devices cost at the planner's hourly price (LLMBATCH_PRICES' file when it lists the device):
    generation, plus each judge pass's own devices."""
    if device is None:
        return None
    hourly = hourly_price(device)
    generation = generation_seconds / 3600 * devices * hourly
    judging = sum(j["wall_seconds"] / 3600 * j["devices"] * hourly for j in judges.values())
    return {"usd": round(generation + judging, 6), "generation_usd": round(generation, 6),
            "judges_usd": round(judging, 6), "devices": devices, "device": device.name,
            "hourly_usd_per_device": hourly}


def hourly_price(device) -> float:
    """A bad price file does not fail a run that has done its work: its cost is then at the list price."""
    from llmbatch.cluster.accelerators import price_of
    from llmbatch.errors import UserError

    try:
        return price_of(device).usd_per_hour
    except UserError:
        return device.hourly_usd
