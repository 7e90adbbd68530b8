"""The open model families llmbatch knows (cluster/families.yaml): how each runs, known sizes, caveats."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FAMILIES_FILE = Path(__file__).with_name("families.yaml")

RunsAs = Literal["vllm", "vllm-transformers", "converted", "seq2seq", "unsupported"]

RUNS_AS_TEXT: dict[str, str] = {
    "vllm": "vLLM, its native implementation",
    "vllm-transformers": "vLLM, through its Transformers backend",
    "converted": "vLLM natively, once converted to {convert_to} with `llmbatch models convert`",
    "seq2seq": "a seq2seq engine (batched Hugging Face generate), not vLLM",
    "unsupported": "not supported",
}

_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_params(value: Any) -> int:
    """125M, 6.74B, 46.7B or a plain integer -> a parameter count."""
    if isinstance(value, bool):
        raise ValueError("expected a parameter count such as 125M or 6.74B")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBT])\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"'{value}' is not a parameter count such as 125M or 6.74B")
    return round(float(match[1]) * _UNITS[match[2].upper()])


def format_params(count: int) -> str:
    for unit in ("T", "B", "M", "K"):
        if count >= _UNITS[unit]:
            return f"{count / _UNITS[unit]:.3g}{unit}"
    return str(count)


class KnownSize(BaseModel):
    """One released size of a family, with the figures sizing uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the released checkpoint's name, e.g. Llama-2-7B")
    params: int = Field(gt=0, description="parameter count; in YAML a number with a unit: 125M, 6.74B")
    layers: int = Field(gt=0, description="transformer layers (per stack for encoder-decoder models)")
    kv_heads: int = Field(gt=0, description="key/value heads per layer (fewer than query heads under GQA/MQA)")
    head_dim: int = Field(gt=0, description="dimension of one attention head")
    context: int | None = Field(description="max_position_embeddings or trained length; null when unbounded")
    kv_latent: int | None = Field(default=None, gt=0, description="MLA only: the latent cached per token and layer "
                                  "(kv_lora_rank + qk_rope_head_dim) in place of keys and values per KV head")

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> int:
        return parse_params(value)


class Family(BaseModel):
    """One model family: which checkpoints belong to it and how llmbatch runs them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="family name, e.g. llama")
    description: str = Field(min_length=1, description="one line on what the family is")
    seed_models: list[str] = Field(min_length=1, description="user-facing models in this family")
    architectures: list[str] = Field(description="Hugging Face `architectures` names in config.json")
    model_types: list[str] = Field(description="config.json `model_type` values")
    runs_as: RunsAs = Field(description="vllm | vllm-transformers | converted | seq2seq | unsupported")
    convert_to: Literal["gptj"] | None = Field(default=None, description="target layout when runs_as is converted")
    chat_template: str = Field(min_length=1, description="where the chat template comes from")
    sizes: list[KnownSize] = Field(default_factory=list, description="known released sizes")
    caveats: list[str] = Field(default_factory=list, description="what a user must know before choosing it")

    @model_validator(mode="after")
    def _consistent(self) -> "Family":
        if (self.runs_as == "converted") != (self.convert_to is not None):
            raise ValueError(f"family {self.name}: convert_to is required with runs_as converted, and only then")
        if self.runs_as != "unsupported" and not self.architectures:
            raise ValueError(f"family {self.name}: a family that runs needs its architectures")
        return self

    @property
    def runs_as_text(self) -> str:
        return RUNS_AS_TEXT[self.runs_as].format(convert_to=self.convert_to)


class FamilyCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_attention_head_dims: list[int] = Field(min_length=1, description="head dims vLLM's CPU attention supports")
    cpu_mla_latent_dims: list[int] = Field(default_factory=lambda: [576], min_length=1,
                                           description="MLA latent widths vLLM's CPU MLA kernel supports")
    families: list[Family] = Field(min_length=1, description="every family, in display order")

    @model_validator(mode="after")
    def _unique(self) -> "FamilyCatalog":
        seen: dict[str, str] = {}
        for family in self.families:
            for key in [f"name {family.name}"] + [f"architecture {a}" for a in family.architectures] \
                    + [f"model_type {t}" for t in family.model_types]:
                if key in seen:
                    raise ValueError(f"{key} is listed by both {seen[key]} and {family.name}")
                seen[key] = family.name
        return self

    def family(self, name: str) -> Family | None:
        return next((f for f in self.families if f.name == name), None)

    def size(self, name: str) -> tuple[Family, KnownSize] | None:
        """The released size called `name` (case aside), with its family."""
        wanted = name.strip().lower()
        return next(((f, s) for f in self.families for s in f.sizes if s.name.lower() == wanted), None)


@lru_cache(maxsize=1)
def load_catalog() -> FamilyCatalog:
    return FamilyCatalog.model_validate(yaml.safe_load(FAMILIES_FILE.read_text(encoding="utf-8")))


def load_families() -> list[Family]:
    return list(load_catalog().families)


def family_for_config(config: dict[str, Any]) -> Family | None:
    """The family of a checkpoint's config.json: by `architectures` first, then by `model_type`."""
    families = load_families()
    for arch in config.get("architectures") or []:
        for family in families:
            if arch in family.architectures:
                return family
    model_type = config.get("model_type")
    for family in families:
        if model_type and model_type in family.model_types:
            return family
    return None


def cpu_supports_head_dim(head_dim: int) -> bool:
    return head_dim in load_catalog().cpu_attention_head_dims


def cpu_supports_mla_latent(latent: int) -> bool:
    return latent in load_catalog().cpu_mla_latent_dims


def render_families(catalog: FamilyCatalog | None = None) -> str:
    """The catalog as an aligned table, then every family's caveats."""
    catalog = catalog or load_catalog()
    rows = [("FAMILY", "RUNS AS", "ARCHITECTURES", "SEED MODELS")]
    for f in catalog.families:
        runs_as = f"{f.runs_as} -> {f.convert_to}" if f.convert_to else f.runs_as
        rows.append((f.name, runs_as, ", ".join(f.architectures) or "-", ", ".join(f.seed_models)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines += ["", "runs as:"]
    lines += [f"  {key:<{widths[1]}}  {text.format(convert_to='another layout')}" for key, text in RUNS_AS_TEXT.items()]
    lines += ["", "vLLM's CPU attention supports head_dim " + ", ".join(map(str, catalog.cpu_attention_head_dims))
              + " only; its MLA (DeepSeek) kernel a latent of " + ", ".join(map(str, catalog.cpu_mla_latent_dims))
              + " only", "", "caveats:"]
    for f in catalog.families:
        for caveat in f.caveats:
            lines.append(f"  {f.name}: {caveat}")
    return "\n".join(lines)
