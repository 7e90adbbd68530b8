"""`llmbatch preview`: rows rendered as the model sees them, with a real (tiny) tokenizer and no Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from llmbatch.jobs.cli import main

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|system|>", "<|assistant|>",
         "hello", "world", "what", "is", "the", "capital", "of", "france", "q", ":", "a", "b", "c", "paris", "rome"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def build_checkpoint(folder: Path, chat_template: str | None) -> Path:
    """A word-level tokenizer and a Llama config.json; the weight file is empty (preview never reads it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|user|>", "<|system|>", "<|assistant|>"])
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                     "max_position_embeddings": 512}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("chat-model"), CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("plain-model"), None)


def tokenizer_of(model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def write_job(tmp_path: Path, checkpoint: Path, rows: list, engine: dict | None = None, **sections) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    job = {"name": "preview-test", "model": {"source": str(checkpoint), "engine": engine or {}},
           "input": {"path": str(data), **sections.pop("input", {})},
           "output": {"path": str(tmp_path / "out")}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def preview(job: Path, *args: str) -> dict:
    result = CliRunner().invoke(main, ["preview", str(job), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_template_system_prompt_and_chat_template_are_in_the_rendered_text(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"question": "what is the capital of france"}],
                    input={"template": "q : {question}", "system_prompt": "a b c"})
    row = preview(job)["rows"][0]
    assert row["error"] is None
    assert row["prompt"] == "<|system|> a b c\n<|user|> q : what is the capital of france\n<|assistant|> "
    tokenizer = tokenizer_of(chat_model)
    assert row["prompt_token_ids"] == tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    assert row["inputs"] == [{"label": "question", "text": "what is the capital of france", "tokens": 6}]


def test_text_output_shows_each_part_with_its_token_count(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "hello world"}], input={"system_prompt": "a b"},
                    sampling={"max_tokens": 7})
    result = CliRunner().invoke(main, ["preview", str(job)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "  input prompt (2 tokens)\n      hello world\n" in text
    rendered = len(tokenizer_of(chat_model)("<|system|> a b\n<|user|> hello world\n<|assistant|> ",
                                            add_special_tokens=False)["input_ids"])
    assert f"  rendered ({rendered} tokens; up to 7 generated)\n      <|system|> a b\n      <|user|> hello world\n" in text
    assert "max_tokens 7" in text and "the model's chat template" in text


def test_generation_room_is_what_the_context_leaves(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "hello"}], sampling={"max_tokens": 10},
                    engine={"max_model_len": 12})
    shown = preview(job)
    row = shown["rows"][0]
    assert shown["max_model_len"] == 12
    assert len(row["prompt_token_ids"]) == 3 and row["generated_up_to"] == 12 - 3


def test_a_bad_row_shows_its_error_and_the_others_render(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "hello"}, {"prompt": None}, "not json", {"prompt": 3},
                                           {"prompt": "world"}])
    rows = preview(job)["rows"]
    assert [r["error"] for r in rows] == [
        None, "prompt column 'prompt' is null", rows[2]["error"],
        "column 'prompt' holds int, expected text", None]
    assert rows[2]["error"].startswith("input line 3: not a JSON object")
    assert rows[1]["prompt"] is None and rows[4]["prompt"].startswith("<|user|> world")
    result = CliRunner().invoke(main, ["preview", str(job)])
    assert result.exit_code == 0
    assert "  error prompt column 'prompt' is null" in result.stdout


def test_a_prompt_longer_than_max_model_len_is_a_row_error(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "a " * 20}],
                    engine={"max_model_len": 10}, sampling={"max_tokens": 4})
    row = preview(job)["rows"][0]
    assert row["error"].startswith("prompt is ") and "max_model_len is 10" in row["error"]


