"""Run a job: resolve it, prepare its run folder, execute its passes on Ray, and commit the manifest.

The function behind `llmbatch submit`, on an embedded local Ray or, submitted through the Jobs API, on a cluster.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from concurrent.futures import Future, wait
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

import structlog

from llmbatch.cluster import model_store
from llmbatch.cluster.connect import alive_nodes, dashboard_url, join_cluster, start_local_ray
from llmbatch.cluster.diagnose import explain_failure
from llmbatch.cluster.gpu_memory import wait_for_free_memory
from llmbatch.cluster.resources import can_host, check_fits, choose_accelerator, replica_capacity, replica_shape
from llmbatch.cluster.scale_up import (DEFAULT_SCALE_UP_TIMEOUT, accelerator_to_come, ask_autoscaler,
                                      groups_can_host, node_groups, totals, wait_for_nodes)
from llmbatch.cluster.shared_paths import PathCheck, check_nodes_see
from llmbatch.crash_points import crash_point
from llmbatch.errors import JobFailed, UserError
from llmbatch.jobs.engines import engine_stage, row_limit
from llmbatch.jobs.feedback import predict, record_run
from llmbatch.jobs.finalize import Execution, commit, run_cost
from llmbatch.jobs.plan import check_planned_parallelism, engine_settings as plan_engine_settings
from llmbatch.jobs.resolve import ResolvedJob, ResolvedModel, resolve, schema_problems
from llmbatch.jobs.spec import JobSpec, parse_duration
from llmbatch.pipelines.infer import (EngineSettings, preload_engine_stage, release_placement_groups,
                                      wait_for_engine_stage_import)
from llmbatch.pipelines.judge import judge_sampling_params
from llmbatch.pipelines.manifest import remove_staging, staging_uri
from llmbatch.pipelines.progress_report import PassProgress, summarize
from llmbatch.pipelines.result_cache import CacheNamespace, cache_namespace, is_deterministic, write_key_file
from llmbatch.pipelines.resume import FinishedWork, write_attempt
from llmbatch.pipelines.run_folder import (
    AUTOMATIC_RESUME, RunStart, check_same_engine, decide_start, prepare_run_folder, read_folder_state,
)
from llmbatch.pipelines.run_lock import RunLock
from llmbatch.run_manifest import Manifest
from llmbatch.storage import is_s3, join, write_local
from llmbatch.versions import software_versions

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROGRESS_EVERY_SECONDS = 10.0
CLUSTER_PROGRESS_EVERY_SECONDS = 5.0
PROGRESS_LINE_REPLICAS = 8
LISTENER_EVERY_SECONDS = 1.0
STALL_WARNING_SECONDS = 600.0
PREDICTION_WAIT_SECONDS = 60.0


# A callable taking a pass's progress, called about every second while the pass runs.
progress_listener: ContextVar[Callable[[PassProgress], None] | None] = ContextVar("progress_listener", default=None)
# Whether `progress` log lines carry the replicas' states, for a live view that reads them (a cluster run's
# submitter): run_job sets it for a run on a cluster.
progress_lines_for_a_view: ContextVar[bool] = ContextVar("progress_lines_for_a_view", default=False)


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
    manifest: Manifest
    summary: dict[str, Any] | None = None


INPUT_FILES_CHECKED = 64
PROBE_TEXT = b"written by the run's driver, to see that every node sees this folder\n"


@dataclass
class Pool:
    """Where the job's engines run: the accelerator, the replica shape and range, and the live nodes."""
    accelerator: str
    shape: Any                       # cluster.resources.ReplicaShape
    replicas: tuple[int, int]
    nodes: dict[str, dict[str, float]]
    cluster: dict[str, float]
    auto: bool
    prediction: Future               # (device, sizing plan) from the planner
    asked_autoscaler: bool = False   # resources were requested of the autoscaler; withdrawn after the run


