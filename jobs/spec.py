"""Job spec v1: the typed, documented shape of a job file."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmbatch.errors import SpecError, name_problem
from llmbatch.pipelines.scorer_specs import (
    ChrfScorer, ContainsScorer, ExactMatchScorer, JsonSchemaScorer, JsonValidScorer, JudgeScorerBase, PythonScorer,
    RegexScorer,
)

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
NAME_RULE = "use lowercase letters, digits and '-', starting with a letter or digit"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class EngineSpec(_Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.")
    max_model_len: Optional[int] = Field(
        None, gt=0, description="Longest prompt plus generation, in tokens; null = the model's own context, "
                                "capped by what the KV cache holds (vLLM fits it on GPU, llmbatch on CPU).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each engine replica spans.")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="Share of device memory for weights and KV cache; null = a safe default per device.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")
    max_num_seqs: Optional[int] = Field(
        None, gt=0, description="Sequences an engine runs at once; null = vLLM's offline default for the GPU "
                                "(1024 on H100/H200/B200, 256 on smaller GPUs and A100), vLLM's CPU default on CPU.")
    max_num_batched_tokens: Optional[int] = Field(
        None, gt=0, description="Tokens an engine schedules per step; null = vLLM's offline default for the GPU "
                                "(16384 on H100/H200/B200, 8192 on smaller GPUs and A100), vLLM's CPU default on CPU.")
    enforce_eager: Optional[bool] = Field(
        None, description="Run the model eagerly, without torch.compile or CUDA graphs: a start up to minutes "
                          "shorter, slower steps; suits short jobs. null = on for CPU, off for GPU.")
    trust_remote_code: bool = Field(
        False, description="Run the Python code a checkpoint ships for its tokenizer or model (auto_map in "
                           "config.json; ChatGLM's real checkpoints need it). Off: such a checkpoint is refused.")


class ModelSpec(_Section):
    source: str = Field(..., min_length=1,
                        description="Catalog name, local checkpoint directory, s3:// prefix, or Hugging Face hub id.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Engine settings (a typed subset of vLLM's).")


class InputSpec(_Section):
    path: str = Field(..., min_length=1, description="File, directory, glob or prefix; local or s3://.")
    format: Literal["auto", "parquet", "jsonl", "csv"] = Field(
        "auto", description="Shard format; auto = by file extension.")
    id_column: Optional[str] = Field(
        None, description="Column holding a unique row id; null = a stable id from shard path and row number.")
    prompt_column: str = Field("prompt", min_length=1, description="Column holding the text prompt.")
    messages_column: Optional[str] = Field(
        None, description="Column holding chat messages (a list of {role, content}); replaces prompt_column.")
    template: Optional[str] = Field(
        None, description="Python format string over the row's columns that builds the prompt, e.g. 'Q: {question}'.")
    system_prompt: Optional[str] = Field(None, description="System message put before every prompt.")
    special_tokens: Literal["text", "control"] = Field(
        "text", description="Special-token text in the input's values (<|im_start|>, </s>, [INST]): text = "
                            "tokenized as the characters it is; control = as the control token it names. The chat "
                            "template's own tokens, system_prompt and template text are control tokens either way.")
    limit: Optional[int] = Field(None, gt=0, description="Process only the first N rows (smoke runs).")
    rows_per_read_task: Optional[int] = Field(
        None, ge=1, description="Rows each read task covers (a large shard is read in ranges; parquet by whole "
                                "row groups, CSV whole). A read task's rows reach one engine replica together, "
                                "so smaller ranges spread a job over more replicas. null = resources.batch_size; "
                                "never more than 256 read tasks.")
    completion_column: Optional[str] = Field(
        None, description="task: score - column holding the completion whose log-likelihood is scored.")
    choices_column: Optional[str] = Field(
        None, description="task: score - column holding a list of candidate completions; each is scored, "
                          "the most likely one is the row's choice.")

    @field_validator("template")
    @classmethod
    def _template_names_columns(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            from llmbatch.pipelines.render import template_fields

            template_fields(value)
        return value

    @model_validator(mode="after")
    def _template_or_messages(self) -> "InputSpec":
        if self.template is not None and self.messages_column is not None:
            raise ValueError("template and messages_column exclude each other: a template builds a text prompt")
        return self


class SamplingSpec(_Section):
    max_tokens: int = Field(256, gt=0, description="Most tokens generated per row.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: Optional[int] = Field(None, gt=0, description="Sample among the K most likely tokens; null = all.")
    seed: Optional[int] = Field(None, description="Random seed for sampling; null = unseeded.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a generation.")
    logprobs: Optional[int] = Field(
        None, ge=1, le=20, description="Keep the K most likely tokens at each generated position in `top_logprobs`.")


class OutputSpec(_Section):
    path: str = Field(..., min_length=1, description="Local directory or s3:// prefix; each run writes under {path}/{run_id}/.")
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0,
                                  description="Largest share of error rows a run may have and still succeed "
                                              "(0.05 = 5%); above it the run's status is failed.")
    rows_per_part: int = Field(1000, ge=1, description="Rows per parquet part, written as soon as they finish; "
                                                       "a crashed run resumes from the parts it wrote.")


class CacheSpec(_Section):
    path: str = Field(..., min_length=1,
                      description="Local directory or s3:// prefix of the result cache; runs of any job may share it. "
                                  "A row whose model, dtype, max_model_len, sampling settings and rendered prompt "
                                  "were generated before takes that result instead of running the engine.")


class JudgeScorer(JudgeScorerBase):
    model: Optional[ModelSpec] = Field(None, description="The judge model and engine; null = the job's model.")
    replicas: Optional[int] = Field(
        None, ge=1, description="Judge engine replicas; null = the job's own replica count or range.")

    def grading(self) -> JudgeScorerBase:
        """How this judge grades, without its engine: what the judge pass's Ray stages carry."""
        return JudgeScorerBase.model_validate(self.model_dump(exclude={"model", "replicas"}))


