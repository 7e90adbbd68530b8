"""Every open model family runs through `llmbatch submit`: a tiny random-weight checkpoint of each, built
from a transformers config, generates the same greedy text in the real pipeline (vLLM on CPU, or the
seq2seq engine for T5/mT5) as Hugging Face's own `generate` on the same tokens."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmbatch.cluster.model_inspect import inspect_source
from support import read_output, run_cli, write_job
from tiny_families import BUILDERS, build_tiny

pytestmark = pytest.mark.families

PROMPTS = [
    "Paris is the capital of France and the largest city in the country, and its river is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
MAX_TOKENS = 6
JOBS_AT_ONCE = 2  # on 2 cores, two jobs at a time finish the set about 10% sooner than one after another
RUNS_AS = {"llama": "vllm", "mistral": "vllm", "mixtral": "vllm", "qwen2": "vllm", "qwen3": "vllm", "qwen-moe": "vllm",
           "phi3": "vllm", "opt": "vllm", "bloom": "vllm",
           "gpt-neox": "vllm-transformers", "gpt2": "vllm", "glm4": "vllm", "gpt-bigcode": "vllm-transformers",
           "codegen": "converted", "t5": "seq2seq", "mt5": "seq2seq"}
CATALOG_FAMILY = {"mt5": "t5"}


def _hf_greedy(checkpoint: Path) -> list[str]:
    """What transformers itself generates greedily from the tokens llmbatch renders (plain text prompts)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    seq2seq = AutoConfig.from_pretrained(checkpoint).is_encoder_decoder
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(
        checkpoint, dtype=torch.float32).eval()
    texts = []
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
        new = out[0][1:] if seq2seq else out[0][ids.shape[1]:]  # a decoder starts from its start token
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, demo_model: str) -> dict:
    """Build every tiny checkpoint, convert CodeGen to GPT-J, and run one job per family, two at a time."""
    from llmbatch.cluster.model_store import resolve_local

    root = tmp_path_factory.mktemp("families")
    tokenizer_from = resolve_local(demo_model)
    checkpoints = {family: build_tiny(family, root / "models" / family, tokenizer_from) for family in BUILDERS}
    converted = root / "models" / "codegen-gptj"
    conversion = run_cli("models", "convert", str(checkpoints["codegen"]), "--to", "gptj", "--out", str(converted),
                         check=True)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")

    def submit(family: str):
        source = converted if family == "codegen" else checkpoints[family]
        job = write_job(root / f"{family}.yaml", name=f"family-{family}", model={
                            "source": str(source),
                            "engine": {"max_model_len": 256}},
                        input={"path": str(data)}, sampling={"max_tokens": MAX_TOKENS},
                        output={"path": str(root / "out")})
        return family, run_cli("submit", str(job), "--run-id", family)

    with ThreadPoolExecutor(JOBS_AT_ONCE) as pool:
        procs = dict(pool.map(submit, BUILDERS))
    return {"root": root, "checkpoints": checkpoints, "converted": converted, "procs": procs,
            "conversion": conversion}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_family_generates_what_transformers_generates(family: str, family_runs: dict):
    """One job per family on three prompts: one row each, no errors, greedy text equal to HF generate's
    (for CodeGen: the converted GPT-J checkpoint in vLLM against HF CodeGen itself)."""
    proc = family_runs["procs"][family]
    assert proc.returncode == 0, f"{family}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    rows, manifest = read_output(str(family_runs["root"] / "out" / family))
    assert manifest["status"] == "succeeded"
    assert manifest["rows"] == {"in": 3, "out": 3, "ok": 3, "error": 0, "duplicate_ids": 0}
    expected = _hf_greedy(family_runs["checkpoints"][family])
    by_prompt = {r.prompt: r for r in rows}
    for prompt, text in zip(PROMPTS, expected):
        row = by_prompt[prompt]
        assert row.num_generated_tokens and row.num_generated_tokens <= MAX_TOKENS
        assert row.cumulative_logprob is not None and row.cumulative_logprob <= 0
        assert row.generated_text == text, f"{family}: {row.generated_text!r} != HF {text!r}"


@pytest.mark.parametrize("family", list(BUILDERS))
def test_inspect_names_each_tiny_checkpoint_family_and_engine(family: str, family_runs: dict):
    found = inspect_source(str(family_runs["checkpoints"][family]))
    assert found.family is not None and found.family.name == CATALOG_FAMILY.get(family, family)
    assert found.family.runs_as == RUNS_AS[family]
    if family == "codegen":
        assert len(found.problems) == 1 and "llmbatch models convert" in found.problems[0]
        assert inspect_source(str(family_runs["converted"])).family.name == "gptj"
    else:
        assert found.problems == []


def test_an_unconverted_codegen_checkpoint_is_refused_with_the_convert_command(family_runs: dict, tmp_path: Path):
    """Submitting CodeGen as it is stops before Ray starts, naming the command that converts it."""
    codegen = family_runs["checkpoints"]["codegen"]
    job = write_job(tmp_path / "job.yaml", name="codegen-raw", model={"source": str(codegen)},
                    input={"path": str(family_runs["root"] / "prompts.jsonl")}, output={"path": str(tmp_path / "out")})
    for command in ("validate", "submit"):
        proc = run_cli(command, str(job))
        assert proc.returncode == 2, proc.stderr
        assert "which vLLM does not run" in proc.stderr and "llmbatch models convert" in proc.stderr
    assert not (tmp_path / "out").exists()