@dataclass
class Stages:
    """The passes of a run, built once the input is scanned on Ray."""
    inputs: Any                      # pipelines.pipeline.ScannedInput
    engine: EngineSettings
    cache: CacheNamespace | None
    context: Any                     # pipelines.pipeline.OutputContext
    judges: list[tuple[dict[str, Any], EngineSettings, int | None]]
    first_pass: str                  # where the first pass writes: the run folder, or staging before judges
    render: Any                      # pipelines.render.RenderSettings, at the engines' max_model_len


def run_job(spec: JobSpec, run_id: str | None = None, *, log=None, show_worker_logs: bool = False,
            on_cluster: bool = False, measurement_source: str = "run", overwrite: bool = False,
            resume: bool = False, dashboard: bool = False) -> RunResult:
    """Run `spec` end to end and commit its output with a manifest: resolve, decide how the run folder starts,
    build the passes on Ray, prepare the folder, execute, commit.

    With `resume`, an uncommitted earlier attempt at `run_id` keeps the rows it wrote and only the rest are
    computed; `overwrite` replaces a committed run (see pipelines/run_folder.py for every case)."""
    run_id = check_run_id(run_id) if run_id else new_run_id(spec.name)
    log = (log or structlog.get_logger()).bind(job=spec.name, run_id=run_id)
    marks: dict[str, float | None] = {"process": _process_started(), "started": time.time()}
    started_at = datetime.now(timezone.utc).isoformat()
    run_uri = join(spec.output.path, run_id)

    job = resolve(spec, run_uri=run_uri, fetch_later=True, scan_input=False, without_weights=on_cluster, log=log)
    log.info("input_listed", files=len(job.input.files), bytes=sum(f.size for f in job.input.files))
    lock = RunLock.acquire(run_uri, run_id, log)
    view_lines = progress_lines_for_a_view.set(on_cluster)
    try:
        return _run_held(job, lock, run_id, run_uri, marks, started_at, log, show_worker_logs=show_worker_logs,
                         on_cluster=on_cluster, measurement_source=measurement_source, overwrite=overwrite,
                         resume=resume, dashboard=dashboard)
    finally:
        progress_lines_for_a_view.reset(view_lines)
        lock.release()


def _run_held(job: ResolvedJob, lock: RunLock, run_id: str, run_uri: str, marks: dict[str, float | None],
              started_at: str, log, *, show_worker_logs: bool, on_cluster: bool, measurement_source: str,
              overwrite: bool, resume: bool, dashboard: bool = False) -> RunResult:
    """The run, once this driver holds its lock: nothing is deleted or written before."""
    job, start, attempt = _decide_and_fetch(job, run_id, run_uri, resume=resume, overwrite=overwrite,
                                            on_cluster=on_cluster, log=log)
    fingerprint = model_store.fingerprint_of(job.model.source, job.model.path)
    lock.check("starting Ray")
    marks["started_ray"] = time.time()
    log.info("ray_starting", cluster=on_cluster)
    cluster = join_cluster() if on_cluster else start_local_ray(show_worker_logs=show_worker_logs, dashboard=dashboard)
    marks["ray_ready"] = time.time()
    log.info("ray_started", cpus=cluster.get("CPU"), gpus=cluster.get("GPU", 0), dashboard=dashboard_url())
    pool = _size_pool(job, cluster, fingerprint, on_cluster, log)
    try:
        return _run_on_pool(job, pool, lock, start, attempt, fingerprint, run_id, run_uri, marks, started_at, log,
                            on_cluster=on_cluster, measurement_source=measurement_source)
    finally:
        if pool.asked_autoscaler:
            _withdraw_autoscaler_request(log)


