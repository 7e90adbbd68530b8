"""Infer stage: vLLM engine replicas as a Ray Data actor pool, built on ray.data.llm.

This module and inprocess_engine.py (vLLM inside the replica's process) are the only ones that import
ray.data.llm; what they use of its private internals comes through ray_llm_seam.py, which checks it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from llmbatch.pipelines.columns import (CHOICE_RESULTS_COLUMN, CHOICES_COLUMN, ENGINE_RESULT_COLUMNS, HIT_COLUMN,
                                        HIT_MARKER, INFERENCE_ERROR, PROMPT_COLUMN, RENDERED_PROMPT, ROW_ERROR_COLUMN,
                                        TOKENS_COLUMN, StageColumns)


STAGE_CPUS = 0.25  # CPU share of each light (non-engine) step


@dataclass(frozen=True)
class EngineSettings:
    """Everything the engine stage needs, already resolved for the cluster it runs on."""

    model_path: str
    engine_kwargs: dict[str, Any]
    sampling_params: dict[str, Any]
    replicas: tuple[int, int]        # (min, max) engine replicas; equal for a fixed pool
    batch_size: int
    bundle_per_replica: dict[str, float]
    max_concurrent_batches: int | None = None  # batches each replica works on at once; None = Ray's default
    accelerator_type: str | None = None
    progress_actor: str | None = None  # named ProgressCounter each replica reports its batches to
    engine: str = "vllm"               # vllm | seq2seq (encoder-decoder families, batched HF generate)
    in_process: bool = False           # vLLM's engine core and worker in the replica's own process
    threads: int | None = None         # compute threads of each replica (OMP_NUM_THREADS); None = Ray's
    ensure_model: Any = None           # on a cluster: (weights=True) -> the model's path on the calling node, fetched
                                       # there first if needed; where a replica or a tokenizing stage starts


_engine_stage_imported = threading.Event()
_engine_stage_imported.set()


def preload_engine_stage() -> None:
    """Import the seam to ray.data.llm's engine stage (which imports vLLM, torch and transformers: seconds of CPU)
    in a daemon thread now, so that building the stage later finds it loaded instead of holding the engines back."""
    import importlib

    def load() -> None:
        try:
            importlib.import_module("llmbatch.pipelines.ray_llm_seam")
        except Exception:  # building the stage imports it again and reports the error
            pass
        finally:
            _engine_stage_imported.set()

    _engine_stage_imported.clear()
    threading.Thread(target=load, name="preload-engine-stage", daemon=True).start()


def wait_for_engine_stage_import(timeout: float = 300.0) -> None:
    """Until the preload's import is done. Another thread importing transformers meanwhile (a tokenizer, say) can
    be handed one of its modules half-initialized ("cannot import name ... from partially initialized module")."""
    _engine_stage_imported.wait(timeout)


def sampling_params(max_tokens: int, temperature: float, top_p: float, top_k: int | None,
                    seed: int | None, stop: list[str], logprobs: int | None = None) -> dict[str, Any]:
    params: dict[str, Any] = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  logprobs=logprobs or 0)  # 0 = the sampled token's own logprob, for scoring
    if top_k is not None:
        params["top_k"] = top_k
    if seed is not None:
        params["seed"] = seed
    if stop:
        params["stop"] = list(stop)
    return params


def scoring_params() -> dict[str, Any]:
    """task: score - one greedy token; what matters is the logprob of every prompt token."""
    return dict(max_tokens=1, temperature=0.0, prompt_logprobs=0, logprobs=None)


def engine_columns(engine: str, task: str = "generate") -> StageColumns:
    """What the engine stage reads and adds: vLLM's through ray.data.llm (a cache hit's HIT_COLUMN is read
    when the job has a cache), or the seq2seq stage's."""
    if engine == "seq2seq":
        from llmbatch.pipelines.seq2seq import Seq2SeqEngineStage

        return Seq2SeqEngineStage.columns
    scoring = task == "score"
    return StageColumns("engine",
                        needs=(PROMPT_COLUMN, TOKENS_COLUMN, ROW_ERROR_COLUMN) + ((CHOICES_COLUMN,) * scoring),
                        adds=(RENDERED_PROMPT, INFERENCE_ERROR, *ENGINE_RESULT_COLUMNS)
                        + ((CHOICE_RESULTS_COLUMN,) * scoring))