Scorer = Annotated[
    Union[ExactMatchScorer, ContainsScorer, RegexScorer, JsonValidScorer, JsonSchemaScorer, ChrfScorer,
          JudgeScorer, PythonScorer],
    Field(discriminator="kind"),
]
SCORER_KINDS = {cls.model_fields["kind"].annotation.__args__[0]: cls for cls in (
    ExactMatchScorer, ContainsScorer, RegexScorer, JsonValidScorer, JsonSchemaScorer, ChrfScorer, JudgeScorer,
    PythonScorer)}


DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str) -> float:
    """'2h', '90m', '1h30m', '45s' -> seconds."""
    match = DURATION.match(text)
    if not text.strip() or not match or not any(match.groups()):
        raise ValueError(f"'{text}' is not a duration like 2h, 90m or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class ResourcesSpec(_Section):
    replicas: Union[int, list[int], Literal["auto"]] = Field(
        1, description="Engine replicas: a number, [min, max] for a pool that grows with the backlog, "
                       "or auto (sized from a throughput profile to meet deadline / budget).")
    batch_size: int = Field(32, ge=1, description="Rows per batch sent to a replica.")
    max_concurrent_batches: Optional[int] = Field(
        None, ge=1, description="Batches each replica works on at once; null = enough to keep the engine's "
                                "max_num_seqs busy (max_num_seqs x 1.25 / batch_size, at least 8).")
    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto = GPUs when the cluster has them, else CPU.")
    accelerator_type: Optional[str] = Field(
        None, min_length=1, description="Pin replicas to one GPU type, e.g. H100 or A10G (Ray's accelerator_type).")
    deadline: Optional[str] = Field(
        None, description="With replicas: auto, finish within this long, e.g. 2h or 45m.")
    max_replicas: Optional[int] = Field(
        None, ge=1, description="With replicas: auto, never more replicas than this.")
    budget: Optional[float] = Field(
        None, gt=0, description="With replicas: auto, the most this run may cost, in USD (planner's prices).")
    scale_up_timeout: Optional[str] = Field(
        None, description="On a cluster with an autoscaler: ask it for the nodes the replicas need and wait this "
                          "long for them (e.g. 15m) before failing. null = take the cluster as it is, unless it "
                          "publishes its node types to Ray (then 15m).")

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_range(cls, value: Any) -> Union[int, list[int], str]:
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if value == "auto":
            return value
        if whole(value):
            if value < 1:
                raise ValueError("must be at least 1")
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(whole(v) for v in value) \
                and 1 <= value[0] <= value[1]:
            return list(value)
        raise ValueError("must be a number, [min, max] with 1 <= min <= max, or auto")

    @field_validator("deadline", "scale_up_timeout")
    @classmethod
    def _deadline(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _targets_need_auto(self) -> "ResourcesSpec":
        targets = [name for name in ("deadline", "max_replicas", "budget") if getattr(self, name) is not None]
        if targets and self.replicas != "auto":
            raise ValueError(f"{', '.join(targets)} size the pool only with replicas: auto")
        return self

    @property
    def deadline_seconds(self) -> Optional[float]:
        return parse_duration(self.deadline) if self.deadline else None

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) engine replicas; equal for a fixed pool. `auto` must be planned first."""
        if self.replicas == "auto":
            raise ValueError("replicas: auto has no range until the planner sizes it")
        if isinstance(self.replicas, int):
            return self.replicas, self.replicas
        return self.replicas[0], self.replicas[1]


class ScheduleSpec(_Section):
    cron: str = Field(..., description="When slots are due: a five-field cron expression, e.g. '0 2 * * *' "
                                       "(02:00 every day), read in `timezone`.")
    timezone: str = Field("UTC", description="IANA timezone the cron expression is read in, e.g. Europe/Berlin.")
    catchup: Literal["latest", "all", "none"] = Field(
        "latest", description="Slots missed while the scheduler was down or paused: latest = run the newest, "
                              "all = run each (oldest first, at most max_catchup), none = run none.")
    max_catchup: int = Field(10, ge=1, description="With catchup: all, the most missed slots run (the newest).")
    starting_deadline: Optional[str] = Field(
        None, description="A slot not started within this long of its time is recorded missed, e.g. 2h; "
                          "null = no deadline.")
    concurrency: Literal["allow", "forbid", "replace"] = Field(
        "forbid", description="A slot due while runs of this schedule are active: allow = run it (up to "
                              "max_active at once, later slots wait), forbid = skip it, replace = cancel them.")
    max_active: int = Field(1, ge=1, description="With concurrency: allow, runs of this schedule at once.")
    paused: bool = Field(False, description="No slot fires while paused (they count as missed).")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"'{value}' is not a five-field cron expression (minute hour day month weekday), "
                             "e.g. '0 2 * * *'")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"'{value}' is not an IANA timezone name, e.g. UTC or Europe/Berlin") from None
        return value

    @field_validator("starting_deadline")
    @classmethod
    def _starting_deadline(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parse_duration(value)
        return value


class JobSpec(_Section):
    name: str = Field(..., pattern=NAME_PATTERN, description="Job name: lowercase letters, digits and '-'.")
    task: Literal["generate", "score"] = Field(
        "generate", description="generate = sample completions; score = log-likelihood of given completions.")
    model: ModelSpec = Field(..., description="Which model and how to run it.")
    input: InputSpec = Field(..., description="Where the prompts are and how to read them.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How to generate.")
    scoring: list[Scorer] = Field(default_factory=list, description="Scorers; each adds a score_<name> column.")
    output: OutputSpec = Field(..., description="Where results go.")
    cache: Optional[CacheSpec] = Field(
        None, description="Reuse results across runs (greedy or seeded sampling only); null = no cache.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Replicas and batching.")
    schedule: Optional[ScheduleSpec] = Field(
        None, description="Run the job on a schedule (`llmbatch schedule apply`); input.path and output.path may "
                          "then hold {ds}, {slot}, {data_interval_start} and {data_interval_end}.")

    @field_validator("scoring")
    @classmethod
    def _unique_scorer_names(cls, value: list) -> list:
        names = [s.name for s in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"scorer names must be unique; repeated: {', '.join(repeated)}")
        taken = sorted({s.name + "_raw" for s in value if s.kind == "judge"} & set(names))
        if taken:
            raise ValueError(f"scorer name {taken[0]} clashes with the judge column score_{taken[0]}")
        return value

    @model_validator(mode="after")
    def _task_inputs(self) -> "JobSpec":
        given = [n for n in ("completion_column", "choices_column") if getattr(self.input, n) is not None]
        if self.task == "score" and len(given) != 1:
            raise ValueError("task: score needs exactly one of input.completion_column or input.choices_column")
        if self.task == "generate" and given:
            raise ValueError(f"input.{given[0]}: only used with task: score")
        if self.task == "score" and self.sampling.logprobs is not None:
            raise ValueError("sampling.logprobs: task: score generates nothing to keep top logprobs of")
        if self.task == "score" and self.cache is not None:
            raise ValueError("cache: task: score results are not cached; remove the cache section")
        if self.task == "score" and self.input.messages_column is not None:
            raise ValueError("input.messages_column: task: score continues a text prompt; "
                             "use input.prompt_column or input.template")
        return self

    @model_validator(mode="after")
    def _slot_templates(self) -> "JobSpec":
        from llmbatch.jobs.slots import TEMPLATE_FIELDS

        for field, path in (("input.path", self.input.path), ("output.path", self.output.path)):
            used = [name for name in TEMPLATE_FIELDS if "{" + name + "}" in path]
            if used and self.schedule is None:
                raise ValueError(f"{field}: {{{used[0]}}} is filled in per slot by a schedule; add a schedule "
                                 "section, or write the path out")
        return self

    @field_validator("name", mode="before")
    @classmethod
    def _name_hint(cls, value: Any) -> Any:
        problem = name_problem(value, "a-z0-9-", "a-z0-9", "-", NAME_RULE) if isinstance(value, str) else None
        if problem:
            raise ValueError(problem)
        return value


# ---- loading -----------------------------------------------------------------------------------

def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a job file ('-' = standard input), apply `key.path=value` overrides, and validate it. Relative
    paths in the file are taken from the file's folder; in --set values and standard input, from the current
    directory."""
    if str(path) == "-":
        import sys

        raw = parse_yaml(sys.stdin.read(), "<stdin>")
        for item in overrides or []:
            apply_override(raw, item)
        anchor_paths(raw, Path.cwd())
        return validate_spec(raw, source="<stdin>")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        looked = "" if path.is_absolute() else f" (looked at {path.absolute()})"
        raise SpecError([f"{path}: no such job file{looked}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read job file ({exc})"]) from None
    raw = parse_yaml(text, str(path))
    anchor_paths(raw, path.absolute().parent)
    for item in overrides or []:
        apply_override(raw, item)
        anchor_paths(raw, Path.cwd(), only=item.partition("=")[0].strip())
    return validate_spec(raw, source=str(path))


def _path_fields(raw: dict) -> list[tuple[str, dict, str, bool]]:
    """(YAML path, section, key, is a model source) of each local path a job file may hold."""
    fields = []
    for section in ("input", "output", "cache"):
        if isinstance(raw.get(section), dict):
            fields.append((f"{section}.path", raw[section], "path", False))
    if isinstance(raw.get("model"), dict):
        fields.append(("model.source", raw["model"], "source", True))
    for number, scorer in enumerate(raw.get("scoring") or []):
        if isinstance(scorer, dict) and isinstance(scorer.get("model"), dict):
            fields.append((f"scoring.{number}.model.source", scorer["model"], "source", True))
    return fields


def anchor_paths(raw: dict, base: Path, only: str | None = None) -> None:
    """Make the job's relative local paths absolute against `base`: the job file's folder for what the file
    says, the current directory for --set values. A model source is a path when it starts with ./ or ../, or
    when it names something that exists under `base`; catalog names and hub ids stay as they are."""
    for where, section, key, is_model in _path_fields(raw):
        if only is not None and not (where == only or where.startswith(only + ".")):
            continue
        value = section.get(key)
        if not isinstance(value, str) or not value.strip() or "://" in value:
            continue
        if value.startswith(("/", "~")):
            continue
        if is_model and not (value.startswith(("./", "../")) or (base / value).exists()):
            continue
        section[key] = os.path.normpath(os.path.join(base, value)) + ("/" if value.endswith("/") else "")


def parse_yaml(text: str, source: str) -> dict:
    try:
        repeated = repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{where}: not valid YAML ({problem})"]) from None
    if repeated:
        raise SpecError(repeated, source=source)
    if raw is None:
        raise SpecError([f"{source}: the job file is empty"])
    if not isinstance(raw, dict):
        raise SpecError([f"{source}: the job file must be a mapping of sections (name, model, input, ...)"])
    return raw


def repeated_keys(node, path: str = "") -> list[str]:
    """A key given twice in one mapping, by its YAML path: YAML keeps the last one silently."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{path}.{key}" if path else key
            if key in first and key != "<<":
                problems.append(f"{where}: given twice (lines {first[key] + 1} and {key_node.start_mark.line + 1}); "
                                "the second would replace the first: keep one")
            first.setdefault(key, key_node.start_mark.line)
            problems += repeated_keys(value_node, where)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += repeated_keys(item, f"{path}.{index}")
    return problems


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the raw spec; the value is parsed as YAML (64 -> int, [a, b] -> list)."""
    if "=" not in item:
        raise SpecError([f"--set {item}: expected key.path=value"])
    key, _, value_text = item.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise SpecError([f"--set {item}: expected key.path=value"])
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SpecError([f"--set {item}: {where} is not a section"])
        node = child
    node[parts[-1]] = value


def validate_spec(raw: dict, source: str | None = None) -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_errors(exc), source=source) from None