def test_n_and_input_limit_bound_the_rows(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": w} for w in ("a", "b", "c", "hello")])
    assert [r["id"] for r in preview(job, "-n", "2")["rows"]] == ["rows.jsonl#0", "rows.jsonl#1"]
    assert len(preview(job)["rows"]) == 4
    assert len(preview(job, "--set", "input.limit=1")["rows"]) == 1
    assert preview(job, "-n", "0")["rows"] == []


def test_messages_and_id_column(tmp_path, chat_model):
    messages = [{"role": "system", "content": "b"}, {"role": "user", "content": "hello world"}]
    job = write_job(tmp_path, chat_model, [{"key": "k1", "chat": messages}],
                    input={"messages_column": "chat", "id_column": "key", "system_prompt": "ignored here"})
    row = preview(job)["rows"][0]
    assert row["id"] == "k1"
    assert row["prompt"] == "<|system|> b\n<|user|> hello world\n<|assistant|> "
    assert [(f["label"], f["tokens"]) for f in row["inputs"]] == [("chat[0] system", 1), ("chat[1] user", 2)]


def test_model_without_chat_template_gets_the_plain_prompt(tmp_path, plain_model):
    job = write_job(tmp_path, plain_model, [{"prompt": "hello"}], input={"system_prompt": "a"})
    shown = preview(job)
    assert shown["chat_template"] is False
    assert shown["rows"][0]["prompt"] == "a\n\nhello"
    assert any("no chat template" in note for note in shown["notes"])


def test_score_task_shows_the_prompt_and_each_scored_completion(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "the capital of france is", "choices": [" paris", " rome"]}],
                    task="score", input={"choices_column": "choices"})
    shown = preview(job)
    row = shown["rows"][0]
    assert shown["max_tokens"] is None and shown["chat_template"] is False
    assert row["prompt"] == "the capital of france is"
    assert row["scored"] == [{"label": "' paris'", "text": " paris", "tokens": 1},
                             {"label": "' rome'", "text": " rome", "tokens": 1}]


def test_a_column_no_row_has_is_noted(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"question": "hello"}])
    shown = preview(job)
    assert "input.prompt_column: column 'prompt' is in none of these rows" in shown["notes"]
    assert shown["rows"][0]["error"] == "prompt column 'prompt' is null"


def test_terminal_escapes_in_the_input_are_not_printed(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "hello \x1b[31mworld\x1b]0;title\x07"}])
    result = CliRunner().invoke(main, ["preview", str(job)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "hello world" in result.stdout


def test_a_scheduled_job_previews_its_latest_slot(tmp_path, chat_model):
    from datetime import date, timedelta

    for days in range(-3, 2):
        day = (date.today() + timedelta(days=days)).isoformat()
        (tmp_path / f"in-{day}.jsonl").write_text(json.dumps({"prompt": "hello"}) + "\n")
    job = write_job(tmp_path, chat_model, [], schedule={"cron": "0 0 * * *"})
    raw = yaml.safe_load(job.read_text())
    raw["input"]["path"] = str(tmp_path / "in-{ds}.jsonl")
    raw["output"]["path"] = str(tmp_path / "out-{ds}")
    job.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["preview", str(job), "--json"])
    assert result.exit_code == 0, result.output
    assert "latest slot" in result.stderr
    shown = json.loads(result.stdout)
    assert "{ds}" not in shown["input_path"] and len(shown["rows"]) == 1


def test_preview_starts_no_ray(tmp_path, chat_model):
    import ray

    job = write_job(tmp_path, chat_model, [{"prompt": "hello"}])
    preview(job)
    assert not ray.is_initialized()


def test_a_missing_input_is_a_user_error(tmp_path, chat_model):
    job = write_job(tmp_path, chat_model, [{"prompt": "hello"}], input={"path": str(tmp_path / "absent.jsonl")})
    result = CliRunner().invoke(main, ["preview", str(job)])
    assert result.exit_code == 2
    assert "input.path:" in result.stderr


def test_a_catalog_model_not_prepared_is_not_built(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    job = write_job(tmp_path, Path("unused"), [{"prompt": "hello"}])
    job.write_text(job.read_text().replace("source: unused", "source: smollm2-135m-instruct"))
    result = CliRunner().invoke(main, ["preview", str(job)])
    assert result.exit_code == 2, result.output
    assert "run: llmbatch models prepare smollm2-135m-instruct" in result.stderr
    assert not (tmp_path / "home" / "models").exists()
