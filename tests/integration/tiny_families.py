"""Tiny random-weight checkpoints of each open model family, built with transformers from a config.

Each has 2 layers, hidden size 128 and 4 heads (head_dim 32, which vLLM's CPU attention supports), the
SmolLM2 tokenizer copied in (vocabulary 49152) and no chat template; `initializer_range=0.2` keeps greedy
output from collapsing into one repeated token. DeepSeek's multi-head latent attention is the exception: its
latent keeps the released width (kv_lora_rank 512 + qk_rope_head_dim 64 = 576), the only one vLLM's CPU MLA
kernel takes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

VOCAB = 49152
BOS, EOS, PAD = 1, 2, 2
COMMON = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama 3.1-style RoPE: rope_type llama3 stretches the low frequencies by 8 over an original 64 positions
    # (3.1: 8192), leaving the high ones and blending between; with head_dim 32 all three bands occur
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        rope_parameters=rope, tie_word_embeddings=False, **COMMON))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    # a window shorter than the test prompts, so sliding-window attention is exercised
    return MistralForCausalLM(MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                            max_position_embeddings=512, sliding_window=8, **COMMON))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                            num_local_experts=4, num_experts_per_tok=2,
                                            max_position_embeddings=512, sliding_window=None, **COMMON))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # qkv projections with bias; tied embeddings as the small Qwen2.5 models
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        tie_word_embeddings=True, **COMMON))


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # RMSNorm on queries and keys (qk-norm)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        max_position_embeddings=512, tie_word_embeddings=False, **COMMON))


def _qwen_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # 8 experts, 2 per token (with 4 experts of 64, one greedy step of seed 0 sat 0.002 from a tie)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=32, num_experts=8, num_experts_per_tok=2,
                                              norm_topk_prob=True, max_position_embeddings=512, **COMMON))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    # fused qkv and gate/up projections; Phi-4-mini's partial rotary factor and tied embeddings
    return Phi3ForCausalLM(Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.75,
                                      max_position_embeddings=512, original_max_position_embeddings=512,
                                      tie_word_embeddings=True, **COMMON))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=512, word_embed_proj_dim=128, **COMMON))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(hidden_size=128, n_layer=2, n_head=4, **COMMON))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=512, **COMMON))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=512, **COMMON))


def _glm4():
    from transformers import Glm4Config, Glm4ForCausalLM

    return Glm4ForCausalLM(Glm4Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=512, **COMMON))


def _gpt_bigcode():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(n_embd=128, n_layer=2, n_head=4, n_positions=512,
                                                  multi_query=True, **COMMON))


def _codegen():
    from transformers import CodeGenConfig, CodeGenForCausalLM

    return CodeGenForCausalLM(CodeGenConfig(n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=512,
                                            **COMMON))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                                               decoder_start_token_id=PAD, vocab_size=VOCAB, eos_token_id=EOS,
                                               pad_token_id=PAD, n_positions=512, initializer_factor=1.0))


def _mt5():
    from transformers import MT5Config, MT5ForConditionalGeneration

    return MT5ForConditionalGeneration(MT5Config(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                                                 decoder_start_token_id=PAD, vocab_size=VOCAB, eos_token_id=EOS,
                                                 pad_token_id=PAD, n_positions=512, initializer_factor=1.0))


BUILDERS: dict[str, Callable] = {
    "llama": _llama, "mistral": _mistral, "mixtral": _mixtral, "qwen2": _qwen2, "qwen3": _qwen3,
    "qwen-moe": _qwen_moe, "phi3": _phi3, "opt": _opt, "bloom": _bloom,
    "gpt-neox": _gpt_neox, "gpt2": _gpt2, "glm4": _glm4, "gpt-bigcode": _gpt_bigcode, "codegen": _codegen,
    "t5": _t5, "mt5": _mt5,
}


# Tiny checkpoints vLLM 0.32 does not load, checked by `models inspect` only: vLLM's Gemma 2 always ties the
# output layer to the embeddings (an untied tiny checkpoint has an lm_head it refuses; a tied one repeats one
# token), and its DeepSeek-V3 expects the router's e_score_correction_bias that HF's model saves only when
# topk_method is noaux_tc.
def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          query_pre_attn_scalar=32, sliding_window=8, max_position_embeddings=512,
                                          tie_word_embeddings=False, **COMMON))


def _deepseek():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32,
        v_head_dim=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=512, **COMMON))


INSPECT_ONLY: dict[str, Callable] = {"gemma2": _gemma2, "deepseek": _deepseek}


def build_tiny(family: str, target: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of `family` to `target` (once: an existing one is kept)."""
    import torch

    if (target / "config.json").is_file():
        return target
    torch.manual_seed(seed)
    model = BUILDERS[family]().eval()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, staging / name)
    staging.rename(target)
    return target
