"""`llmbatch models convert --to gptj`: a CodeGen checkpoint becomes a GPT-J one with the same logits."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import CodeGenConfig, CodeGenForCausalLM, GPTJForCausalLM

from llmbatch.cluster.convert_codegen import convert_codegen, gptj_config, split_qkv
from llmbatch.jobs.cli import main
from llmbatch.errors import UserError

SEQUENCES = [[1, 2, 3, 4, 5, 6, 7, 8], [500, 17, 17, 256, 3, 99, 410, 0, 12, 44, 301, 7], [42]]


def tiny_codegen(seed: int = 0) -> CodeGenForCausalLM:
    torch.manual_seed(seed)
    config = CodeGenConfig(n_layer=2, n_embd=128, n_head=4, rotary_dim=16, n_positions=128, vocab_size=512,
                           initializer_range=0.2, bos_token_id=0, eos_token_id=1)
    return CodeGenForCausalLM(config).eval()


@pytest.fixture(scope="module")
def codegen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("codegen") / "tiny-codegen"
    model = tiny_codegen()
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    (path / "vocab.json").write_text("{}")
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy(model, ids, n=8):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def load_gptj(path):
    model, info = GPTJForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == [] or set(info["missing_keys"]) == set(), info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_converted_gptj_has_codegens_logits_and_greedy_output(codegen_dir, tmp_path):
    out = convert_codegen(codegen_dir, tmp_path / "gptj")
    codegen = CodeGenForCausalLM.from_pretrained(codegen_dir, dtype=torch.float32).eval()
    gptj = load_gptj(out)
    for ids in SEQUENCES:
        expected, got = logits(codegen, ids), logits(gptj, ids)
        assert torch.allclose(expected, got, atol=1e-4, rtol=0), (expected - got).abs().max()
        assert greedy(gptj, ids) == greedy(codegen, ids)
    assert len(set(greedy(codegen, SEQUENCES[1]))) > 1  # random weights large enough not to repeat one token


def test_converted_checkpoint_has_gptj_config_and_the_tokenizer_files(codegen_dir, tmp_path):
    out = convert_codegen(codegen_dir, tmp_path / "gptj")
    config = json.loads((out / "config.json").read_text())
    source = json.loads((codegen_dir / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["tie_word_embeddings"]) == \
        (["GPTJForCausalLM"], "gptj", False)
    for key in ("n_embd", "n_layer", "n_head", "rotary_dim", "n_positions", "vocab_size", "activation_function",
                "layer_norm_epsilon", "bos_token_id", "eos_token_id"):
        assert config[key] == source[key], key
    assert {"tokenizer_config.json", "vocab.json", "merges.txt", "model.safetensors"} <= {p.name for p in out.iterdir()}


def test_a_pytorch_bin_checkpoint_converts_too(codegen_dir, tmp_path):
    source = tmp_path / "bin-codegen"
    source.mkdir()
    model = CodeGenForCausalLM.from_pretrained(codegen_dir, dtype=torch.float32)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    (source / "config.json").write_text((codegen_dir / "config.json").read_text())
    out = convert_codegen(source, tmp_path / "gptj")
    assert torch.allclose(logits(model.eval(), SEQUENCES[0]), logits(load_gptj(out), SEQUENCES[0]), atol=1e-4, rtol=0)


def test_qkv_split_follows_codegens_q_v_k_order_per_slice():
    h = 8
    fused = torch.arange(3 * h, dtype=torch.float32).repeat_interleave(h).reshape(3 * h, h)  # row i is all i
    q, k, v = split_qkv(fused, h)
    # 4 slices of 6 rows: slice m holds q in rows 6m..6m+1, v in 6m+2..6m+3, k in 6m+4..6m+5
    assert q[:, 0].tolist() == [0, 1, 6, 7, 12, 13, 18, 19]
    assert v[:, 0].tolist() == [2, 3, 8, 9, 14, 15, 20, 21]
    assert k[:, 0].tolist() == [4, 5, 10, 11, 16, 17, 22, 23]


def test_gptj_config_unties_the_head():
    assert gptj_config({"n_embd": 8, "tie_word_embeddings": True})["tie_word_embeddings"] is False


def test_a_checkpoint_that_is_not_codegen_is_refused(tmp_path):
    path = tmp_path / "opt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["OPTForCausalLM"], "model_type": "opt"}))
    with pytest.raises(UserError, match=r"is OPTForCausalLM \(model_type opt\), not a CodeGen checkpoint"):
        convert_codegen(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_directory_is_refused(codegen_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        convert_codegen(codegen_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_cli_convert_writes_the_checkpoint_and_inspect_then_sees_gptj(codegen_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    out = tmp_path / "gptj"
    result = CliRunner().invoke(main, ["models", "convert", str(codegen_dir), "--to", "gptj", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    inspected = CliRunner().invoke(main, ["models", "inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.output[inspected.output.index("{"):])
    assert (report["architecture"], report["problems"]) == ("GPTJForCausalLM", [])


def test_cli_convert_of_a_non_codegen_checkpoint_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    path = tmp_path / "llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    result = CliRunner().invoke(main, ["models", "convert", str(path), "--to", "gptj", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "not a CodeGen checkpoint" in result.output
