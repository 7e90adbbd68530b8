"""What a checkpoint's config says about its size: parameters, weight bytes, KV-cache bytes per token."""
from __future__ import annotations

import json
import math
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
    experts_per_token: int = 1     # experts a mixture of experts routes each token to
    active_parameters: int = 0     # parameters one token runs through (0: all of them)
    quantization: str | None = None   # the checkpoint's weight format when quantized: fp8, int8 or int4
    kv_latent: int = 0             # MLA (DeepSeek-V2/V3): the one latent a layer caches per token, kv_lora_rank +
    #                                qk_rope_head_dim, in place of keys and values per KV head (0: not MLA). vLLM
    #                                keeps this cache whole on every tensor-parallel rank (it has no heads to split)

    @property
    def parameters_per_token(self) -> int:
        return self.active_parameters or self.parameters

    def weight_bytes(self, dtype: str | None = None) -> int:
        return self.parameters * DTYPE_BYTES[dtype or self.dtype]

    def kv_shards(self, tensor_parallel_size: int) -> int:
        """Over how many of a replica's GPUs its KV cache is split: all of them, except under MLA, where vLLM
        keeps the whole latent cache on each."""
        return 1 if self.kv_latent else tensor_parallel_size

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """Keys and values of every layer for one token (under MLA, every layer's latent)."""
        if self.kv_latent:
            return self.layers * self.kv_latent * DTYPE_BYTES[dtype or self.dtype]
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


# Families whose MLP is gated (gate, up and down projections: SwiGLU / GeGLU) whatever their hidden_act says;
# Gemma's activation is gelu_pytorch_tanh, as is the ungated MLP of GPT-BigCode and StarCoder2.
GATED_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "glm4", "glm", "chatglm", "phi3", "deepseek_v2", "deepseek_v3", "olmo", "olmo2", "olmoe",
    "cohere", "cohere2", "granite", "granitemoe", "internlm2", "exaone",
})
# Families whose configs tie the output head to the input embeddings unless they say otherwise.
TIED_BY_DEFAULT = frozenset({"opt", "gpt2", "bloom", "gpt_bigcode", "gemma", "gemma2", "gemma3", "gemma3_text"})


def _count(value: Any, default: int = 0) -> int:
    """A config's integer (None, absent or not a number: `default`)."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _moe_layers(text: dict[str, Any], layers: int, experts: int) -> int:
    """How many decoder layers hold the experts: all of them, less DeepSeek's first_k_dense_replace dense layers
    (and every moe_layer_freq-th of the rest), less Qwen-MoE's mlp_only_layers (and every decoder_sparse_step-th)."""
    if experts <= 1:
        return 0
    first_dense = _count(text.get("first_k_dense_replace"))
    freq = max(1, _count(text.get("moe_layer_freq"), 1))
    step = max(1, _count(text.get("decoder_sparse_step"), 1))
    dense_only = set(text.get("mlp_only_layers") or [])
    return sum(1 for i in range(layers)
               if i >= first_dense and i % freq == 0 and i not in dense_only and (i + 1) % step == 0)


def facts_from_config(config: dict[str, Any]) -> ModelFacts:
    """Count parameters from the shapes in a Hugging Face config (decoder-only families).

    Attention is grouped-query, or DeepSeek's multi-head latent attention (MLA) when the config has kv_lora_rank:
    low-rank query (q_lora_rank, else a full query projection) and key/value projections, heads of
    qk_nope_head_dim + qk_rope_head_dim (the facts' head_dim; values are v_head_dim wide), one latent of
    kv_lora_rank + qk_rope_head_dim cached per token and layer. A mixture of experts has num_local_experts /
    num_experts / n_routed_experts experts of moe_intermediate_size (else intermediate_size) in its MoE layers,
    plus shared experts (shared_expert_intermediate_size, or n_shared_experts x moe_intermediate_size) that every
    token runs; dense layers (first_k_dense_replace, mlp_only_layers) have an MLP of intermediate_size. The
    active parameters are all of them but the experts a token is not routed to (the embeddings included).
    DeepSeek-V3's multi-token-prediction module (num_nextn_predict_layers) is not counted: vLLM loads it only for
    speculative decoding, and the published 671B leaves it out."""
    text = config.get("text_config") or config
    arch = (config.get("architectures") or ["unknown"])[0]
    model_type = config.get("model_type", "")
    model_types = {model_type, text.get("model_type", model_type)}
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
    experts = max(1, _count(_first(text, "num_local_experts", "num_experts", "n_routed_experts"), 1))
    routed = int(_first(text, "num_experts_per_tok", "moe_topk", "num_selected_experts", default=experts))
    tied = bool(text.get("tie_word_embeddings", bool(model_types & TIED_BY_DEFAULT)))
    max_context = context_of(config)
    dtype = str(_first(config, "torch_dtype", "dtype", default="float16")).replace("torch.", "")

    kv_lora = _count(text.get("kv_lora_rank"))
    kv_latent = 0
    if kv_lora > 0:  # MLA; a config's head_dim here is the rope width (transformers sets it so), not the heads'
        rope, nope = _count(text.get("qk_rope_head_dim")), _count(text.get("qk_nope_head_dim"))
        v_dim, q_lora = _count(text.get("v_head_dim"), nope), _count(text.get("q_lora_rank"))
        head_dim, kv_heads, kv_latent = nope + rope, heads, kv_lora + rope
        query = hidden * q_lora + q_lora + q_lora * heads * head_dim if q_lora else hidden * heads * head_dim
        attention = (query + hidden * kv_latent + kv_lora + kv_lora * heads * (nope + v_dim)
                     + heads * v_dim * hidden)
    else:
        q_out = heads * head_dim
        kv_out = kv_heads * head_dim
        attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    gated = bool(model_types & GATED_MODEL_TYPES) or text.get("hidden_act") in ("silu", "swiglu")
    per_width = (3 if gated else 2) * hidden    # an MLP's parameters per unit of its width

    moe_layers = _moe_layers(text, layers, experts)
    expert = per_width * int(_first(text, "moe_intermediate_size", default=inter)) if moe_layers else 0
    shared_width = _count(text.get("shared_expert_intermediate_size")) \
        or _count(text.get("n_shared_experts")) * _count(text.get("moe_intermediate_size"))
    shared = per_width * shared_width + (hidden if text.get("shared_expert_intermediate_size") else 0)  # + its gate
    moe_mlp = expert * experts + hidden * experts + shared          # experts, router, shared experts
    mlps = (layers - moe_layers) * per_width * inter + moe_layers * moe_mlp
    norms = layers * 4 * hidden  # + norms and biases (approximate)
    embeddings = vocab * hidden * (1 if tied else 2)
    if model_type == "opt":
        embeddings += (int(max_context or 2048) + 2) * hidden
    parameters = layers * attention + mlps + norms + embeddings + hidden
    idle_experts = moe_layers * expert * (experts - routed)
    return ModelFacts(arch, int(parameters), layers, hidden, heads, kv_heads, head_dim, vocab,
                      int(max_context) if max_context else None,
                      dtype if dtype in DTYPE_BYTES else "float16", experts, inter,
                      routed if experts > 1 else 1, int(parameters - idle_experts), quantization_of(config),
                      kv_latent)