UNION_TAG_ERRORS = ("union_tag_invalid", "union_tag_not_found")


def format_validation_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        path = _yaml_path(err)
        message = _message(err)
        if not path and re.match(r"^[a-z_.]+: ", message):
            lines.append(message)  # a cross-section rule names its own path
        else:
            lines.append(f"{path or '(top level)'}: {message}")
    return sorted(set(lines), key=lines.index)


def _yaml_path(err: dict) -> str:
    loc = [str(p) for p in _without_union_tags(err["loc"])]
    if err["type"] in UNION_TAG_ERRORS:
        loc.append("kind")
    return ".".join(loc)


def _without_union_tags(loc: tuple) -> tuple:
    """pydantic puts the scorer kind into error paths (scoring.0.regex.pattern); the YAML has no such level."""
    parts = list(loc)
    for i in range(len(parts) - 2):
        if parts[i] == "scoring" and isinstance(parts[i + 1], int) and parts[i + 2] in SCORER_KINDS:
            del parts[i + 2]
            break
    return tuple(parts)


def _message(err: dict) -> str:
    kind = err["type"]
    if kind in UNION_TAG_ERRORS:
        return _scorer_kind_message(err)
    if kind == "extra_forbidden":
        loc = [p for p in err["loc"]]
        known = _known_keys(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known keys: {', '.join(known)})"
        return "unknown key" + hint
    if kind == "missing":
        return "required"
    if _is_empty(err):
        return _empty_message(err["loc"])
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    if kind == "string_pattern_mismatch":
        msg = f"{err['input']!r} does not match the pattern {err['ctx']['pattern']}"
    return msg


