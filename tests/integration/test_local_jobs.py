"""`llmbatch submit` end to end on local files: real CLI, embedded Ray, vLLM on CPU, the demo model."""
from __future__ import annotations

import json
from pathlib import Path

from llmbatch.cluster.home import llmbatch_home
from support import read_output, run_cli, run_cli_in_terminal, screen_text, write_job

MULTILINGUAL = {
    "en-capital": "What is the capital of France?",
    "zh-capital": "法国的首都是哪里？请用中文回答。",
    "ja-greeting": "こんにちは！元気ですか？",
    "ar-greeting": "مرحبا، كيف حالك؟",
    "emoji": "Describe this weather in words: ☀️🌧️❄️",
    "ru-count": "Посчитай от одного до трёх.",
}


def test_local_jsonl_job_one_row_per_input_with_errors_isolated(tmp_path: Path, demo_model: str):
    """Every input line becomes one output row: good prompts (any script) are generated and scored;
    a null prompt, a prompt over the context limit and a line that is not JSON each become an error row."""
    lines = [json.dumps({"qid": qid, "prompt": text}, ensure_ascii=False) for qid, text in MULTILINGUAL.items()]
    lines.append(json.dumps({"qid": "null-prompt", "prompt": None}))
    lines.append(json.dumps({"qid": "too-long", "prompt": "word " * 700}))
    lines.append("{this is not json")
    lines.append("")  # blank lines are not rows
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    job = write_job(tmp_path / "job.yaml", name="local-jsonl", model={"source": demo_model},
                    input={"path": str(data)}, sampling={"max_tokens": 24},
                    output={"path": str(tmp_path / "out"), "max_error_rate": 0.5})

    proc = run_cli("--log-format", "json", "submit", str(job), "--run-id", "r1",
                   "--set", "model.engine.max_model_len=512", check=True)

    rows, manifest = read_output(str(tmp_path / "out" / "r1"))
    assert len(rows) == 9 and len({r.id for r in rows}) == 9
    by_qid = {getattr(r, "qid", None): r for r in rows}
    for qid, text in MULTILINGUAL.items():
        row = by_qid[qid]
        assert row.error is None, row.error
        assert row.input_prompt == text                  # the input column comes back byte for byte
        assert text in row.prompt and "<|im_start|>" in row.prompt  # rendered with the chat template
        assert row.generated_text and row.num_generated_tokens > 0 and row.num_input_tokens > 0
        assert row.finish_reason in ("stop", "length")
        assert row.cumulative_logprob is not None and row.mean_logprob is not None
        assert row.model == demo_model and row.run_id == "r1"
    assert "Paris" in by_qid["en-capital"].generated_text
    assert "null" in by_qid["null-prompt"].error and by_qid["null-prompt"].generated_text is None
    assert "max_model_len is 512" in by_qid["too-long"].error
    bad_json = [r for r in rows if r.id == "prompts.jsonl#8"]
    assert bad_json and "input line 9" in bad_json[0].error

    assert manifest["status"] == "succeeded_with_errors"
    assert manifest["rows"] == {"in": 9, "out": 9, "ok": 6, "error": 3, "duplicate_ids": 0}
    error_lines = (tmp_path / "out" / "r1" / "errors" / "errors.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["id"] for line in error_lines) == sorted(r.id for r in rows if r.error)
    assert manifest["errors"]["rows"] == 3 and manifest["errors"]["path"] == "errors/errors.jsonl"
    assert {k["kind"] for k in manifest["errors"]["kinds"]} == {
        "prompt column is null", "input line not a JSON object",
        "prompt is tokens; model.engine.max_model_len is"}
    assert manifest["tokens"]["generated"] == sum(r.num_generated_tokens or 0 for r in rows)
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    assert manifest["versions"]["vllm"] and manifest["versions"]["ray"] == "2.60.0"
    assert manifest["input"]["files"][0]["path"].endswith("prompts.jsonl")
    assert manifest["engine"]["dtype"] == "float32"
    # a CPU replica runs vLLM in its own process, with a KV cache sized to this job's rows
    assert 0 < manifest["engine"]["kv_cache_memory_bytes"] < 2**30
    timings = manifest["timings"]
    assert set(timings) == {"launch", "prepare", "ray_start", "pre_pass", "engine_start", "first_row", "generation",
                            "write", "judges", "commit"}
    assert timings["judges"] is None
    assert all(timings[k] >= 0 for k in timings if k != "judges")
    assert 0 < timings["engine_start"] < timings["first_row"] < manifest["wall_seconds"]
    assert timings["generation"] > 0
    replica = manifest["replicas"][0]
    assert replica["engine_constructing_at"] < replica["engine_ready_at"] <= replica["first_batch_at"]
    assert f"{timings['first_row']:.1f} s to the first rows (Ray {timings['ray_start']:.1f}" in proc.stdout

    assert "run r1: succeeded_with_errors" in proc.stdout and "6 ok, 3 error" in proc.stdout
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    finished = [e for e in events if e.get("event") == "run_finished"]
    assert finished and finished[0]["run_id"] == "r1" and finished[0]["job"] == "local-jsonl"
    assert any(e.get("event") == "progress" for e in events) or manifest["wall_seconds"] < 10


def test_chat_messages_job_uses_the_models_chat_template(tmp_path: Path, demo_model: str):
    """A messages column is rendered with the model's chat template; the system prompt goes first;
    a malformed conversation is an error row, not a failed job. Run at a terminal: the live view shows the
    run's phases and ends in the summary; Ray's and vLLM's output goes to the run's log file, not the screen."""
    rows_in = [
        {"conv": "c1", "messages": [{"role": "user", "content": "Name a primary colour."}]},
        {"conv": "c2", "messages": [{"role": "user", "content": "Hi!"},
                                     {"role": "assistant", "content": "Hello! How can I help?"},
                                     {"role": "user", "content": "Say 'thank you' in German."}]},
        {"conv": "c3", "messages": [{"role": "user", "content": "Ça va ? Réponds en français."}]},
        {"conv": "bad", "messages": [{"speaker": "user", "text": "no role or content keys"}]},
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_in), encoding="utf-8")
    job = write_job(tmp_path / "job.yaml", name="chat", model={"source": demo_model},
                    input={"path": str(data), "messages_column": "messages", "id_column": "conv",
                           "system_prompt": "You are terse."},
                    sampling={"max_tokens": 16}, output={"path": str(tmp_path / "out"), "max_error_rate": 0.25})

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / demo_model).symlink_to(llmbatch_home() / "models" / demo_model)
    code, received = run_cli_in_terminal("submit", str(job), "--run-id", "chat-1",
                                         env={"LLMBATCH_HOME": str(home)})
    shown = screen_text(received)
    assert code == 0, shown[-4000:]
    for phase in ("starting Ray", "starting engines", "finished: succeeded_with_errors"):
        assert phase in shown, (phase, shown[-4000:])
    assert "4/4 rows" in shown and "1 error(s)" in shown
    assert shown.rfind("phase") < shown.find("run chat-1: succeeded_with_errors")  # the summary comes last
    log_file = home / "runs" / "chat-1" / "llmbatch.log"
    assert str(log_file) in shown
    for noise in ("Triton", "core_worker", "ray.init()", "No cloud storage mirror", "Token authentication",
                  "INFO ", "WARNING "):
        assert noise not in shown, (noise, shown[-4000:])
    logged = log_file.read_text(encoding="utf-8")
    assert "run_finished" in logged and ("Triton" in logged or "WARNING" in logged or "INFO" in logged)
    proc = run_cli("runs", "--json", env={"LLMBATCH_HOME": str(home)}, check=True)
    (run,) = json.loads(proc.stdout)
    assert run["run_id"] == "chat-1" and run["status"] == "succeeded_with_errors" and run["rows_ok"] == 3
    shown_rows = run_cli("results", "latest", "--rows", "4", env={"LLMBATCH_HOME": str(home)}, check=True).stdout
    assert "Say 'thank you' in German." in shown_rows and "<|im_start|>" not in shown_rows
    assert str(tmp_path / "out" / "chat-1") in shown_rows

    rows, manifest = read_output(str(tmp_path / "out" / "chat-1"))
    by_id = {r.id: r for r in rows}
    assert set(by_id) == {"c1", "c2", "c3", "bad"}
    for conv in ("c1", "c2", "c3"):
        row = by_id[conv]
        assert row.error is None and row.generated_text
        assert row.prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
        assert row.prompt.rstrip().endswith("<|im_start|>assistant")
    assert "Hello! How can I help?" in by_id["c2"].prompt
    assert "Ça va ? Réponds en français." in by_id["c3"].prompt
    assert "item 0 must be {role: text, content: text}" in by_id["bad"].error
    assert manifest["rows"]["ok"] == 3 and manifest["rows"]["error"] == 1