def _run_on_pool(job: ResolvedJob, pool: Pool, lock: RunLock, start: RunStart, attempt: dict[str, Any],
                 fingerprint: str, run_id: str, run_uri: str, marks: dict[str, float | None], started_at: str, log,
                 *, on_cluster: bool, measurement_source: str) -> RunResult:
    """Build the passes on the pool, prepare the run folder, execute, commit."""
    try:
        if on_cluster:
            _check_nodes_see_the_paths(job, lock, list(pool.nodes), log)
        stages = _build_stages(job, pool, run_id, run_uri, fingerprint, on_cluster, marks, log)
        engine = {"dtype": stages.engine.engine_kwargs.get("dtype"), "engine": stages.engine.engine}
        check_same_engine(start, engine, run_id)
        lock.check("clearing the run folder")
        finished = prepare_run_folder(start, run_uri, stages.first_pass, len(stages.judges), log)
        write_attempt(run_uri, {**attempt, "engine": engine})
        crash_point("attempt")
    except BaseException:
        # the planner's thread may be inside native code (a tokenizer, Arrow): a process that exits under it aborts
        wait([pool.prediction], timeout=PREDICTION_WAIT_SECONDS)
        raise
    run = _execute_passes(job, stages, pool, run_id, run_uri, start, finished, fingerprint, started_at, marks,
                          lock, log)
    crash_point("parts")
    log.info("committing", output=run_uri)
    manifest, summary = commit(job, run, lock, log)
    _record_measurement(job, run, manifest, measurement_source, log)
    phases = manifest.timings.model_dump() if manifest.timings else {}
    log.info("run_finished", status=manifest.status, rows_ok=manifest.rows.ok, rows_error=manifest.rows.error,
             wall_seconds=round(manifest.wall_seconds, 1),
             **{f"{phase}_s": seconds for phase, seconds in phases.items() if seconds is not None})
    if manifest.status == "failed":
        raise JobFailed("; ".join(manifest.problems), manifest=manifest)
    return RunResult(run_id, run_uri, manifest.status, manifest, summary)


def _withdraw_autoscaler_request(log) -> None:
    """Let the nodes the run asked for scale down once it no longer needs them."""
    try:
        ask_autoscaler([])
    except Exception as exc:  # the run's outcome stands either way
        log.warning("autoscaler_request_not_withdrawn", error=f"{type(exc).__name__}: {exc}")


def _decide_and_fetch(job: ResolvedJob, run_id: str, run_uri: str, *, resume: bool, overwrite: bool,
                      on_cluster: bool, log) -> tuple[ResolvedJob, RunStart, dict[str, Any]]:
    """How the run folder starts and this attempt's record, decided under the run's lock; the models are
    fetched only once nothing refuses the run (on a cluster, only what the driver reads: the engines fetch
    the weights on their own nodes)."""
    spec, files = job.spec, job.input.files
    attempt = {"spec": spec.model_dump(mode="json"), "input_files": [f.identity() for f in files]}
    start = decide_start(read_folder_state(run_uri), attempt, resume=resume, overwrite=overwrite, run_id=run_id,
                         run_uri=run_uri)
    if any(model.path is None for model in (job.model, *job.judges)):
        job = resolve(spec, run_uri=run_uri, fetch_models=True, scan_input=False, without_weights=on_cluster,
                      log=log)
    if job.model.engine == "vllm":
        preload_engine_stage()
    return job, start, attempt


