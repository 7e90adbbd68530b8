"""Parameters, active parameters and KV-cache bytes that cluster/model_facts.py counts from the published config.json
of the newer families: Gemma 2's gated MLP, Qwen2/Qwen3 MoE experts of moe_intermediate_size (and Qwen2-MoE's
shared expert), DeepSeek-V2/V3's multi-head latent attention (MLA) with shared experts and dense first layers."""
from __future__ import annotations

import pytest

from llmbatch.cluster import throughput_model as tm
from llmbatch.cluster.accelerators import ACCELERATORS
from llmbatch.cluster.families import load_catalog
from llmbatch.cluster.model_facts import DTYPE_BYTES, facts_from_config
from llmbatch.cluster.sizing import choose_tensor_parallel

# The published config.json of each checkpoint (the keys the count reads, and a few it must ignore).
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "vocab_size": 128256, "max_position_embeddings": 131072, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
GEMMA2_9B = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
             "intermediate_size": 14336, "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8,
             "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "hidden_act": "gelu_pytorch_tanh",
             "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "torch_dtype": "float32"}
GEMMA2_2B = {**GEMMA2_9B, "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
             "num_hidden_layers": 26, "num_key_value_heads": 4}
QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
             "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
             "vocab_size": 152064, "max_position_embeddings": 131072, "hidden_act": "silu",
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                 "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                 "num_attention_heads": 32, "num_hidden_layers": 48, "num_key_value_heads": 4, "head_dim": 128,
                 "vocab_size": 151936, "max_position_embeddings": 40960, "hidden_act": "silu",
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN2_57B_A14B = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 3584,
                  "intermediate_size": 18944, "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480,
                  "num_experts": 64, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "norm_topk_prob": False,
                  "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 151936,
                  "max_position_embeddings": 131072, "hidden_act": "silu", "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16"}
PHI3_MINI_4K = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
                "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 32,
                "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "hidden_act": "silu",
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
                    "intermediate_size": 10944, "moe_intermediate_size": 1408, "n_routed_experts": 64,
                    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 27,
                    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840, "hidden_act": "silu",
                    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                    "head_dim": 64}   # what transformers writes back (the rope width): not the heads' width
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
               "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
               "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "num_attention_heads": 128,
               "num_key_value_heads": 128, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
               "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840, "hidden_act": "silu",
               "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [128, 128]}}


def _input_embedding(config: dict) -> int:
    return config["vocab_size"] * config["hidden_size"]


@pytest.mark.parametrize("config, published", [
    (LLAMA31_8B, 8.03e9), (GEMMA2_9B, 9.24e9), (GEMMA2_2B, 2.61e9), (QWEN25_7B, 7.62e9), (QWEN3_8B, 8.19e9),
    (PHI3_MINI_4K, 3.82e9), (QWEN3_30B_A3B, 30.5e9), (QWEN2_57B_A14B, 57.4e9), (DEEPSEEK_V2_LITE, 15.7e9),
    # DeepSeek-V3's published 671B leaves out its 14B multi-token-prediction module (the hub's 685B has it); vLLM
    # loads that module only for speculative decoding, so it is not counted
    (DEEPSEEK_V3, 671e9),
], ids=["Llama-3.1-8B", "Gemma-2-9B", "Gemma-2-2B", "Qwen2.5-7B", "Qwen3-8B", "Phi-3-mini", "Qwen3-30B-A3B",
        "Qwen2-57B-A14B", "DeepSeek-V2-Lite", "DeepSeek-V3"])
def test_parameters_are_within_3_percent_of_the_published_count(config, published):
    facts = facts_from_config(config)
    assert facts.parameters == pytest.approx(published, rel=0.03)
    assert facts.weight_bytes() == facts.parameters * DTYPE_BYTES[config["torch_dtype"]]


@pytest.mark.parametrize("config", [LLAMA31_8B, GEMMA2_9B, GEMMA2_2B, QWEN25_7B, QWEN3_8B, PHI3_MINI_4K])
def test_a_dense_model_runs_every_parameter_and_caches_keys_and_values_per_kv_head(config):
    facts = facts_from_config(config)
    assert facts.experts == facts.experts_per_token == 1 and facts.kv_latent == 0
    assert facts.parameters_per_token == facts.parameters
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    assert facts.kv_bytes_per_token("bfloat16") == 2 * config["num_hidden_layers"] * config["num_key_value_heads"] \
        * head_dim * 2


