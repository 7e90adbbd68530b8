"""Which family a checkpoint belongs to, how llmbatch will run it, and what would stop it, from config.json alone."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmbatch.cluster.families import (
    Family, cpu_supports_head_dim, cpu_supports_mla_latent, family_for_config, format_params, load_catalog,
)
from llmbatch.cluster.model_facts import ModelFacts, facts_from_config
from llmbatch.cluster.model_store import ModelRef, check_source, classify_source, is_checkpoint_dir
from llmbatch.errors import UserError

# Ways of running a family that llmbatch has an engine for today.
ENGINES_AVAILABLE = {"vllm", "vllm-transformers", "converted", "seq2seq"}
MISSING_ENGINE: dict[str, str] = {}

KIND_TEXT = {"local": "local checkpoint directory", "catalog": "catalog model, prepared in the cache",
             "s3": "s3:// model, copy in the cache", "hub": "hub model, from the local Hugging Face cache"}


@dataclass
class Inspection:
    source: str
    kind: str
    path: Path
    architecture: str
    model_type: str
    family: Family | None
    facts: ModelFacts | None
    chat_template_in_checkpoint: bool
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kv_latent: int | None = None  # MLA: the latent cached per token and layer (kv_lora_rank + qk_rope_head_dim)

    def to_dict(self) -> dict[str, Any]:
        facts = self.facts
        return {
            "source": self.source,
            "kind": self.kind,
            "path": str(self.path),
            "architecture": self.architecture,
            "model_type": self.model_type,
            "family": self.family.name if self.family else None,
            "runs_as": self.family.runs_as if self.family else None,
            "convert_to": self.family.convert_to if self.family else None,
            "chat_template_in_checkpoint": self.chat_template_in_checkpoint,
            "facts": None if facts is None else {
                "parameters": None if _is_encoder_decoder(self) else facts.parameters,
                "layers": facts.layers, "attention_heads": facts.attention_heads, "kv_heads": facts.kv_heads,
                "head_dim": facts.head_dim, "context": facts.max_context, "vocab_size": facts.vocab_size,
                "dtype": facts.dtype, "experts": facts.experts, "kv_latent": self.kv_latent,
            },
            "caveats": list(self.family.caveats) if self.family else [],
            "notes": self.notes,
            "problems": self.problems,
        }


def locate_checkpoint(source: str) -> tuple[ModelRef, Path]:
    """The checkpoint directory of SOURCE on this machine; never downloads or copies anything."""
    try:
        ref = classify_source(source)
        if ref.kind == "local":
            check_source(source)
            return ref, Path(ref.source)
        if ref.kind in ("catalog", "s3") and is_checkpoint_dir(ref.cache_dir):
            return ref, ref.cache_dir
        if ref.kind == "catalog":
            check_source(source)  # names the package to install when the GGUF is missing
            raise UserError(f"catalog model '{source}' is not prepared yet; run `llmbatch models prepare {source}` "
                            "and inspect it again")
    except UserError as exc:
        raise UserError(str(exc).removeprefix("model.source: ")) from exc
    if ref.kind == "s3":
        raise UserError(f"{source} is not on this machine: inspect reads local checkpoints only (a job copies an "
                        "s3:// model into the cache the first time it runs); inspect a local copy instead")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if not isinstance(cached, str):
        raise UserError(f"hub model '{source}' is not in the local Hugging Face cache: inspect reads local files "
                        "only and downloads nothing; download it first or inspect a local checkpoint directory")
    return ref, Path(cached).parent


def inspect_source(source: str) -> Inspection:
    ref, path = locate_checkpoint(source)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'} holds no JSON object")
    return inspect_config(config, source=source, kind=ref.kind, path=path)


def inspect_config(config: dict[str, Any], *, source: str, kind: str, path: Path) -> Inspection:
    architecture = (config.get("architectures") or ["(none)"])[0]
    family = family_for_config(config)
    try:
        facts = facts_from_config(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        facts = None
    found = Inspection(source, kind, path, architecture, str(config.get("model_type") or "(none)"), family, facts,
                       has_chat_template(path))
    runs_as = family.runs_as if family else None
    if family is None:
        found.notes.append(f"architecture {architecture} is not in the family catalog (llmbatch models families); "
                           "vLLM will be tried as-is")
    elif runs_as == "unsupported":
        reason = family.caveats[0] if family.caveats else "no engine here runs it"
        found.problems.append(f"family {family.name} is not supported: {reason}")
    elif runs_as == "converted":
        out = path.with_name(f"{path.name}-{family.convert_to}")
        found.problems.append(f"vLLM cannot run {architecture}; convert it first: llmbatch models convert "
                              f"{shlex.quote(str(path))} --to {family.convert_to} --out {shlex.quote(str(out))}")
    elif runs_as not in ENGINES_AVAILABLE:
        found.problems.append(MISSING_ENGINE.get(runs_as, f"llmbatch has no {runs_as} engine yet"))
    latent = found.kv_latent = mla_latent(config)
    if facts is None:
        found.notes.append("config.json lacks the shapes sizing reads (layers, heads, hidden size, vocabulary)")
    elif latent is not None:  # MLA caches one latent per token, attended by vLLM's MLA kernels, not per-head K/V
        if runs_as in (None, "vllm") and not cpu_supports_mla_latent(latent):
            dims = ", ".join(map(str, load_catalog().cpu_mla_latent_dims))
            found.problems.append(f"MLA latent {latent} (kv_lora_rank + qk_rope_head_dim) is not supported by "
                                  f"vLLM's CPU MLA kernel ({dims}): this model cannot run on CPU, only on GPU")
    elif runs_as in (None, "vllm", "vllm-transformers", "converted") and not cpu_supports_head_dim(facts.head_dim):
        dims = ", ".join(map(str, load_catalog().cpu_attention_head_dims))
        found.problems.append(f"head_dim {facts.head_dim} is not supported by vLLM's CPU attention ({dims}): "
                              "this model cannot run on CPU, only on GPU")
    if not found.chat_template_in_checkpoint and family and family.chat_template.startswith("checkpoint"):
        found.notes.append("this checkpoint has no chat template: input.messages_column will not work; use "
                           "input.prompt_column or input.template")
    return found


def mla_latent(config: dict[str, Any]) -> int | None:
    """The width of the latent a multi-head latent attention model (DeepSeek-V2/V3) caches per token and layer:
    kv_lora_rank + qk_rope_head_dim; None for any other attention."""
    text = config.get("text_config") or config
    rank, rope = text.get("kv_lora_rank"), text.get("qk_rope_head_dim")
    if isinstance(rank, int) and isinstance(rope, int) and not isinstance(rank, bool) and rank > 0:
        return rank + rope
    return None


def _is_encoder_decoder(found: Inspection) -> bool:
    return bool(found.family and found.family.runs_as == "seq2seq")


def has_chat_template(path: Path) -> bool:
    """Whether the checkpoint's tokenizer files carry a chat template, where transformers' tokenizer reads one:
    chat_template.jinja, additional_chat_templates/*.jinja, or tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file() or any((path / "additional_chat_templates").glob("*.jinja")):
        return True
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(tokenizer_config, dict) and bool(tokenizer_config.get("chat_template"))


def render_inspection(found: Inspection) -> str:
    family, facts = found.family, found.facts
    rows = [("source", f"{found.path} ({KIND_TEXT[found.kind]})")]
    if family:
        rows.append(("family", f"{family.name}: {family.description} ({', '.join(family.seed_models)})"))
    else:
        rows.append(("family", "not in the catalog"))
    rows.append(("architecture", f"{found.architecture} (model_type {found.model_type})"))
    rows.append(("runs as", f"{family.runs_as}: {family.runs_as_text}" if family else "vllm, tried as-is"))
    template = "in the checkpoint" if found.chat_template_in_checkpoint else "none in the checkpoint"
    rows.append(("chat template", template + (f" (family: {family.chat_template})" if family else "")))
    if facts:
        if not _is_encoder_decoder(found):
            rows.append(("parameters", f"{format_params(facts.parameters)} (from config shapes)"))
        per_stack = " per stack (encoder and decoder)" if _is_encoder_decoder(found) else ""
        rows += [("layers", f"{facts.layers}{per_stack}"),
                 ("heads", f"{facts.attention_heads} attention, {facts.kv_heads} key/value"),
                 ("head dim", str(facts.head_dim)),
                 *([("kv latent", f"{found.kv_latent} per token and layer (MLA: kv_lora_rank + qk_rope_head_dim)")]
                   if found.kv_latent else []),
                 ("context", str(facts.max_context) if facts.max_context else "no limit in config.json")]
    lines = [f"{name:<14}{value}" for name, value in rows]
    for title, items in (("caveats", family.caveats if family else []), ("notes", found.notes),
                         ("problems", found.problems)):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {item}" for item in items]
    if not found.problems:
        lines.append("problems: none found")
    return "\n".join(lines)


def engine_for_checkpoint(path: Path, source: str, *, trust_remote_code: bool = False, where: str = "model") -> str:
    """The engine a job runs this checkpoint on: `vllm`, or `seq2seq` for encoder-decoder families.
    A family that must be converted first, that nothing here runs, or whose own code the job does not allow,
    is a user error saying what to do."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "vllm"
    if not isinstance(config, dict):
        return "vllm"
    engine = _engine_for_config(config, path, source)
    _check_remote_code(config, source, trust_remote_code, where)
    _check_remote_code(_tokenizer_config(path), source, trust_remote_code, where)
    return engine


def _tokenizer_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json, whose own auto_map makes transformers load the tokenizer's code from the folder."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _engine_for_config(config: dict[str, Any], path: Path, source: str) -> str:
    family = family_for_config(config)
    if family is None or family.runs_as in ("vllm", "vllm-transformers"):
        return "vllm"
    if family.runs_as == "seq2seq":
        return "seq2seq"
    architecture = (config.get("architectures") or ["(none)"])[0]
    if family.runs_as == "converted":
        out = path.with_name(f"{path.name}-{family.convert_to}")
        raise UserError(f"model.source: {source} is {architecture}, which vLLM does not run; convert it once with "
                        f"`llmbatch models convert {shlex.quote(str(path))} --to {family.convert_to} "
                        f"--out {shlex.quote(str(out))}` and use that directory as model.source")
    reason = family.caveats[0] if family.caveats else "no engine here runs it"
    raise UserError(f"model.source: {source} is of family {family.name}, which llmbatch cannot run: {reason}")


def _check_remote_code(config: dict[str, Any], source: str, allowed: bool, where: str) -> None:
    """A checkpoint whose config points at its own Python classes (auto_map) runs that code: only when allowed."""
    auto_map = config.get("auto_map")
    if auto_map and not allowed:
        entries = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        classes = ", ".join(sorted(str(v) if isinstance(v, str) else str((v or [None])[0]) for v in entries))
        raise UserError(f"{where}.engine.trust_remote_code: {source} ships its own code ({classes}); set "
                        f"{where}.engine.trust_remote_code: true to run it, after reading it")
