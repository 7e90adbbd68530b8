"""Resolve a job: every check that `validate`, `plan`, `submit --dry-run` and `submit` share, and what they derive.

`resolve(spec)` needs no Ray. It returns a frozen `ResolvedJob` or raises one UserError holding every problem
found, one line each, naming the job file's field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmbatch.cluster import model_store
from llmbatch.cluster.model_facts import context_of
from llmbatch.cluster.model_inspect import engine_for_checkpoint, has_chat_template
from llmbatch.errors import UserError
from llmbatch.jobs.spec import JobSpec
from llmbatch.pipelines.read import FORMAT_BY_EXTENSION, InputFile, input_shape_problems, list_input_files
from llmbatch.pipelines.render import RenderSettings, template_fields
from llmbatch.pipelines.schema import output_schema, task_fields
from llmbatch.pipelines.scorer_specs import score_fields, scorer_problems
from llmbatch.storage import check_bucket

WEIGHT_SUFFIXES = model_store.WEIGHT_SUFFIXES


@dataclass(frozen=True)
class ResolvedModel:
    """A model as a job runs it. `path` is None when it is not on this machine yet (a hub model not downloaded,
    an s3:// model not copied, a catalog model not prepared): the checks that read its files are then skipped."""
    source: str
    kind: str                   # catalog | local | s3 | hub
    path: Path | None
    engine: str                 # vllm | seq2seq
    context: int | None         # the model's own context length (config.json)
    max_len: int | None         # model.engine.max_model_len, else the model's context
    chat_template: bool | None


@dataclass(frozen=True)
class InputFacts:
    files: tuple[InputFile, ...]
    rows: int | None = None          # None: not scanned (submit scans on Ray, in its pre-pass)
    schema: pa.Schema | None = None


@dataclass(frozen=True)
class ResolvedJob:
    spec: JobSpec
    model: ResolvedModel
    judges: tuple[ResolvedModel, ...]    # one per judge scorer, in scoring order
    input: InputFacts
    required_columns: tuple[tuple[str, str], ...]   # (input column, the job file field naming it)
    render: RenderSettings
    sampling: dict[str, Any]             # vLLM SamplingParams arguments

    @property
    def max_tokens(self) -> int:
        return 1 if self.spec.task == "score" else self.spec.sampling.max_tokens

    @property
    def rows_per_read_task(self) -> int:
        """The read granularity: input.rows_per_read_task, else one engine batch."""
        return self.spec.input.rows_per_read_task or self.spec.resources.batch_size


def resolve(spec: JobSpec, *, run_uri: str | None = None, fetch_models: bool = False,
            fetch_judges: bool | None = None, fetch_later: bool = False, scan_input: bool = True,
            without_weights: bool = False, config_only: bool = False, log=None) -> ResolvedJob:
    """Check `spec` against its storage, input and models, and derive the settings every command uses.

    `fetch_models` prepares, copies or downloads the job's model when it is not on this machine yet, and the
    judges' models too unless `fetch_judges` is False; nothing is fetched for a job already found wrong.
    `fetch_later` accepts a hub model that is not downloaded yet (submit fetches it once nothing refuses the run).
    `without_weights` fetches an s3:// or hub model's config and tokenizer only: a cluster's driver reads no
    more, and each node's engines fetch the weights themselves.
    `config_only` (plan) asks no weights of the job's model: a local folder holding only its config.json will do.
    `scan_input` reads every input shard's row count and schema here; submit leaves that to its pre-pass on
    Ray and calls `schema_problems` with what the pre-pass found."""
    from llmbatch.pipelines.infer import sampling_params, scoring_params

    problems = overlap_problems(spec, run_uri)
    problems += _storage_problems(spec)
    files: list[InputFile] = []
    try:
        files = list_input_files(spec.input.path, spec.input.format)
    except UserError as exc:
        problems += exc.lines
    problems += format_problems(spec, files)

    fetch_judges = fetch_models if fetch_judges is None else fetch_judges
    model = _resolve_model(spec.model, "model", fetch_models and not problems, log, problems, fetch_later,
                           without_weights, config_only)
    if model is not None:
        problems += model_problems(spec, model)
    judges = []
    for number, scorer in enumerate(spec.scoring):
        if scorer.kind == "judge":
            where = f"scoring.{number}"
            if scorer.model is None:  # the job's own model, resolved above
                judge = model
            else:
                judge = _resolve_model(scorer.model, f"{where}.model", fetch_judges and not problems, log, problems,
                                       fetch_later, without_weights)
            if judge is not None:
                if judge.engine != "vllm":
                    problems.append(f"{where}.model: a judge answers through vLLM's structured outputs; "
                                    f"{judge.source} is an encoder-decoder model, which runs on the seq2seq engine")
                judges.append(judge)

    facts = InputFacts(tuple(files))
    required = required_input_columns(spec)
    if scan_input and files and not any(line.startswith("input.") for line in problems):
        try:
            facts = _scan(files, spec.input.id_column)
        except UserError as exc:
            problems += exc.lines
        else:
            shape = input_shape_problems(len(files), facts.rows or 0, facts.schema, required)
            problems += shape
            if not shape and facts.schema is not None:
                problems += schema_problems(spec, facts.schema)

    if problems:
        raise UserError(problems[0], lines=list(dict.fromkeys(problems)))
    assert model is not None
    sampling = scoring_params() if spec.task == "score" else sampling_params(
        spec.sampling.max_tokens, spec.sampling.temperature, spec.sampling.top_p, spec.sampling.top_k,
        spec.sampling.seed, spec.sampling.stop, spec.sampling.logprobs)
    return ResolvedJob(spec, model, tuple(judges), facts, tuple(required.items()),
                       render_settings(spec, model.max_len), sampling)


def render_settings(spec: JobSpec, max_len: int | None) -> RenderSettings:
    return RenderSettings(
        prompt_column=spec.input.prompt_column, messages_column=spec.input.messages_column,
        template=spec.input.template, system_prompt=spec.input.system_prompt, max_model_len=max_len,
        task=spec.task, completion_column=spec.input.completion_column, choices_column=spec.input.choices_column,
        trust_remote_code=spec.model.engine.trust_remote_code, special_tokens=spec.input.special_tokens,
    )


def required_input_columns(spec: JobSpec) -> dict[str, str]:
    """The input columns the job reads, each with the job file's field that names it."""
    fields: dict[str, str] = {}
    if spec.input.messages_column:
        fields[spec.input.messages_column] = "input.messages_column"
    elif spec.input.template is not None:
        fields.update((name, "input.template") for name in template_fields(spec.input.template))
    else:
        fields[spec.input.prompt_column] = "input.prompt_column"
    for field in ("id_column", "completion_column", "choices_column"):
        column = getattr(spec.input, field)
        if column:
            fields.setdefault(column, f"input.{field}")
    for number, scorer in enumerate(spec.scoring):
        for column in scorer.input_columns():
            fields.setdefault(column, f"scoring.{number}.reference_column")
    return fields


def schema_problems(spec: JobSpec, input_schema: pa.Schema, *, cache: bool | None = None) -> list[str]:
    """Scorers checked against the columns the output will have: python functions import, rubrics name columns."""
    cached = spec.cache is not None if cache is None else cache
    fields = task_fields(spec.task, bool(spec.sampling.logprobs), cached)
    fields += score_fields(list(spec.scoring))
    return scorer_problems(list(spec.scoring), output_schema(input_schema, fields).names, input_schema.names)


def format_problems(spec: JobSpec, files: list[InputFile]) -> list[str]:
    """An input.format that contradicts a file's own extension reads it wrongly; say so before reading."""
    if spec.input.format == "auto":
        return []
    problems = []
    for f in files:
        named = FORMAT_BY_EXTENSION.get(os.path.splitext(f.uri)[1].lower())
        if named is not None and named != spec.input.format:
            problems.append(f"input.format: {spec.input.format}, but {f.relpath} is {named} by its name; "
                            f"set input.format: {named} (or auto)")
    return problems[:3]


def model_problems(spec: JobSpec, model: ResolvedModel) -> list[str]:
    problems = []
    engine = spec.model.engine
    if model.engine == "seq2seq" and spec.task == "score":
        problems.append("task: score runs on vLLM's prompt logprobs; this encoder-decoder model runs on the "
                        "seq2seq engine, which generates only")
    if model.engine == "seq2seq" and engine.tensor_parallel_size > 1:
        problems.append("model.engine.tensor_parallel_size: the seq2seq engine runs a replica on one device; "
                        "set 1")
    if model.engine == "vllm" and model.context and model.max_len and model.max_len > model.context:
        problems.append(f"model.engine.max_model_len: {model.max_len} is beyond the model's context of "
                        f"{model.context} tokens (its config.json); set at most {model.context}")
    limit = model.max_len
    if model.engine == "vllm" and limit and spec.task == "generate" and spec.sampling.max_tokens > limit:
        problems.append(f"sampling.max_tokens: {spec.sampling.max_tokens} is beyond the {limit}-token context that "
                        f"prompt and output share (model.engine.max_model_len); set max_tokens at most {limit}, "
                        "or raise max_model_len")
    if spec.input.messages_column and model.chat_template is False and not _tokenizer_has_chat_template(
            model.path, engine.trust_remote_code):
        problems.append(f"input.messages_column: the model at {model.path} has no chat template; "
                        "use prompt_column (or template) instead")
    return problems


def model_max_len(model_path: Path, configured: int | None) -> int | None:
    if configured is not None:
        return configured
    return _context_of(model_path)


def _context_limit(path: Path) -> int | None:
    """The context vLLM holds a model to: None (no limit to check here) when the config scales its rotary
    embeddings, or VLLM_ALLOW_LONG_MAX_MODEL_LEN lets a longer max_model_len through."""
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true"):
        return None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config") or {}
    if config.get("rope_scaling") or text.get("rope_scaling"):
        return None
    return context_of(config)


def _tokenizer_has_chat_template(path: Path | None, trust_remote_code: bool) -> bool:
    """A checkpoint whose own code sets its chat template shows it only in its loaded tokenizer."""
    if path is None or not trust_remote_code:
        return False
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    return getattr(tokenizer, "chat_template", None) is not None


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
    if spec.cache is not None and run_uri is not None and (is_within(spec.cache.path, run_uri)
                                                           or is_within(run_uri, spec.cache.path)):
        return [f"cache.path: {spec.cache.path} overlaps this run's folder {run_uri}; a run's folder and the "
                "result cache must not hold each other. Keep the cache elsewhere, or use another --run-id"]
    if run_uri is not None and _is_run_folder(spec.output.path):
        return [f"output.path: {spec.output.path} is itself a run's folder; runs are written one level below "
                "output.path, so give the folder that holds the runs"]
    return []


def _is_run_folder(path: str) -> bool:
    from llmbatch.pipelines.run_files import ATTEMPT_NAME, LOCK_DIR, MANIFEST_NAME, RunFolder

    folder = RunFolder(path)
    try:
        return any(folder.exists(name) for name in (MANIFEST_NAME, ATTEMPT_NAME, LOCK_DIR))
    except UserError:
        return False  # storage problems are reported for the output's bucket


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


def _storage_problems(spec: JobSpec) -> list[str]:
    problems = []
    places = [(spec.output.path, "output.path")] + ([(spec.cache.path, "cache.path")] if spec.cache else [])
    for path, field in places:
        try:
            check_bucket(path, field)
        except UserError as exc:
            problems += exc.lines
    return problems


def _resolve_model(model, where: str, fetch: bool, log, problems: list[str],
                   fetch_later: bool = False, without_weights: bool = False,
                   config_only: bool = False) -> ResolvedModel | None:
    try:
        ref = model_store.classify_source(model.source)
        if fetch:
            path: Path | None = model_store.resolve_local(model.source, log=log, weights=not without_weights)
        elif fetch_later and ref.kind == "hub":
            path = _checkpoint_here(ref, without_weights)
        else:
            model_store.check_source(model.source)
            path = _checkpoint_here(ref, without_weights)
    except UserError as exc:
        problems += [line.replace("model.source", f"{where}.source", 1) for line in exc.lines]
        return None
    if path is None:
        return ResolvedModel(model.source, ref.kind, None, "vllm", None, model.engine.max_model_len, None)
    try:
        engine = engine_for_checkpoint(path, model.source, trust_remote_code=model.engine.trust_remote_code,
                                       where=where)
    except UserError as exc:
        problems += [line.replace("model.source", f"{where}.source", 1) for line in exc.lines]
        return None
    if not _has_weights(path) and not config_only and not (without_weights and ref.kind in ("s3", "hub")):
        problems.append(f"{where}.source: {path} holds config.json but no weights ({', '.join(WEIGHT_SUFFIXES)} "
                        "files); copy the whole checkpoint")
    context = _context_limit(path)
    return ResolvedModel(model.source, ref.kind, path, engine, context,
                         _max_len(model.engine.max_model_len, context), has_chat_template(path))


def _max_len(configured: int | None, context: int | None) -> int | None:
    """The longest sequence a row may have: the configured max_model_len, else the model's own context (the
    engine stage may cap that by memory: see jobs/engines.py)."""
    return configured if configured is not None else context


def _checkpoint_here(ref: model_store.ModelRef, without_weights: bool = False) -> Path | None:
    if ref.kind == "local":
        return Path(ref.source)
    if ref.kind in ("catalog", "s3"):
        for folder in (ref.cache_dir, ref.config_dir if without_weights else None):
            if folder is not None and model_store.is_checkpoint_dir(folder):
                return folder
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.source, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _has_weights(path: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file() or p.is_symlink())


def _context_of(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return context_of(config) if isinstance(config, dict) else None


def _scan(files: list[InputFile], id_column: str | None) -> InputFacts:
    from llmbatch.pipelines.read import scan_shard, unify_input_schema

    scans = [scan_shard(f.uri, f.format) for f in files]
    broken = [s for s in scans if s.error]
    if broken:
        lines = [f"input.path: cannot read {s.uri}: {s.error}" for s in broken]
        raise UserError(lines[0], lines=lines)
    rows = sum(s.rows for s in scans)
    return InputFacts(tuple(files), rows, unify_input_schema(scans, id_column) if rows else None)


def fetched_without_building(source: str) -> bool:
    """Whether to fetch the model to read it: an s3:// or hub model's config and tokenizer are fetched if need
    be; a catalog model is never built (plan and preview have no side effects)."""
    try:
        return model_store.classify_source(source).kind in ("s3", "hub")
    except UserError:
        return False  # resolve says what is wrong with it


def model_here(job: ResolvedJob) -> Path:
    if job.model.path is None:  # a catalog model not prepared: the others were fetched or are local
        source = job.model.source
        raise UserError(f"model.source: {source} is not prepared on this machine; "
                        f"run: llmbatch models prepare {source}")
    return job.model.path