def _build_stages(job: ResolvedJob, pool: Pool, run_id: str, run_uri: str, fingerprint: str, on_cluster: bool,
                  marks: dict[str, float | None], log) -> Stages:
    """Scan the input on Ray (the pre-pass), then settle the engine, the cache, the output and the judges."""
    from llmbatch.pipelines.pipeline import OutputContext, scan_inputs
    from llmbatch.pipelines.progress import progress_actor_name

    spec = job.spec
    inputs = scan_inputs(list(job.input.files), spec.input.limit, dict(job.required_columns), spec.input.id_column,
                         rows_per_task=job.rows_per_read_task)
    marks["pre_pass_done"] = time.time()
    log.info("input_scanned", rows=inputs.rows, columns=inputs.schema.names, duplicate_ids=inputs.duplicate_ids)
    engine = engine_stage(job.model, spec.model.engine, job.sampling, accelerator=pool.accelerator, shape=pool.shape,
                          replicas=pool.replicas, nodes=pool.nodes, accelerator_type=spec.resources.accelerator_type,
                          batch_size=spec.resources.batch_size, rows=inputs.rows,
                          progress_actor=progress_actor_name(run_id),
                          max_concurrent_batches=spec.resources.max_concurrent_batches, on_cluster=on_cluster)
    cache = result_cache_for(spec, fingerprint, engine.engine_kwargs, job.sampling, log)
    limit = row_limit(engine, job.model)
    context = OutputContext(run_id, spec.model.source, limit, task=spec.task,
                            logprobs=spec.sampling.logprobs,
                            scorers=tuple(spec.scoring),
                            cache_uri=cache.uri if cache else None)
    problems = schema_problems(spec, inputs.schema, cache=cache is not None)
    if problems:
        raise UserError(problems[0], lines=problems)
    judges = _judge_stages(job, pool, on_cluster, inputs.rows)
    return Stages(inputs, engine, cache, context, judges, staging_uri(run_uri, 0) if judges else run_uri,
                  replace(job.render, max_model_len=limit))


def _execute_passes(job: ResolvedJob, stages: Stages, pool: Pool, run_id: str, run_uri: str, start: RunStart,
                    finished: FinishedWork | None, fingerprint: str, started_at: str,
                    marks: dict[str, float | None], lock: RunLock, log) -> Execution:
    """The first pass over the rows not yet written, then each judge pass; what they did, for the manifest."""
    import ray

    from llmbatch.pipelines.pipeline import build_dataset
    from llmbatch.pipelines.progress import ProgressCounter, progress_actor_name

    spec, inputs, started = job.spec, stages.inputs, marks["started"]
    if stages.cache is not None:
        unwritable = write_key_file(stages.cache, spec.model.source)
        if unwritable:
            log.warning("cache_read_only", error=unwritable,
                        note="the run reads the cache but may not add its rows to it")
        log.info("cache_opened", cache=stages.cache.uri)
    counter = ProgressCounter.options(name=progress_actor_name(run_id)).remote(run_id)
    to_do = inputs.rows - (finished.rows if finished else 0)
    log.info("run_started", rows=to_do, replicas=pool.replicas[1], accelerator=pool.accelerator,
             model=spec.model.source, output=run_uri)
    if to_do > 0:
        ds = build_dataset(inputs, spec.input.id_column, stages.render, stages.engine, stages.context, counter,
                           done=finished.done if finished else None)
        marks["dataset_started"] = time.time()
        _execute(ds, stages.first_pass, counter, to_do, started, lock, log, spec.output.rows_per_part)
        marks["dataset_done"] = time.time()
    else:
        log.info("nothing_left", note="every row was written by the earlier attempt; committing it")
    generation_seconds = time.time() - started
    replicas = ray.get(counter.snapshot.remote())["replicas"]
    device, sizing = _prediction(pool, log)
    gpu_nodes = [node for node, res in pool.nodes.items() if res.get("GPU")] if pool.accelerator == "gpu" else []
    judge_stats = _judge_passes(stages.judges, stages.first_pass, run_uri, run_id, inputs, stages.context,
                                spec.model.source, lock, log, gpu_nodes)
    marks["judges_done"] = time.time() if stages.judges else None
    engine_section = {"accelerator": pool.accelerator,
                      "replicas": pool.replicas[0] if pool.auto else spec.resources.replicas,
                      **stages.engine.engine_kwargs}
    return Execution(
        run_id=run_id, run_uri=run_uri, started=started, started_at=started_at, marks=marks, input_rows=inputs.rows,
        duplicate_ids=inputs.duplicate_ids, rows_per_file=inputs.rows_per_file, replicas=replicas,
        engine=engine_section, fingerprint=fingerprint, generation_seconds=generation_seconds, finished=finished,
        automatic_resume=start.mode == AUTOMATIC_RESUME, cache=stages.cache, judge_stats=judge_stats,
        sizing=sizing, device=device,
        cost=run_cost(generation_seconds, pool.replicas[1] * pool.shape.workers_per_replica, device, judge_stats),
        judges_staged=bool(stages.judges))