def build_infer_stage(settings: EngineSettings):
    """A callable Dataset -> Dataset that runs every row with a prompt through the engines.

    Rows that already carry an error, and result cache hits, skip the engine (ray.data.llm passes them through);
    rows the engine fails on come back with `__inference_error__` set instead of failing the job.
    """
    if settings.engine == "seq2seq":
        return _seq2seq_stage(settings)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from llmbatch.pipelines.ray_llm_seam import ENGINE_STAGE_NAME

    config = vLLMEngineProcessorConfig(
        model_source=settings.model_path,
        engine_kwargs=dict(settings.engine_kwargs),
        batch_size=settings.batch_size,
        **({"max_concurrent_batches": settings.max_concurrent_batches} if settings.max_concurrent_batches else {}),
        concurrency=tuple(settings.replicas),
        accelerator_type=settings.accelerator_type,
        placement_group_config={"bundle_per_worker": dict(settings.bundle_per_replica),
                                "strategy": "STRICT_PACK"},  # a replica's workers share one node
        should_continue_on_error=True,
        # Prompts arrive rendered and tokenized by our render stage; the engine detokenizes itself.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=False,
    )
    params = dict(settings.sampling_params)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "sampling_params": dict(params),
            RENDERED_PROMPT: row.get(PROMPT_COLUMN),
            INFERENCE_ERROR: row.get(ROW_ERROR_COLUMN) or (HIT_MARKER if row.get(HIT_COLUMN) else ""),
        }

    # The processor's own map steps are light; at Ray's default of one CPU each they would hold back
    # the render and score stages next to the engines on a small machine.
    light = {"num_cpus": STAGE_CPUS}
    processor = build_processor(config, preprocess=preprocess, preprocess_map_kwargs=light,
                                postprocess_map_kwargs=light)
    stage = processor.get_stage_by_name(ENGINE_STAGE_NAME)
    # Written past pydantic's assignment validation on purpose: the stage's validator derives its
    # resource request from a placement-group config it consumed when the stage was built, so running
    # it again would ask for a GPU per replica even on CPU.
    stage.__dict__["fn"] = _llmbatch_engine_udf()
    stage.fn_constructor_kwargs["progress_actor"] = settings.progress_actor
    stage.fn_constructor_kwargs["in_process"] = settings.in_process
    stage.fn_constructor_kwargs["ensure_model"] = settings.ensure_model
    env_vars = engine_env(settings)
    if env_vars:
        stage.map_batches_kwargs["runtime_env"] = {"env_vars": env_vars}
    placing = stage.map_batches_kwargs.get("ray_remote_args_fn")
    if placing is not None:
        stage.map_batches_kwargs["ray_remote_args_fn"] = _recording_placement_groups(placing)
    return processor


# Placement groups the engine replicas of this driver's passes were placed in. ray.data.llm creates one per
# replica of a multi-GPU engine and never removes it (ray-project/ray#64035): the GPUs would stay reserved until
# the driver exits, and the next pass in the same driver (a judge) would wait for them forever.
_PLACEMENT_GROUPS: list = []


def _recording_placement_groups(placing):
    def placed() -> dict[str, Any]:
        args = placing()
        group = getattr(args.get("scheduling_strategy"), "placement_group", None)
        if group is not None:
            _PLACEMENT_GROUPS.append(group)
        return args

    return placed


def release_placement_groups() -> int:
    """Remove the placement groups of the engine replicas that ran so far (once their pass is over); how many."""
    import ray

    removed = 0
    while _PLACEMENT_GROUPS:
        group = _PLACEMENT_GROUPS.pop()
        try:
            ray.util.remove_placement_group(group)
            removed += 1
        except Exception:  # already gone with its job, or Ray is shutting down
            pass
    return removed


def engine_env(settings: EngineSettings) -> dict[str, str]:
    """Environment of each engine replica's process, set before vLLM and torch are imported there."""
    from llmbatch.pipelines.inprocess_engine import IN_PROCESS_ENV

    env = dict(IN_PROCESS_ENV) if settings.in_process else {}
    if settings.threads:
        # Ray sets OMP_NUM_THREADS to the actor's CPU request (1), which would leave the other cores idle
        env["OMP_NUM_THREADS"] = str(settings.threads)
    return env


def _seq2seq_stage(settings: EngineSettings):
    """Encoder-decoder models, which vLLM no longer runs: batched Hugging Face generate on an actor pool
    with the same resources, rows in and columns out as the vLLM stage."""
    import ray

    from llmbatch.pipelines.seq2seq import Seq2SeqEngineStage

    bundle = settings.bundle_per_replica
    remote_args: dict[str, Any] = {"num_cpus": bundle.get("CPU", 1), "num_gpus": bundle.get("GPU", 0)}
    if settings.accelerator_type:
        remote_args["accelerator_type"] = settings.accelerator_type
    if settings.threads:
        remote_args["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(settings.threads)}}

    def apply(ds):
        return ds.map_batches(
            Seq2SeqEngineStage,
            fn_constructor_args=(settings.model_path, settings.engine_kwargs, settings.sampling_params,
                                 settings.progress_actor, settings.ensure_model),
            batch_size=settings.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=settings.replicas[0], max_size=settings.replicas[1]),
            **remote_args)

    return apply


