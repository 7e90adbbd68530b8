"""What a checkpoint's config says about its size: parameters, weight bytes, KV-cache bytes per token."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    parameters: int
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int | None
    dtype: str
    experts: int = 1
    intermediate_size: int = 0     # the MLP's width (0: unknown, taken as 4 x hidden_size)

    def weight_bytes(self, dtype: str | None = None) -> int:
        return self.parameters * DTYPE_BYTES[dtype or self.dtype]

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype or self.dtype]


def _first(config: dict, *keys: str, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def context_of(config: dict[str, Any]) -> int | None:
    """The context length a config declares (a multimodal model's is in its text_config)."""
    for section in (config.get("text_config") or {}, config):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def facts_from_config(config: dict[str, Any]) -> ModelFacts:
    """Count parameters from the shapes in a Hugging Face config (decoder-only families)."""
    text = config.get("text_config") or config
    arch = (config.get("architectures") or ["unknown"])[0]
    model_type = config.get("model_type", "")
    hidden = int(_first(text, "hidden_size", "n_embd", "d_model"))
    layers = int(_first(text, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_first(text, "num_attention_heads", "n_head", "num_heads"))
    kv_heads = int(_first(text, "num_key_value_heads", "multi_query_group_num", default=heads))
    if text.get("multi_query") and "num_key_value_heads" not in text:
        kv_heads = 1
    head_dim = int(_first(text, "head_dim", "kv_channels", "d_kv", default=hidden // heads))
    vocab = int(_first(text, "vocab_size", "padded_vocab_size"))
    inter = int(_first(text, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff",
                       default=4 * hidden))
    experts = int(_first(text, "num_local_experts", "num_experts", "n_routed_experts", default=1))
    tied = bool(text.get("tie_word_embeddings", model_type in ("opt", "gpt2", "bloom", "gpt_bigcode")))
    max_context = context_of(config)
    dtype = str(_first(config, "torch_dtype", "dtype", default="float16")).replace("torch.", "")

    q_out = heads * head_dim
    kv_out = kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    gated = model_type in ("llama", "mistral", "mixtral", "qwen2", "gemma", "glm4", "glm", "chatglm", "phi3") \
        or text.get("hidden_act") in ("silu", "swiglu")
    mlp = (3 if gated else 2) * hidden * inter
    router = hidden * experts if experts > 1 else 0
    per_layer = attention + mlp * experts + router + 4 * hidden  # + norms and biases (approximate)
    embeddings = vocab * hidden * (1 if tied else 2)
    if model_type == "opt":
        embeddings += (int(max_context or 2048) + 2) * hidden
    parameters = layers * per_layer + embeddings + hidden
    return ModelFacts(arch, int(parameters), layers, hidden, heads, kv_heads, head_dim, vocab,
                      int(max_context) if max_context else None,
                      dtype if dtype in DTYPE_BYTES else "float16", experts, inter)


def facts_for_checkpoint(path: Path) -> ModelFacts:
    return facts_from_config(json.loads((path / "config.json").read_text()))
