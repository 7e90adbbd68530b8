"""Rewrite a CodeGen checkpoint as the exactly equivalent GPT-J checkpoint, which vLLM runs natively.

CodeGen is GPT-J with the query, key and value projections fused into one `qkv_proj`, laid out for 4
TPU cores: transformers' CodeGenAttention reshapes the fused output to (mp_num=4, 3*H/4) and splits each
slice into query, value, key (in that order), each H/4 wide; the heads of slice m come before those of
slice m+1. So the fused weight (3H, H) viewed as (4, 3, H/4, H) holds q at [:, 0], v at [:, 1], k at [:, 2],
and concatenating the 4 slices gives GPT-J's q_proj, v_proj and k_proj. Everything else keeps its name.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmbatch.errors import UserError

MP_NUM = 4  # fixed in transformers' CodeGenAttention.forward
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DROPPED_BUFFERS = (".attn.causal_mask", ".attn.masked_bias", ".attn.bias")  # non-persistent in current transformers
GPTJ_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner",
             "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon",
             "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")


def is_codegen(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "codegen" or "CodeGenForCausalLM" in (config.get("architectures") or [])


def gptj_config(codegen: dict[str, Any]) -> dict[str, Any]:
    """GPT-J's config.json for a CodeGen config: the same shapes under GPT-J's names, untied head."""
    config = {"architectures": ["GPTJForCausalLM"], "model_type": "gptj"}
    config.update({key: codegen[key] for key in GPTJ_KEYS if key in codegen})
    config["tie_word_embeddings"] = False
    return config


def split_qkv(weight, n_embd: int):
    """CodeGen's fused (3H, H) qkv_proj weight -> GPT-J's (q, k, v) weights, each (H, H)."""
    if tuple(weight.shape) != (3 * n_embd, n_embd):
        raise UserError(f"qkv_proj weight has shape {tuple(weight.shape)}, expected {(3 * n_embd, n_embd)}")
    slices = weight.reshape(MP_NUM, 3, n_embd // MP_NUM, n_embd)
    query, value, key = (slices[:, i].reshape(n_embd, n_embd).contiguous() for i in range(3))
    return query, key, value


def convert_state_dict(state: dict[str, Any], n_embd: int) -> dict[str, Any]:
    converted = {}
    for name, tensor in state.items():
        if name.endswith(DROPPED_BUFFERS):
            continue
        if name.endswith("attn.qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            query, key, value = split_qkv(tensor, n_embd)
            converted.update({f"{prefix}q_proj.weight": query, f"{prefix}k_proj.weight": key,
                              f"{prefix}v_proj.weight": value})
        else:
            converted[name] = tensor.contiguous()
    return converted


def load_state_dict(path: Path) -> dict[str, Any]:
    """Every tensor of a checkpoint directory: safetensors or PyTorch .bin, one file or sharded."""
    import torch
    from safetensors.torch import load_file

    files: list[Path] = []
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            shards = json.loads((path / index).read_text())["weight_map"].values()
            files = [path / shard for shard in sorted(set(shards))]
            break
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{path} holds no weights (model.safetensors or pytorch_model.bin)")
    state: dict[str, Any] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(file))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def convert_codegen(source: Path, out: Path, *, log=None) -> Path:
    """Write the GPT-J form of the CodeGen checkpoint at `source` to `out` (all or nothing)."""
    from huggingface_hub import save_torch_state_dict

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if not is_codegen(config):
        arch = (config.get("architectures") or ["no architecture"])[0]
        raise UserError(f"{source} is {arch} (model_type {config.get('model_type')}), not a CodeGen checkpoint; "
                        "models convert --to gptj takes CodeGenForCausalLM only")
    n_embd, n_head = int(config["n_embd"]), int(config["n_head"])
    if n_head % MP_NUM or n_embd % n_head:
        raise UserError(f"{source}: n_head {n_head} must be a multiple of {MP_NUM} and divide n_embd {n_embd}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory")
    if log:
        log.info("model_convert_started", source=str(source), out=str(out), to="gptj")
    state = load_state_dict(source)
    if not any(name.endswith("attn.qkv_proj.weight") for name in state):
        raise UserError(f"{source}: the weights hold no attn.qkv_proj.weight; not a CodeGen checkpoint")
    if "lm_head.weight" not in state:
        raise UserError(f"{source}: the weights hold no lm_head.weight; expected a CodeGenForCausalLM checkpoint")
    converted = convert_state_dict(state, n_embd)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_torch_state_dict(converted, staging, max_shard_size="5GB")
        (staging / "config.json").write_text(json.dumps(gptj_config(config), indent=2) + "\n")
        for file in sorted(source.iterdir()):
            if file.is_file() and not _is_weights_or_config(file):
                shutil.copy2(file, staging / file.name)  # tokenizer, generation config, licence
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if log:
        log.info("model_convert_finished", out=str(out), tensors=len(converted))
    return out


def _is_weights_or_config(file: Path) -> bool:
    return (file.name.startswith(".") or file.name == "config.json" or file.name in WEIGHT_INDEXES
            or file.suffix in WEIGHT_SUFFIXES)
