"""The seq2seq engine stage (T5 / mT5 through batched HF generate), called directly on tiny random models."""
from __future__ import annotations

import json
import math
import shutil
import sys
import types
from pathlib import Path

import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmbatch.pipelines.columns import HIT_COLUMN, HIT_MARKER, INFERENCE_ERROR, RENDERED_PROMPT  # noqa: E402
from llmbatch.pipelines.infer import sampling_params  # noqa: E402
from llmbatch.pipelines.output import to_output_row  # noqa: E402
from llmbatch.pipelines.schema import OutputRow, output_names_for_inputs  # noqa: E402
from llmbatch.pipelines.seq2seq import TOP_LOGPROBS_TYPE, Seq2SeqEngineStage  # noqa: E402

DEMO_MODEL = Path("~/.cache/llmbatch/models/smollm2-135m-instruct").expanduser()
VOCAB = 49152
PROMPTS = ["What is the capital of France?", "Hi",
           "Write a long story about a cat and a dog that live together in a small house"]
ENGINE = {"dtype": "float32"}


def build_checkpoint(path: Path, family: str) -> Path:
    if not (DEMO_MODEL / "tokenizer.json").exists():
        pytest.skip(f"demo model tokenizer not found in {DEMO_MODEL}")
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, path / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if family == "t5":
        config_class, model_class = transformers.T5Config, transformers.T5ForConditionalGeneration
    else:
        config_class, model_class = transformers.MT5Config, transformers.MT5ForConditionalGeneration
    config = config_class(vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=tokenizer.eos_token_id,
                          initializer_factor=5.0)  # large enough that greedy output is not one repeated token
    torch.manual_seed(0)
    model_class(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def t5_path(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("t5"), "t5")


@pytest.fixture(scope="session")
def mt5_path(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("mt5"), "mt5")


@pytest.fixture(scope="session")
def tokenizer(t5_path):
    return transformers.AutoTokenizer.from_pretrained(t5_path)


def hf_model(path: Path):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()


def params(max_tokens=8, temperature=0.0, top_p=1.0, top_k=None, seed=None, stop=(), logprobs=None) -> dict:
    return sampling_params(max_tokens, temperature, top_p, top_k, seed, list(stop), logprobs)


def input_batch(tokenizer, prompts, row_errors=None, hits=None) -> pa.Table:
    n = len(prompts)
    row_errors = row_errors or [None] * n
    columns = {
        "id": [f"in.jsonl#{i}" for i in range(n)],
        "_input": [{"prompt": p} for p in prompts],
        "prompt": [p if row_errors[i] is None else None for i, p in enumerate(prompts)],
        "tokenized_prompt": pa.array([tokenizer(p)["input_ids"] if row_errors[i] is None else None
                                      for i, p in enumerate(prompts)], pa.list_(pa.int32())),
        "_row_error": pa.array(row_errors, pa.string()),
    }
    if hits is not None:
        columns[HIT_COLUMN] = pa.array(hits, pa.string())
    return pa.table(columns)


def reference_greedy(model, ids: list[int], max_tokens: int) -> list[int]:
    """HF generate on one row alone (no padding), without the decoder start token."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, 1:].tolist()


def output_row(row: dict, max_tokens: int, logprobs: int | None = None) -> dict:
    return to_output_row(row, input_columns=output_names_for_inputs(["prompt"]), model="tiny-t5", run_id="run-1",
                         max_tokens=max_tokens, max_model_len=None, logprobs=logprobs)


# ---- 1. greedy = HF generate, padding changes nothing ---------------------------------------------

@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_greedy_batch_matches_hf_generate_on_each_row_alone(family, t5_path, mt5_path, tokenizer):
    path = t5_path if family == "t5" else mt5_path
    stage = Seq2SeqEngineStage(str(path), ENGINE, params(max_tokens=10))
    batch = input_batch(tokenizer, PROMPTS)
    assert len(set(len(t) for t in batch.column("tokenized_prompt").to_pylist())) == len(PROMPTS)
    out = stage(batch).to_pylist()
    model = hf_model(path)
    for row in out:
        expected = reference_greedy(model, row["tokenized_prompt"], 10)
        assert row["generated_tokens"] == expected
        assert row["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert row["num_generated_tokens"] == 10
        assert row["num_input_tokens"] == len(row["tokenized_prompt"])
        assert row[INFERENCE_ERROR] == ""
        assert row[RENDERED_PROMPT] == row["prompt"]
    assert len({tuple(r["generated_tokens"]) for r in out}) > 1  # the rows really differ


# ---- 2. logprobs are the model's own distribution ----------------------------------------------------

def test_token_logprobs_are_log_softmax_of_the_logits_and_sum_to_cumulative(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=6))
    out = stage(input_batch(tokenizer, PROMPTS)).to_pylist()
    model = hf_model(t5_path)
    for row in out:
        generated = row["generated_tokens"]
        decoder_input = torch.tensor([[model.config.decoder_start_token_id] + generated[:-1]])
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([row["tokenized_prompt"]]),
                           decoder_input_ids=decoder_input).logits[0]
        expected = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(generated)), generated].tolist()
        assert row["token_logprobs"] == pytest.approx(expected, abs=1e-5)
        result = output_row(row, max_tokens=6)
        assert result["cumulative_logprob"] == pytest.approx(sum(expected), abs=1e-4)
        assert result["mean_logprob"] == pytest.approx(sum(expected) / 6, abs=1e-4)
        assert result["finish_reason"] == "length"
        assert result["num_generated_tokens"] == 6


def test_sampled_logprobs_come_from_raw_logits_not_the_warped_scores(t5_path, tokenizer):
    """With temperature and top-k the reported logprobs are still the model's own (temperature 1) distribution."""
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=4, temperature=0.5, top_k=5, seed=3))
    row = stage(input_batch(tokenizer, PROMPTS[:1])).to_pylist()[0]
    model = hf_model(t5_path)
    generated = row["generated_tokens"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([row["tokenized_prompt"]]),
                       decoder_input_ids=torch.tensor([[0] + generated[:-1]])).logits[0]
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(generated)), generated].tolist()
    assert row["token_logprobs"] == pytest.approx(expected, abs=1e-5)