def test_gemma2_mlp_is_gated_and_its_embeddings_tied():
    """Gemma's GeGLU (gelu_pytorch_tanh) has gate, up and down projections; its config.json does not say
    tie_word_embeddings, and Gemma ties them."""
    facts = facts_from_config(GEMMA2_9B)
    ungated = facts_from_config({**GEMMA2_9B, "model_type": "gpt_bigcode"})  # same shapes, two-matrix MLP
    assert facts.parameters - ungated.parameters == 42 * 3584 * 14336
    untied = facts_from_config({**GEMMA2_9B, "tie_word_embeddings": False})
    assert untied.parameters - facts.parameters == 256000 * 3584


@pytest.mark.parametrize("config, experts, routed, published_active, rel", [
    (QWEN3_30B_A3B, 128, 8, 3.3e9, 0.10),
    (QWEN2_57B_A14B, 64, 8, 14e9, 0.10),      # "A14B": 14B activated
])
def test_qwen_moe_counts_experts_at_moe_intermediate_size(config, experts, routed, published_active, rel):
    """Qwen counts the embeddings (input and output) in the activated parameters, as the facts do."""
    facts = facts_from_config(config)
    assert (facts.experts, facts.experts_per_token) == (experts, routed)
    assert facts.active_parameters == pytest.approx(published_active, rel=rel)
    assert facts.intermediate_size == config["intermediate_size"]
    assert facts.kv_latent == 0 and facts.kv_bytes_per_token() == 2 * config["num_hidden_layers"] \
        * config["num_key_value_heads"] * 128 * 2


def test_qwen2_moe_shared_expert_runs_for_every_token():
    facts = facts_from_config(QWEN2_57B_A14B)
    without = facts_from_config({**QWEN2_57B_A14B, "shared_expert_intermediate_size": 0})
    shared = 28 * (3 * 3584 * 20480 + 3584)          # the shared expert and its gate, in all 28 layers
    assert facts.parameters - without.parameters == shared
    assert facts.active_parameters - without.active_parameters == shared


@pytest.mark.parametrize("config, published_total, published_active, layers", [
    (DEEPSEEK_V2_LITE, 15.7e9, 2.4e9, 27),
    (DEEPSEEK_V3, 671e9, 37e9, 61),
], ids=["DeepSeek-V2-Lite", "DeepSeek-V3"])
def test_deepseek_mla_and_moe(config, published_total, published_active, layers):
    """DeepSeek's activated count leaves out the input embedding (a lookup, no multiply); the facts' active
    parameters keep it, as for every other family (the throughput model takes the idle experts as
    parameters - active)."""
    facts = facts_from_config(config)
    assert facts.parameters == pytest.approx(published_total, rel=0.03)
    assert facts.active_parameters - _input_embedding(config) == pytest.approx(published_active, rel=0.10)
    assert facts.active_parameters == pytest.approx(published_active, rel=0.12)
    assert facts.experts == config["n_routed_experts"] and facts.experts_per_token == config["num_experts_per_tok"]
    # MLA: every head is 128 + 64 wide for queries and keys; a layer caches one latent of 512 + 64 per token
    assert (facts.layers, facts.attention_heads, facts.kv_heads, facts.head_dim) == \
        (layers, config["num_attention_heads"], config["num_attention_heads"], 192)
    assert facts.kv_latent == 512 + 64
    for dtype in ("bfloat16", "fp8", "float32"):
        assert facts.kv_bytes_per_token(dtype) == layers * (512 + 64) * DTYPE_BYTES[dtype]
    assert facts.kv_bytes_per_token() == layers * 576 * 2


def test_deepseek_v3_counts_its_dense_first_layers_and_shared_expert():
    facts = facts_from_config(DEEPSEEK_V3)
    expert = 3 * 7168 * 2048
    all_moe = facts_from_config({**DEEPSEEK_V3, "first_k_dense_replace": 0})
    # three layers of a 18432-wide MLP become three of 256 routed + 1 shared experts and a router
    assert all_moe.parameters - facts.parameters == 3 * (257 * expert + 7168 * 256 - 3 * 7168 * 18432)
    no_shared = facts_from_config({**DEEPSEEK_V3, "n_shared_experts": 0})
    assert facts.parameters - no_shared.parameters == 58 * expert
    assert facts.active_parameters - no_shared.active_parameters == 58 * expert
    assert facts.parameters - facts.active_parameters == 58 * (256 - 8) * expert   # idle routed experts only
    assert facts.quantization == "fp8" and facts.max_context == 163840
    # the MTP module is not counted
    assert facts_from_config({**DEEPSEEK_V3, "num_nextn_predict_layers": 0}).parameters == facts.parameters


def test_deepseek_v2_lite_has_a_full_rank_query():
    """q_lora_rank null: the query is one hidden x heads x 192 projection (DeepSeek-V2-Lite)."""
    facts = facts_from_config(DEEPSEEK_V2_LITE)
    low_rank = facts_from_config({**DEEPSEEK_V2_LITE, "q_lora_rank": 256})
    full, factored = 2048 * 16 * 192, 2048 * 256 + 256 + 256 * 16 * 192
    assert facts.parameters - low_rank.parameters == 27 * (full - factored)