def quantization_of(config: dict[str, Any]) -> str | None:
    """The weight format a quantized checkpoint's config declares: fp8, int8 or int4 (any 4-bit weights: integer,
    NVFP4 or MXFP4, which are sized alike); None when unquantized or unknown."""
    text = config.get("text_config") or {}
    q = config.get("quantization_config") or text.get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8"):
        return "fp8"
    if method == "modelopt":   # quant_algo FP8, FP8_PB_WO, MXFP8, ...; NVFP4: 4-bit floats
        algo = str(q.get("quant_algo") or (q.get("quantization") or {}).get("quant_algo") or "").upper()
        return "fp8" if "FP8" in algo else "int4" if "FP4" in algo or "W4" in algo else None
    if method == "mxfp4":      # 4-bit floats with a shared scale per block of 32 (gpt-oss)
        return "int4"
    if method == "bitsandbytes":
        return "int4" if q.get("load_in_4bit") else "int8"
    bits, kind = q.get("bits") or q.get("w_bit"), "int"
    for group in (q.get("config_groups") or {}).values():  # compressed-tensors
        weights = group.get("weights") or {} if isinstance(group, dict) else {}
        bits, kind = weights.get("num_bits", bits), weights.get("type", kind)
    if bits == 8:
        return "fp8" if kind == "float" else "int8"
    return "int4" if bits == 4 else None


def facts_from_size(size: Any, dtype: str = "bfloat16") -> ModelFacts:
    """Facts for a known size of a family (cluster/families.yaml `sizes`): its parameters, layers, KV heads,
    head dim and context. The hidden size is not listed: it is estimated from parameters ~ 12 x layers x
    hidden^2, with the query heads a multiple of the KV heads. A mixture of experts is taken as dense (the
    sizes do not list experts): right for memory, its decode cost at small batches over-estimated."""
    estimate = math.sqrt(size.params / (12 * size.layers)) / size.head_dim
    heads = max(size.kv_heads, size.kv_heads * round(estimate / size.kv_heads))
    hidden = heads * size.head_dim
    return ModelFacts(size.name, int(size.params), size.layers, hidden, heads, size.kv_heads, size.head_dim,
                      vocab_size=32000, max_context=size.context, dtype=dtype)


def facts_for_checkpoint(path: Path) -> ModelFacts:
    return facts_from_config(json.loads((path / "config.json").read_text()))


def config_for_size(size: Any, dtype: str = "bfloat16") -> dict[str, Any]:
    """A Llama-shaped config.json with a known size's figures (cluster/families.yaml `sizes`): its layers, KV heads,
    head dim and context as listed, the hidden size estimated as in `facts_from_size`, and the MLP's width chosen
    so that `facts_from_config` counts the listed parameters. Enough to plan the size; it is no checkpoint."""
    facts = facts_from_size(size, dtype)
    hidden, heads, kv_heads, head_dim = facts.hidden_size, facts.attention_heads, facts.kv_heads, facts.head_dim
    vocab = facts.vocab_size
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = (size.params - 2 * vocab * hidden - hidden) / size.layers
    inter = max(hidden, round((per_layer - attention - 4 * hidden) / (3 * hidden)))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": size.layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": False,
            "max_position_embeddings": size.context or 131072, "torch_dtype": dtype, "hidden_act": "silu"}