def _record_measurement(job: ResolvedJob, run: Execution, manifest: Manifest, source: str, log) -> None:
    """Add the run's measured speed to the model's profile, when it measured the engine alone."""
    reused = bool(run.finished and run.finished.rows) or bool(manifest.cache and getattr(manifest.cache, "hits", 0))
    if run.device is not None and job.spec.task == "generate" and not reused:
        # score runs generate nothing to measure; a resumed or cached run's totals mix earlier work in
        record_run(manifest, run.fingerprint, run.device, plan_engine_settings(job.spec, run.device), run.sizing,
                   source, log)


def _size_pool(job: ResolvedJob, cluster: dict[str, float], fingerprint: str, on_cluster: bool, log) -> Pool:
    """The accelerator and replica range on this cluster; for `replicas: auto`, from the planner's prediction.
    On a cluster, replicas the nodes cannot hold yet are asked of the autoscaler and waited for."""
    spec = job.spec
    groups = node_groups() if on_cluster else None
    waits = on_cluster and (groups is not None or spec.resources.scale_up_timeout is not None)
    to_come = accelerator_to_come(spec.resources.accelerator, cluster, groups)
    if to_come:
        log.info("gpu_nodes_to_come", note="the cluster has no GPU node now; its autoscaler can add them")
    scaling = waits and (to_come or spec.resources.accelerator == "gpu")
    if waits and not to_come and spec.resources.accelerator == "auto" and cluster.get("GPU", 0) < 1:
        log.warning("no_gpu_node", note="accelerator: auto found no GPU node and runs on CPU; if the autoscaler "
                                        "can add GPU nodes, set resources.accelerator: gpu so the run asks for them")
    accelerator = to_come or ("gpu" if scaling else choose_accelerator(spec.resources.accelerator, cluster))
    shape = replica_shape(accelerator, spec.model.engine.tensor_parallel_size)
    if scaling and groups is not None and not groups_can_host(shape, groups, spec.resources.accelerator_type) \
            and not any(can_host(shape, node, spec.resources.accelerator_type) for node in alive_nodes().values()):
        need = ", ".join(f"{amount * shape.workers_per_replica:g} {key}" for key, amount in shape.bundle.items())
        pinned = f" with {spec.resources.accelerator_type} GPUs" if spec.resources.accelerator_type else ""
        raise UserError(f"resources: no node type the cluster's autoscaler may add holds one replica ({need} on one "
                        f"node{pinned}); add such a worker group, or lower model.engine.tensor_parallel_size")
    auto = spec.resources.replicas == "auto"
    if auto:
        wait_for_engine_stage_import()
        device, sizing = predict(spec, accelerator, fingerprint, log, required=True)
        if spec.resources.accelerator_type or accelerator == "cpu":  # planned on the device the run gets
            check_planned_parallelism(spec, sizing)
        wanted = (1, sizing.replicas)
        prediction = _done((device, sizing))
    else:
        wanted = tuple(spec.resources.replica_range)
        # for a fixed pool the plan is only reported; the engines need not wait for its token count
        prediction = _in_background(_predict_once_imported, spec, accelerator, fingerprint, log)
    asked = False
    if waits:
        timeout = parse_duration(spec.resources.scale_up_timeout or DEFAULT_SCALE_UP_TIMEOUT)
        nodes, asked = wait_for_nodes(shape, wanted[0], spec.resources.accelerator_type, timeout, nodes_now=alive_nodes,
                                      request=ask_autoscaler, ask=wanted[1], log=log)
        cluster = totals(nodes) if asked else cluster
    else:
        nodes = alive_nodes()
    try:
        if auto:
            capacity = replica_capacity(shape, cluster)
            low = max(1, min(wanted[1], capacity))
            # on a cluster that grows, the pool grows onto the nodes still coming, up to the plan
            high = wanted[1] if waits else low
            planned = prediction.result()[1]
            log.info("replicas_planned", planned=wanted[1], capacity=capacity, replicas=[low, high],
                     notes=planned.notes or None, problems=planned.problems or None)
        else:
            low, high = wanted
        check_fits(shape, low, cluster, list(nodes.values()), spec.resources.accelerator_type)
    except BaseException:
        if asked:
            _withdraw_autoscaler_request(log)
        raise
    return Pool(accelerator, shape, (low, high), nodes, cluster, auto, prediction, asked)


