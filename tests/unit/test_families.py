"""The family catalog (cluster/families.yaml): it loads, every entry is complete, configs find their family."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmbatch.cluster.families import (
    FamilyCatalog, cpu_supports_head_dim, family_for_config, format_params, load_catalog, load_families,
    parse_params,
)
from llmbatch.cluster.model_facts import facts_from_config
from llmbatch.cluster.model_inspect import inspect_config

ISSUE_FAMILIES = ["llama", "mistral", "mixtral", "opt", "bloom", "gpt-neox", "gpt2", "glm4", "glm", "chatglm",
                  "gpt-bigcode", "codegen", "t5", "minigpt-4"]
ISSUE_SEED_MODELS = ["Llama 2", "Alpaca", "Vicuna", "Koala", "Code Llama", "SOLAR", "Zephyr", "Mixtral 8x7B", "OPT",
                     "BLOOM", "Dolly 2.0", "CPM", "CodeGen", "ChatGLM", "CodeGeeX", "mT5", "CPM-2", "MiniGPT-4"]
# issue 21 item 4: the current open families (Llama 3.x joins the llama family, which has its architecture)
CURRENT_FAMILIES = {"qwen2": ["Qwen2ForCausalLM"], "qwen3": ["Qwen3ForCausalLM"],
                    "qwen-moe": ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"], "gemma2": ["Gemma2ForCausalLM"],
                    "gemma3": ["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"], "phi3": ["Phi3ForCausalLM"],
                    "deepseek": ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"]}


def test_catalog_holds_every_family_and_seed_model_of_the_issue():
    families = {f.name: f for f in load_families()}
    assert set(ISSUE_FAMILIES) <= set(families)
    seeds = {seed for f in families.values() for seed in f.seed_models}
    assert set(ISSUE_SEED_MODELS) <= seeds


def test_every_family_has_its_required_fields():
    for family in load_families():
        assert family.description and family.seed_models and family.chat_template, family.name
        assert family.runs_as in ("vllm", "vllm-transformers", "converted", "seq2seq", "unsupported")
        if family.runs_as != "unsupported":
            assert family.architectures and family.model_types, family.name
        for size in family.sizes:
            assert size.params > 0 and size.layers > 0 and size.kv_heads > 0 and size.head_dim > 0


def test_how_the_issue_families_run():
    families = {f.name: f for f in load_families()}
    assert families["codegen"].runs_as == "converted" and families["codegen"].convert_to == "gptj"
    assert families["t5"].runs_as == "seq2seq"
    assert families["minigpt-4"].runs_as == "unsupported"
    assert {families[n].runs_as for n in ("gpt-neox", "glm", "gpt-bigcode")} == {"vllm-transformers"}
    assert {families[n].runs_as for n in ("llama", "mistral", "mixtral", "opt", "bloom", "gpt2", "glm4", "chatglm")} \
        == {"vllm"}


@pytest.mark.parametrize("name", list(CURRENT_FAMILIES))
def test_each_current_family_runs_on_vllm_with_sizes_caveats_and_a_chat_template_note(name):
    family = load_catalog().family(name)
    assert family is not None and family.runs_as == "vllm" and family.architectures == CURRENT_FAMILIES[name]
    assert family.chat_template.startswith("checkpoint (") and len(family.chat_template) > len("checkpoint ()")
    assert len(family.sizes) >= 3 and family.caveats
    for size in family.sizes:
        assert size.context and size.context >= 4096 and size.params > 0
        assert (size.kv_latent is not None) == (name == "deepseek")
    assert any("tensor_parallel_size" in caveat for caveat in family.caveats), "which sizes need TP>1 on which GPUs"


def test_llama_3_joins_the_llama_family_with_its_rope_scaling():
    llama = load_catalog().family("llama")
    assert {"Llama 3", "Llama 3.1", "Llama 3.2", "Llama 3.3"} <= set(llama.seed_models)
    assert {"Llama-3.1-8B", "Llama-3.1-405B", "Llama-3.2-1B", "Llama-3.3-70B"} <= {s.name for s in llama.sizes}
    assert any("rope_type llama3" in caveat for caveat in llama.caveats)
    assert llama.sizes[0].name == "Llama-2-7B"  # `models families --json` users read the first size


def test_licence_gates_and_remote_code_are_in_the_caveats():
    families = {f.name: " ".join(f.caveats) for f in load_families()}
    for name in ("llama", "gemma2", "gemma3"):
        assert "gated" in families[name]
    for name in ("phi3", "deepseek"):
        assert "auto_map" in families[name] and "trust_remote_code" in families[name]
    assert "soft-cap" in families["gemma2"] and "sliding-window" in families["gemma2"]
    assert "576" in families["deepseek"] and "CPU" in families["deepseek"]


@pytest.mark.parametrize("family, arch", [(f.name, a) for f in load_families() for a in f.architectures])
def test_family_for_config_finds_each_listed_architecture(family, arch):
    assert family_for_config({"architectures": [arch], "model_type": "something-else"}).name == family


@pytest.mark.parametrize("model_type, family", [("mt5", "t5"), ("gpt_neox", "gpt-neox"), ("chatglm", "chatglm"),
                                                ("codegen", "codegen"), ("llama", "llama")])
def test_family_for_config_falls_back_to_model_type(model_type, family):
    assert family_for_config({"model_type": model_type}).name == family
    assert family_for_config({"architectures": ["SomethingNew"], "model_type": model_type}).name == family


def test_an_unknown_architecture_has_no_family():
    assert family_for_config({"architectures": ["QwenNextForCausalLM"], "model_type": "qwen_next"}) is None
    assert family_for_config({}) is None


def _catalog_dict(**family_overrides):
    family = {"name": "x", "description": "d", "seed_models": ["X"], "architectures": ["XForCausalLM"],
              "model_types": ["x"], "runs_as": "vllm", "chat_template": "checkpoint"}
    return {"cpu_attention_head_dims": [64], "families": [{**family, **family_overrides}]}


def test_unknown_keys_and_bad_values_are_refused():
    FamilyCatalog.model_validate(_catalog_dict())
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        FamilyCatalog.model_validate(_catalog_dict(aliases=["y"]))
    with pytest.raises(ValidationError, match="runs_as"):
        FamilyCatalog.model_validate(_catalog_dict(runs_as="llama.cpp"))
    with pytest.raises(ValidationError, match="convert_to is required"):
        FamilyCatalog.model_validate(_catalog_dict(runs_as="converted"))
    with pytest.raises(ValidationError, match="needs its architectures"):
        FamilyCatalog.model_validate(_catalog_dict(architectures=[]))


def test_an_architecture_claimed_by_two_families_is_refused():
    data = _catalog_dict()
    data["families"].append({**data["families"][0], "name": "y", "model_types": ["y"]})
    with pytest.raises(ValidationError, match="architecture XForCausalLM is listed by both x and y"):
        FamilyCatalog.model_validate(data)


@pytest.mark.parametrize("text, count", [("125M", 125_000_000), ("6.74B", 6_740_000_000), ("46.7b", 46_700_000_000),
                                         (350, 350)])
def test_parameter_counts_take_a_unit(text, count):
    assert parse_params(text) == count


def test_parameter_counts_without_a_unit_are_refused():
    with pytest.raises(ValueError, match="not a parameter count"):
        parse_params("lots")
    assert format_params(6_740_000_000) == "6.74B" and format_params(125_000_000) == "125M"


def _size(name):
    return next(s for f in load_families() for s in f.sizes if s.name == name)


@pytest.mark.parametrize("size, config", [
    ("Llama-2-7B", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
                    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                    "hidden_act": "silu", "tie_word_embeddings": False}),
    ("Mixtral-8x7B", {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                      "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                      "num_key_value_heads": 8, "num_local_experts": 8, "vocab_size": 32000,
                      "max_position_embeddings": 32768, "hidden_act": "silu"}),
    ("OPT-125m", {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 768, "ffn_dim": 3072,
                  "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 50272,
                  "max_position_embeddings": 2048}),
    ("Llama-3.1-8B", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                      "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                      "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                      "hidden_act": "silu", "tie_word_embeddings": False,
                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    ("Llama-3.2-1B", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                      "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
                      "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                      "max_position_embeddings": 131072, "hidden_act": "silu", "tie_word_embeddings": True}),
    ("Qwen2.5-7B-Instruct", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                             "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
                             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                             "hidden_act": "silu", "tie_word_embeddings": False}),
    ("Qwen3-8B", {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
                  "intermediate_size": 12288, "num_attention_heads": 32, "num_hidden_layers": 36,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                  "hidden_act": "silu", "tie_word_embeddings": False}),
    ("Phi-4", {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 5120,
               "intermediate_size": 17920, "num_attention_heads": 40, "num_hidden_layers": 40,
               "num_key_value_heads": 10, "vocab_size": 100352, "max_position_embeddings": 16384,
               "hidden_act": "silu", "tie_word_embeddings": False}),
])
def test_known_sizes_agree_with_what_sizing_reads_from_the_config(size, config):
    known, facts = _size(size), facts_from_config(config)
    assert (known.layers, known.kv_heads, known.head_dim, known.context) == \
        (facts.layers, facts.kv_heads, facts.head_dim, facts.max_context)
    assert facts.parameters == pytest.approx(known.params, rel=0.02)


def test_cpu_attention_head_dims():
    assert load_catalog().cpu_attention_head_dims == [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]
    assert cpu_supports_head_dim(128) and not cpu_supports_head_dim(16)


# ---- the tiny checkpoints of the current families (tests/integration/tiny_families.py) -------------------

def _tiny_config(family: str) -> dict:
    """The config.json a tiny checkpoint of `family` gets, built on the meta device (no weights)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from tiny_families import BUILDERS, INSPECT_ONLY

    with torch.device("meta"):
        model = {**BUILDERS, **INSPECT_ONLY}[family]()
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen-moe", "gemma2", "phi3", "deepseek"])
def test_inspect_names_the_family_of_each_current_tiny_checkpoint(family, tmp_path):
    found = inspect_config(_tiny_config(family), source=family, kind="local", path=tmp_path)
    assert found.family is not None and found.family.name == family and found.family.runs_as == "vllm"
    assert found.problems == [] and found.facts.layers == 2
    assert found.kv_latent == (576 if family == "deepseek" else None)