def _llmbatch_engine_udf():
    """ray.data.llm's engine stage, plus: each batch reported (replica, node, rows, tokens, seconds) to our
    counter; and for task: score, one request per completion, folded back into one output per row."""
    import time

    import ray

    from llmbatch.pipelines.ray_llm_seam import vLLMEngineStageUDF
    from llmbatch.pipelines.logprobs import completion_logprob

    class LlmbatchEngineUDF(vLLMEngineStageUDF):
        def __init__(self, *args, progress_actor: str | None = None, in_process: bool = False, ensure_model=None,
                     **kwargs):
            constructing_at = time.time()
            if ensure_model is not None:  # on a cluster: the weights, fetched once per node, at this node's path
                kwargs["model"] = ensure_model()
            if in_process:
                self._start_in_process(*args, **kwargs)
            else:
                super().__init__(*args, **kwargs)
            context = ray.get_runtime_context()
            self._replica = context.get_actor_id()
            self._node = context.get_node_id()
            self._progress = ray.get_actor(progress_actor) if progress_actor else None
            if self._progress is not None:
                self._progress.replica_started.remote(self._replica, self._node, constructing_at, time.time())

        def _start_in_process(self, data_column, expected_input_keys, batch_size, max_concurrent_batches, model,
                              engine_kwargs, task_type=None, max_pending_requests=None,
                              dynamic_lora_loading_path=None, should_continue_on_error=False, **_):
            """vLLMEngineStageUDF's set-up, with the in-process engine in place of AsyncLLM."""
            from llmbatch.pipelines.inprocess_engine import in_process_wrapper_class
            from llmbatch.pipelines.ray_llm_seam import StatefulStageUDF

            StatefulStageUDF.__init__(self, data_column=data_column, expected_input_keys=expected_input_keys)
            self.model = model
            self.should_continue_on_error = should_continue_on_error
            self.task_type = task_type or "generate"
            self.engine_kwargs = self.normalize_engine_kwargs(engine_kwargs)
            self.llm = in_process_wrapper_class()(
                model=model, model_source=model, idx_in_batch_column=self.IDX_IN_BATCH_COLUMN,
                enable_log_requests=False, max_pending_requests=max_pending_requests,
                dynamic_lora_loading_path=dynamic_lora_loading_path, **self.engine_kwargs)
            self.max_pending_requests = self.llm.max_pending_requests

        async def udf(self, batch):
            started, rows, tokens = time.time(), 0, 0
            outputs = self._score_choices(batch) if batch and batch[0].get(CHOICES_COLUMN) is not None \
                else super().udf(batch)
            async for output in outputs:
                rows += 1
                tokens += int(output.get("num_generated_tokens") or 0)
                yield output
            if self._progress is not None:
                self._progress.replica_batch.remote(self._replica, rows, tokens, started, time.time())

        async def _score_choices(self, batch):
            idx_column = self.IDX_IN_BATCH_COLUMN
            requests, owner, token_ids = [], [], []  # the engine pops each request's tokens: keep a copy
            for row in batch:
                prompt = [int(t) for t in row[TOKENS_COLUMN]]
                for k, choice in enumerate(row[CHOICES_COLUMN]):
                    request = {key: value for key, value in row.items() if key != CHOICES_COLUMN}
                    request[TOKENS_COLUMN] = prompt + [int(t) for t in choice["tokens"]]
                    request["sampling_params"] = dict(row["sampling_params"])
                    request[idx_column] = len(requests)
                    requests.append(request)
                    owner.append((row, k))
                    token_ids.append(request[TOKENS_COLUMN])
            results: dict[int, dict] = {}
            async for output in super().udf(requests):
                number = output[idx_column]
                row, k = owner[number]
                count = len(row[CHOICES_COLUMN][k]["tokens"])
                entry = results.setdefault(row[idx_column], {
                    **output, idx_column: row[idx_column], "num_input_tokens": len(row[TOKENS_COLUMN]),
                    "num_generated_tokens": 0, CHOICE_RESULTS_COLUMN: [None] * len(row[CHOICES_COLUMN])})
                if output.get(INFERENCE_ERROR):
                    entry[INFERENCE_ERROR] = output[INFERENCE_ERROR]
                entry[CHOICE_RESULTS_COLUMN][k] = {
                    "logprob": completion_logprob(output.get("prompt_logprobs"), token_ids[number], count),
                    "num_tokens": count}
            for entry in results.values():
                entry["prompt_logprobs"] = None
                entry["logprobs"] = None
                yield entry

    return LlmbatchEngineUDF