def _predict_once_imported(spec: JobSpec, accelerator: str, fingerprint: str, log) -> tuple[Any, Any]:
    wait_for_engine_stage_import()
    return predict(spec, accelerator, fingerprint, log, required=False)


def _prediction(pool: Pool, log) -> tuple[Any, Any]:
    try:
        device, sizing = pool.prediction.result()
    except Exception as exc:  # an estimate that failed must not fail the rows it was to estimate
        log.warning("no_prediction", reason=f"{type(exc).__name__}: {exc}")
        return None, None
    if sizing is not None:
        sizing = sizing.for_replicas(pool.replicas[1])
        log.info("run_predicted", replicas=pool.replicas[1], wall_s=sizing.wall_seconds, cost_usd=sizing.cost_usd)
    return device, sizing


def _check_nodes_see_the_paths(job: ResolvedJob, lock: RunLock, node_ids: list[str], log) -> None:
    """On a cluster, refuse local paths that not every node sees as this driver does: the input files (the
    first INPUT_FILES_CHECKED), a local model's config, and a probe file this driver writes in the run folder
    and in the cache."""
    spec = job.spec
    checks = [PathCheck("input.path", os.path.abspath(os.path.expanduser(f.uri)), f.size)
              for f in job.input.files[:INPUT_FILES_CHECKED] if not is_s3(f.uri)]
    for field, model in _local_models(job):
        config = model.path / "config.json"
        checks.append(PathCheck(field, str(config), config.stat().st_size))
    probes = []
    folders = [("output.path", lock.run_uri)]
    if spec.cache is not None:
        folders.append(("cache.path", spec.cache.path))
    for field, folder in folders:
        if is_s3(folder):
            continue
        probe = os.path.join(os.path.abspath(os.path.expanduser(folder)),
                             f".llmbatch-visible-{lock.run_id}-g{lock.generation}")
        try:
            os.makedirs(os.path.dirname(probe), exist_ok=True)
            write_local(probe, PROBE_TEXT)
        except OSError as exc:  # a read-only cache: nothing to check that this run would write
            log.warning("path_not_checked", field=field, path=folder, reason=str(exc))
            continue
        probes.append(probe)
        checks.append(PathCheck(field, probe, len(PROBE_TEXT)))
    try:
        check_nodes_see(checks, node_ids)
    finally:
        for probe in probes:
            try:
                os.remove(probe)
            except OSError:
                pass


def _local_models(job: ResolvedJob) -> list[tuple[str, ResolvedModel]]:
    """(job file field, model) of each local-folder model the job's engines load, which every node must see."""
    models = [("model.source", job.model)]
    judges = iter(job.judges)
    for number, scorer in enumerate(job.spec.scoring):
        if scorer.kind == "judge":
            judge = next(judges)
            if scorer.model is not None:
                models.append((f"scoring.{number}.model.source", judge))
    return [(field, model) for field, model in models if model.kind == "local" and model.path is not None]