def count_generate_calls(stage: Seq2SeqEngineStage) -> list[int]:
    """Wrap the stage's model.generate; the list fills with each call's batch size."""
    calls: list[int] = []
    original = stage.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    stage.model.generate = counting_generate
    return calls


# ---- 3. rows that skip generation ----------------------------------------------------------------

def test_error_and_cache_hit_rows_pass_through_without_generation_and_keep_order(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=5))
    calls = count_generate_calls(stage)
    prompts = ["first", "broken", "cached", "last one"]
    hit = json.dumps({"generated_text": "from cache", "finish_reason": "stop"})
    batch = input_batch(tokenizer, prompts, row_errors=[None, "prompt is empty", None, None],
                        hits=[None, None, hit, None])
    out = stage(batch)
    assert calls == [2]  # one padded generate call, for the two rows that need it
    assert out.num_rows == batch.num_rows
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == batch.column("id").to_pylist()
    for name in batch.column_names:  # input columns untouched
        assert out.column(name).to_pylist() == batch.column(name).to_pylist()
    error_row, hit_row = rows[1], rows[2]
    assert error_row[INFERENCE_ERROR] == "prompt is empty"
    assert hit_row[INFERENCE_ERROR] == HIT_MARKER
    assert hit_row[RENDERED_PROMPT] == "cached"
    for row in (error_row, hit_row):
        for name in ("generated_text", "num_input_tokens", "num_generated_tokens", "generated_tokens",
                     "token_logprobs"):
            assert row[name] is None
    assert rows[0][INFERENCE_ERROR] == "" and rows[3][INFERENCE_ERROR] == ""
    assert rows[0]["num_generated_tokens"] == 5 and rows[3]["num_generated_tokens"] == 5
    assert output_row(error_row, 5)["error"] == "prompt is empty"
    cached = output_row(hit_row, 5)
    assert cached["error"] is None and cached["generated_text"] == "from cache"