def _scorer_kind_message(err: dict) -> str:
    kinds = ", ".join(SCORER_KINDS)
    given = err["input"].get("kind") if isinstance(err["input"], dict) else None
    if given is None:
        return f"required; the kinds are {kinds}"
    guess = difflib.get_close_matches(str(given).lower().replace("-", "_"), list(SCORER_KINDS), n=1, cutoff=0.6)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return f"{given!r} is not a scorer kind{hint}; the kinds are {kinds}"


def _is_empty(err: dict) -> bool:
    """A key given without a value (YAML null), or an empty text where text is required."""
    if err["type"] == "string_too_short":
        return err["input"] == ""
    return err["input"] is None and err["type"].endswith("_type")


def _empty_message(loc: tuple) -> str:
    field = _field_at(loc)
    if field is None:
        return "must not be empty"
    about = f" ({_first_sentence(field.description)})" if field.description else ""
    if field.is_required():
        return f"must not be empty{about}"
    default = _yaml_scalar(field.get_default(call_default_factory=True))
    return f"must not be empty{about}; leave the key out for the default, {default}"


def _first_sentence(text: str) -> str:
    return re.split(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")


def _section_at(loc: tuple | list) -> type[BaseModel] | None:
    """The section whose keys the mapping at pydantic's `loc` holds (a scorer's kind is part of `loc`)."""
    model: type[BaseModel] = JobSpec
    for i, part in enumerate(loc):
        if str(part) in SCORER_KINDS and i >= 2 and loc[i - 2] == "scoring":
            model = SCORER_KINDS[str(part)]
            continue
        if isinstance(part, int) or (model is JobSpec and part == "scoring"):
            continue
        annotation = getattr(_field_of(model, str(part)), "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif _optional_section(annotation) is not None:
            model = _optional_section(annotation)
        else:
            return None
    return model


def _field_of(model: type[BaseModel], key: str) -> Any:
    """The field a YAML key names: by name, or by alias (a json_schema scorer's `schema`)."""
    return model.model_fields.get(key) or next(
        (field for field in model.model_fields.values() if field.alias == key), None)


def _field_at(loc: tuple) -> Any:
    section = _section_at(loc[:-1]) if loc else None
    return _field_of(section, str(loc[-1])) if section is not None else None


def _known_keys(loc: list) -> list[str]:
    section = _section_at(loc)
    return [field.alias or name for name, field in section.model_fields.items()] if section is not None else []


def spec_reference() -> str:
    """Every field with its default and description, as YAML-like text (for docs and `--help`)."""
    out: list[str] = []

    def walk(model: type[BaseModel], indent: int) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            pad = "  " * indent
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"{pad + name + ':':<31} # {field.description}")
                walk(ann, indent + 1)
            elif _optional_section(ann) is not None:  # a section that is off unless given (cache)
                out.append(f"{pad + name + ':':<31} # {field.description} Fields:")
                walk(_optional_section(ann), indent + 1)
            elif model is JobSpec and name == "scoring":
                out.append(f"{pad + name + ':':<31} # {field.description} Each item is one of:")
                for kind, scorer in SCORER_KINDS.items():
                    out.append(f"{pad + '  - kind: ' + kind:<31} # {scorer.model_fields['kind'].description}")
                    for key, sub in scorer.model_fields.items():
                        if key == "kind":
                            continue
                        default = "(required)" if sub.is_required() else _yaml_scalar(
                            sub.get_default(call_default_factory=True))
                        left = f"{pad}    {sub.alias or key}: {default}"
                        out.append(f"{left:<31} # {sub.description}")
            else:
                default = "(required)" if field.is_required() else _yaml_scalar(field.get_default(call_default_factory=True))
                left = f"{pad}{name}: {default}"
                out.append(f"{left:<31} # {field.description}")

    walk(JobSpec, 0)
    return "\n".join(out)


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """The section model of an `Optional[Section]` field, else None."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