def _judge_stages(job: ResolvedJob, pool: Pool, on_cluster: bool,
                  rows: int) -> list[tuple[dict[str, Any], EngineSettings, int | None]]:
    """(scorer, engine stage, max_model_len) for each judge scorer, checked to fit the cluster."""
    spec = job.spec
    stages = []
    judge_models = iter(job.judges)
    for number, scorer in enumerate(spec.scoring):
        if scorer.kind != "judge":
            continue
        model_spec, model = scorer.model or spec.model, next(judge_models)
        shape = replica_shape(pool.accelerator, model_spec.engine.tensor_parallel_size)
        replicas = (scorer.replicas, scorer.replicas) if scorer.replicas else pool.replicas
        try:
            check_fits(shape, replicas[0], pool.cluster, list(pool.nodes.values()), spec.resources.accelerator_type)
        except UserError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise UserError(f"scoring.{number}.replicas: the judge's engine replicas do not fit: {detail}") from None
        stage = engine_stage(model, model_spec.engine, judge_sampling_params(scorer.scale),
                             accelerator=pool.accelerator, shape=shape, replicas=replicas, nodes=pool.nodes,
                             accelerator_type=spec.resources.accelerator_type, batch_size=spec.resources.batch_size,
                             rows=rows, max_concurrent_batches=spec.resources.max_concurrent_batches,
                             on_cluster=on_cluster)
        stages.append((scorer, stage, row_limit(stage, model)))
    return stages


def result_cache_for(spec: JobSpec, fingerprint: str, engine_kwargs: dict[str, Any],
                     sampling_settings: dict[str, Any], log) -> CacheNamespace | None:
    """The cache namespace this run reads and adds to; none without `cache`, or when sampling is not repeatable."""
    if spec.cache is None:
        return None
    if not is_deterministic(sampling_settings):
        log.warning("cache_not_used", reason="sampling.temperature > 0 without sampling.seed: a result is not "
                    "repeatable, so none is reused or stored; set sampling.seed to cache sampled results")
        return None
    versions = software_versions()
    return cache_namespace(spec.cache.path, fingerprint, engine_kwargs, sampling_settings,
                           {k: versions[k] for k in ("llmbatch", "vllm", "transformers")}, spec.input.special_tokens)


def _judge_passes(judges: list, first_pass: str, run_uri: str, run_id: str, inputs, context, model_source: str,
                  lock: RunLock, log, gpu_nodes: list[str]) -> dict[str, Any]:
    """Each judge rereads the previous pass's parts and writes the next; the last writes the run's output.
    On GPUs, each starts once the GPUs have its engines' memory share free again."""
    from llmbatch.pipelines.pipeline import build_judge_pass, read_output_parts
    from llmbatch.pipelines.progress import ProgressCounter, progress_actor_name

    stats, target = {}, first_pass
    for number, (scorer, judge_engine, judge_max_len) in enumerate(judges, start=1):
        started = time.time()
        source, target = target, staging_uri(run_uri, number) if number < len(judges) else run_uri
        name = scorer.name
        log.info("judge_pass_started", scorer=name, model=scorer.model.source if scorer.model else model_source,
                 replicas=judge_engine.replicas[1])
        if gpu_nodes:
            wait_for_free_memory(gpu_nodes, judge_engine.engine_kwargs["gpu_memory_utilization"], log)
        counter = ProgressCounter.options(name=f"{progress_actor_name(run_id)}-judge-{name}").remote(run_id)
        ds = build_judge_pass(read_output_parts(source), scorer.grading(), judge_engine, inputs, context,
                              judge_max_len, counter)
        _execute(ds, target, counter, inputs.rows, started, lock, log.bind(judge=name))
        if source != first_pass:  # the first pass stays until the manifest is written: a resume starts from it
            remove_staging(source)
        stats[name] = {"wall_seconds": round(time.time() - started, 3), "replicas": judge_engine.replicas[1],
                       "devices": judge_engine.replicas[1] * judge_engine.engine_kwargs["tensor_parallel_size"],
                       "model": judge_engine.model_path}
    return stats