@pytest.mark.parametrize("model_type, architecture, family", [
    ("gemma3_text", "Gemma3ForCausalLM", "gemma3"), ("qwen2_moe", "Qwen2MoeForCausalLM", "qwen-moe"),
    ("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek"),
])
def test_inspect_names_the_current_families_without_a_tiny_checkpoint(model_type, architecture, family, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512)
    found = inspect_config({**config.to_dict(), "architectures": [architecture]}, source=family, kind="local",
                           path=tmp_path)
    assert found.family.name == family and found.problems == []


def test_mla_is_checked_against_the_cpu_mla_kernel_not_the_head_dim(tmp_path):
    """DeepSeek-V3's config has no head_dim (7168 / 128 heads would be 56, which CPU attention lacks): MLA runs on
    vLLM's MLA kernels, whose CPU decode takes a latent of 576 (kv_lora_rank 512 + qk_rope_head_dim 64) only."""
    v3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
          "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
          "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 61, "vocab_size": 129280,
          "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
          "v_head_dim": 128, "max_position_embeddings": 163840}
    found = inspect_config(v3, source="v3", kind="local", path=tmp_path)
    assert found.family.name == "deepseek" and found.kv_latent == 576 and found.problems == []
    assert found.to_dict()["facts"]["kv_latent"] == 576
    found = inspect_config({**v3, "kv_lora_rank": 256}, source="v3", kind="local", path=tmp_path)
    assert found.problems == ["MLA latent 320 (kv_lora_rank + qk_rope_head_dim) is not supported by vLLM's CPU MLA "
                              "kernel (576): this model cannot run on CPU, only on GPU"]
    assert load_catalog().cpu_mla_latent_dims == [576]
