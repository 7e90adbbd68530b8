"""The family catalog (cluster/families.yaml): it loads, every entry is complete, configs find their family."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmbatch.cluster.families import (
    FamilyCatalog, cpu_supports_head_dim, family_for_config, format_params, load_catalog, load_families,
    parse_params,
)
from llmbatch.cluster.model_facts import facts_from_config

ISSUE_FAMILIES = ["llama", "mistral", "mixtral", "opt", "bloom", "gpt-neox", "gpt2", "glm4", "glm", "chatglm",
                  "gpt-bigcode", "codegen", "t5", "minigpt-4"]
ISSUE_SEED_MODELS = ["Llama 2", "Alpaca", "Vicuna", "Koala", "Code Llama", "SOLAR", "Zephyr", "Mixtral 8x7B", "OPT",
                     "BLOOM", "Dolly 2.0", "CPM", "CodeGen", "ChatGLM", "CodeGeeX", "mT5", "CPM-2", "MiniGPT-4"]


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
])
def test_known_sizes_agree_with_what_sizing_reads_from_the_config(size, config):
    known, facts = _size(size), facts_from_config(config)
    assert (known.layers, known.kv_heads, known.head_dim, known.context) == \
        (facts.layers, facts.kv_heads, facts.head_dim, facts.max_context)
    assert facts.parameters == pytest.approx(known.params, rel=0.02)


def test_cpu_attention_head_dims():
    assert load_catalog().cpu_attention_head_dims == [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]
    assert cpu_supports_head_dim(128) and not cpu_supports_head_dim(16)