def _execute(ds, target: str, counter, total_rows: int, started: float, lock: RunLock, log,
             rows_per_part: int | None = None) -> None:
    """Run a dataset to its parquet target, reporting progress while it runs; its write tasks stop when another
    driver takes the run."""
    from llmbatch.pipelines.pipeline import write_dataset

    stop = threading.Event()
    reporter = threading.Thread(target=_report_progress, daemon=True,
                                args=(counter, total_rows, started, stop, log, progress_listener.get(),
                                      PROGRESS_LINE_REPLICAS if progress_lines_for_a_view.get() else 0))
    reporter.start()
    try:
        write_dataset(ds, target, lock.fence, rows_per_part)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        log.error("run_failed", error=type(exc).__name__)
        lock.check("writing more output")
        raise JobFailed(explain_failure(exc, since=started)) from exc
    finally:
        stop.set()
        reporter.join(timeout=5)
        released = release_placement_groups()
        if released:
            log.info("placement_groups_released", count=released)


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


def _report_progress(counter, total: int, started: float, stop: threading.Event, log, listener=None,
                     replicas_shown: int = 0) -> None:
    """A `progress` log line every PROGRESS_EVERY_SECONDS (every CLUSTER_PROGRESS_EVERY_SECONDS, with the first
    `replicas_shown` replicas' states, when a submitter's view reads them); each snapshot to `listener` (a live
    view) every LISTENER_EVERY_SECONDS."""
    import ray

    every = CLUSTER_PROGRESS_EVERY_SECONDS if replicas_shown else PROGRESS_EVERY_SECONDS
    lines = ProgressLines(log, started, replicas_shown)
    logged = time.time()
    while not stop.wait(LISTENER_EVERY_SECONDS if listener else every):
        try:
            snap = ray.get(counter.snapshot.remote(), timeout=5)
        except Exception:
            continue
        now = time.time()
        progress = summarize(snap, total, now)
        if listener is not None:
            listener(progress)
            if now - logged < every:
                continue
        logged = now
        lines.write(progress, now)
    if listener is None and not replicas_shown:
        return
    try:  # the pass's last rows, counted after the last poll
        snap = ray.get(counter.snapshot.remote(), timeout=5)
    except Exception:
        return
    now = time.time()
    progress = summarize(snap, total, now)
    if listener is not None:
        listener(progress)
    if replicas_shown:
        lines.write(progress, now)


class ProgressLines:
    """A pass's `progress` log lines. While no row is done after STALL_WARNING_SECONDS, a `no_rows_yet` warning
    comes once every STALL_WARNING_SECONDS, instead of the lines (beside them when a submitter's view reads
    them)."""

    def __init__(self, log, started: float, replicas_shown: int = 0):
        self._log, self._started, self._replicas_shown = log, started, replicas_shown
        self._stalls_warned = 0

    def write(self, progress: PassProgress, now: float) -> None:
        elapsed = round(now - self._started)
        stalls = int(elapsed // STALL_WARNING_SECONDS) if progress.rows_done == 0 else 0
        if stalls > self._stalls_warned:
            self._stalls_warned = stalls
            self._log.warning("no_rows_yet", elapsed_s=elapsed, replicas_ready=progress.replicas_ready,
                              hint="no replica has finished a batch; if the cluster cannot place the engine "
                                   "replicas, `ray status` shows what is pending")
        if stalls and not self._replicas_shown:
            return
        note = {"note": "starting engine replicas and warming up"} if progress.rows_done == 0 else {}
        self._log.info("progress", **progress.log_fields(self._replicas_shown), elapsed_s=elapsed, **note)