def test_a_failing_batch_is_retried_row_by_row_and_only_the_bad_row_fails(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=3))
    batch = input_batch(tokenizer, PROMPTS)
    tokens = batch.column("tokenized_prompt").to_pylist()
    tokens[1] = [5, VOCAB + 10]  # outside the embedding table
    batch = batch.set_column(batch.column_names.index("tokenized_prompt"), "tokenized_prompt",
                             pa.array(tokens, pa.list_(pa.int32())))
    rows = stage(batch).to_pylist()
    assert rows[1][INFERENCE_ERROR].startswith("IndexError: ")
    assert rows[1]["generated_text"] is None
    assert output_row(rows[1], 3)["error"] == rows[1][INFERENCE_ERROR]
    model = hf_model(t5_path)
    for i in (0, 2):
        assert rows[i][INFERENCE_ERROR] == ""
        assert rows[i]["generated_tokens"] == reference_greedy(model, tokens[i], 3)


def test_small_logits_budget_splits_the_batch_without_changing_results(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=4, logprobs=2))
    whole = stage(input_batch(tokenizer, PROMPTS))
    calls = count_generate_calls(stage)
    stage.logits_budget_bytes = 2 * 4 * VOCAB * 4  # two rows of 4 steps
    assert stage.rows_per_generate() == 2
    split = stage(input_batch(tokenizer, PROMPTS))
    assert calls == [2, 1]
    assert split.column("generated_tokens").to_pylist() == whole.column("generated_tokens").to_pylist()
    for a, b in zip(split.column("token_logprobs").to_pylist(), whole.column("token_logprobs").to_pylist()):
        assert a == pytest.approx(b, abs=1e-5)


def test_generated_count_includes_eos_and_drops_the_padding_after_it(t5_path):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=6))
    eos = next(iter(stage.eos_ids))
    assert stage._generated_count([1011, 1012, eos, 0, 0, 0]) == 3
    assert stage._generated_count([0, 1011, 0, 1012, 0, 0]) == 6  # token 0 generated for real, no EOS: all count
    assert stage._text([1011, 1012, eos]) == stage.tokenizer.decode([1011, 1012])


# ---- 4. top logprobs -------------------------------------------------------------------------------

def test_top_logprobs_hold_k_tokens_per_position_most_likely_first(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=5, logprobs=3))
    out = stage(input_batch(tokenizer, PROMPTS))
    assert out.schema.field("top_logprobs").type == TOP_LOGPROBS_TYPE
    for row in out.to_pylist():
        top = row["top_logprobs"]
        assert len(top) == row["num_generated_tokens"] == 5
        for position, token, logprob in zip(top, row["generated_tokens"], row["token_logprobs"]):
            assert len(position) == 3
            values = [e["logprob"] for e in position]
            assert values == sorted(values, reverse=True)
            assert position[0]["token"] == tokenizer.decode([token])  # greedy: the chosen token is the top one
            assert position[0]["logprob"] == pytest.approx(logprob)
        result = output_row(row, max_tokens=5, logprobs=3)
        assert result["top_logprobs"] == top


def test_no_top_logprobs_column_without_logprobs(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=2))
    assert "top_logprobs" not in stage(input_batch(tokenizer, PROMPTS[:1])).column_names


# ---- 5. stop strings ---------------------------------------------------------------------------------

def test_stop_string_ends_generation_and_is_left_out_of_the_text(t5_path, tokenizer):
    plain = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=10))
    row = plain(input_batch(tokenizer, PROMPTS[1:2])).to_pylist()[0]
    full_text, generated = row["generated_text"], row["generated_tokens"]
    # the first token after the first whose text has not appeared before it: the stop string ends there
    position, stop = next((j, tokenizer.decode(generated[j:j + 1]).strip()) for j in range(1, len(generated))
                          if tokenizer.decode(generated[j:j + 1]).strip()
                          and tokenizer.decode(generated[j:j + 1]).strip() not in tokenizer.decode(generated[:j]))
    expected_text = full_text[:full_text.find(stop)]
    assert expected_text
    stopped = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=10, stop=[stop]))
    # the other rows in the batch keep going after this one stops
    rows = stopped(input_batch(tokenizer, [PROMPTS[1], PROMPTS[0], PROMPTS[2]])).to_pylist()
    first = rows[0]
    assert first["generated_text"] == expected_text
    assert stop not in first["generated_text"]
    assert first["generated_tokens"] == generated[:first["num_generated_tokens"]]
    assert first["num_generated_tokens"] == position + 1  # up to the token that completed the stop string
    assert len(first["token_logprobs"]) == position + 1
    assert [r["num_generated_tokens"] for r in rows[1:]] == [10, 10]  # their text has no stop string
    result = output_row(first, max_tokens=10)
    assert result["finish_reason"] == "stop"
    OutputRow.model_validate(result)


