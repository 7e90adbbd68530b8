"""Job spec v1: the typed, documented shape of a job file."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jobs.errors import SpecError

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class EngineSpec(_Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype; auto = float32 on CPU, the checkpoint's dtype on GPU.")
    max_model_len: Optional[int] = Field(
        2048, gt=0, description="Longest prompt plus generation, in tokens; null = the model's own limit.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each engine replica spans.")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="Share of device memory for weights and KV cache; null = a safe default per device.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")


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
    limit: Optional[int] = Field(None, gt=0, description="Process only the first N rows (smoke runs).")

    @field_validator("template")
    @classmethod
    def _template_names_columns(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            from pipelines.render import template_fields

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


class OutputSpec(_Section):
    path: str = Field(..., min_length=1, description="Local directory or s3:// prefix; each run writes under {path}/{run_id}/.")


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

    @field_validator("deadline")
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


class JobSpec(_Section):
    name: str = Field(..., pattern=NAME_PATTERN, description="Job name: lowercase letters, digits and '-'.")
    model: ModelSpec = Field(..., description="Which model and how to run it.")
    input: InputSpec = Field(..., description="Where the prompts are and how to read them.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="How to generate.")
    output: OutputSpec = Field(..., description="Where results go.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Replicas and batching.")

    @field_validator("name", mode="before")
    @classmethod
    def _name_hint(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.match(NAME_PATTERN, value):
            raise ValueError("must use lowercase letters, digits and '-' only, starting with a letter or digit")
        return value


# ---- loading -----------------------------------------------------------------------------------

def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a job file ('-' = standard input), apply `key.path=value` overrides, and validate it."""
    if str(path) == "-":
        import sys

        raw = parse_yaml(sys.stdin.read(), "<stdin>")
        for item in overrides or []:
            apply_override(raw, item)
        return validate_spec(raw, source="<stdin>")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([f"{path}: no such job file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{path}: cannot read job file ({exc})"]) from None
    raw = parse_yaml(text, str(path))
    for item in overrides or []:
        apply_override(raw, item)
    return validate_spec(raw, source=str(path))


def parse_yaml(text: str, source: str) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{where}: not valid YAML ({problem})"]) from None
    if raw is None:
        raise SpecError([f"{source}: the job file is empty"])
    if not isinstance(raw, dict):
        raise SpecError([f"{source}: the job file must be a mapping of sections (name, model, input, ...)"])
    return raw


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


def format_validation_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc) or "(top level)"
        lines.append(f"{where}: {_message(err)}")
    return sorted(set(lines), key=lines.index)


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        loc = [p for p in err["loc"]]
        known = _known_keys(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known keys: {', '.join(known)})"
        return "unknown key" + hint
    if kind == "missing":
        return "required"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    if msg.startswith("String should match pattern"):
        msg = "has a character that is not allowed"
    return msg


def _known_keys(loc: list) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


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
            else:
                default = "(required)" if field.is_required() else _yaml_scalar(field.get_default(call_default_factory=True))
                left = f"{pad}{name}: {default}"
                out.append(f"{left:<31} # {field.description}")

    walk(JobSpec, 0)
    return "\n".join(out)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