def test_the_families_catalog_sizes_agree():
    sizes = {size.name: size for family in load_catalog().families for size in family.sizes}
    for name, config in [("gemma-2-9b", GEMMA2_9B), ("gemma-2-2b", GEMMA2_2B), ("Qwen3-30B-A3B", QWEN3_30B_A3B),
                         ("Qwen3-8B", QWEN3_8B), ("Phi-3-mini-4k", PHI3_MINI_4K),
                         ("DeepSeek-V2-Lite", DEEPSEEK_V2_LITE), ("DeepSeek-V3", DEEPSEEK_V3)]:
        known, facts = sizes[name], facts_from_config(config)
        assert facts.parameters == pytest.approx(known.params, rel=0.03), name
        assert (facts.layers, facts.kv_heads, facts.head_dim) == (known.layers, known.kv_heads, known.head_dim), name
        assert (facts.kv_latent or None) == known.kv_latent, name


@pytest.mark.parametrize("config", [QWEN3_30B_A3B, QWEN2_57B_A14B, DEEPSEEK_V2_LITE, DEEPSEEK_V3])
def test_the_throughput_model_reads_the_active_parameters_at_batch_1_and_all_at_large_batches(config):
    facts = facts_from_config(config)
    assert tm._weight_params_read(facts, 1) == pytest.approx(facts.active_parameters, rel=1e-9)
    assert tm._weight_params_read(facts, 100_000) == pytest.approx(facts.parameters, rel=1e-6)


def test_the_planner_sizes_the_moe_models_by_their_real_weights():
    h100, h200 = ACCELERATORS["H100-80GB"], ACCELERATORS["H200-141GB"]
    # Qwen3-30B-A3B: 61 GB of bf16 weights fit one 80 GB H100; counted at 233B they fit none
    assert choose_tensor_parallel(facts_from_config(QWEN3_30B_A3B), h100, 8192).tensor_parallel_size in (1, 2)
    # DeepSeek-V2-Lite: 31 GB, one H100 with a large (latent) KV cache
    lite = choose_tensor_parallel(facts_from_config(DEEPSEEK_V2_LITE), h100, 32768)
    assert lite.tensor_parallel_size == 1 and lite.kv_cache_tokens > 500_000
    # DeepSeek-V3 in its FP8 weights: 8 x H200, not 8 x H100
    v3 = facts_from_config(DEEPSEEK_V3)
    prec = tm.precision_for(v3, None)
    assert prec.weight_bytes == 1
    assert tm.smallest_fit(v3, h200, prec, 8192) == 8 and tm.smallest_fit(v3, h100, prec, 8192) is None


def test_counts_match_transformers_own_modules_on_the_meta_device():
    """The count against transformers' modules built without weights: each config cut to 4 layers (DeepSeek-V3
    keeps its 3 dense layers and one MoE layer), its vocabulary to 1024."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for config in (LLAMA31_8B, GEMMA2_2B, QWEN3_8B, QWEN3_30B_A3B, QWEN2_57B_A14B, PHI3_MINI_4K, DEEPSEEK_V2_LITE,
                   DEEPSEEK_V3):
        small = {key: value for key, value in config.items() if key != "quantization_config"}
        small.update(num_hidden_layers=4, vocab_size=1024)
        built = transformers.AutoConfig.for_model(
            small["model_type"], pad_token_id=None, bos_token_id=None, eos_token_id=None,
            **{k: v for k, v in small.items() if k not in ("model_type", "architectures")})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(built)
        real = sum(p.numel() for p in model.parameters())
        assert facts_from_config(small).parameters == pytest.approx(real, rel=1e-4), small["model_type"]


def test_an_mla_cache_is_whole_on_every_gpu_of_a_replica_and_a_kv_head_cache_is_split():
    """vLLM keeps DeepSeek's latent cache whole on each tensor-parallel GPU: more GPUs do not hold more of it."""
    mla, dense = facts_from_config(DEEPSEEK_V2_LITE), facts_from_config(LLAMA31_8B)
    assert (mla.kv_shards(4), dense.kv_shards(4)) == (1, 4)
    l4 = ACCELERATORS["L4"]
    fit = choose_tensor_parallel(mla, l4, 4096, "bfloat16")
    assert fit.tensor_parallel_size > 1
    per_gpu_left = l4.usable_bytes - fit.needed_bytes_per_device + 4 * 4096 * mla.kv_bytes_per_token("bfloat16")
    assert fit.kv_cache_tokens == int(per_gpu_left // mla.kv_bytes_per_token("bfloat16"))