# ---- 6. seeded sampling ------------------------------------------------------------------------------

def test_seeded_sampling_is_repeatable_and_independent_of_the_batch(t5_path, tokenizer):
    sampled = params(max_tokens=8, temperature=1.0, seed=1234)
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, sampled)
    first = stage(input_batch(tokenizer, PROMPTS)).column("generated_text").to_pylist()
    again = Seq2SeqEngineStage(str(t5_path), ENGINE, sampled)(input_batch(tokenizer, PROMPTS))
    assert again.column("generated_text").to_pylist() == first
    alone = stage(input_batch(tokenizer, PROMPTS[1:2])).column("generated_text").to_pylist()
    assert alone == first[1:2]
    other_seed = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=8, temperature=1.0, seed=99))
    assert other_seed(input_batch(tokenizer, PROMPTS)).column("generated_text").to_pylist() != first


# ---- 7. declared inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("column", ["tokenized_prompt", "prompt", "_row_error"])
def test_missing_column_raises_keyerror_naming_the_stage(t5_path, tokenizer, column):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=2))
    batch = input_batch(tokenizer, PROMPTS[:1]).drop_columns([column])
    with pytest.raises(KeyError, match=rf"seq2seq engine: missing input column\(s\) \['{column}'\]"):
        stage(batch)


def test_unsupported_sampling_parameters_are_refused_at_construction(t5_path):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        Seq2SeqEngineStage(str(t5_path), ENGINE, {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})


# ---- 8. output rows ----------------------------------------------------------------------------------

def test_output_rows_from_the_stage_validate_with_the_output_schema(t5_path, tokenizer):
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=4, logprobs=2))
    batch = input_batch(tokenizer, PROMPTS + ["bad"], row_errors=[None, None, None, "prompt is empty"])
    for row in stage(batch).to_pylist():
        result = output_row(row, max_tokens=4, logprobs=2)
        parsed = OutputRow.model_validate(result)
        if row["_row_error"]:
            assert parsed.error == "prompt is empty" and parsed.generated_text is None
        else:
            assert parsed.error is None and parsed.finish_reason == "length"
            assert parsed.num_generated_tokens == 4 and parsed.cumulative_logprob < 0
            assert parsed.perplexity == pytest.approx(math.exp(-parsed.mean_logprob))
            assert len(parsed.top_logprobs) == 4


# ---- progress reporting ------------------------------------------------------------------------------

def test_progress_actor_gets_replica_started_and_each_batch(t5_path, tokenizer, monkeypatch):
    calls = []

    class Method:
        def __init__(self, name):
            self.name = name

        def remote(self, *args):
            calls.append((self.name, args))

    actor = types.SimpleNamespace(replica_started=Method("replica_started"), replica_batch=Method("replica_batch"))
    context = types.SimpleNamespace(get_actor_id=lambda: "actor-1", get_node_id=lambda: "node-1")
    fake_ray = types.SimpleNamespace(get_runtime_context=lambda: context,
                                     get_actor=lambda name: actor if name == "progress" else None)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    stage = Seq2SeqEngineStage(str(t5_path), ENGINE, params(max_tokens=3), progress_actor="progress")
    assert calls == [("replica_started", ("actor-1", "node-1"))]
    stage(input_batch(tokenizer, PROMPTS, row_errors=[None, "bad", None]))
    name, (replica, rows, tokens, started, ended) = calls[1]
    assert (name, replica, rows, tokens) == ("replica_batch", "actor-1", 2, 6)
    assert started <= ended
