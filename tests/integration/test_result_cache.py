"""The result cache across runs, through the real CLI: a rerun infers only the prompts that changed."""
from __future__ import annotations

import json
from pathlib import Path

from support import read_output, run_cli, write_job

QUESTIONS = [f"In one short sentence, what is {thing}?" for thing in (
    "a river", "a mountain", "a violin", "bread", "a comet", "a library", "rain", "a bridge", "a clock", "salt",
    "a lighthouse")]


def _write_prompts(path: Path, questions: list[str]) -> None:
    rows = [{"qid": f"q{i}", "prompt": q} for i, q in enumerate(questions)] + [{"qid": "empty", "prompt": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_rerun_with_changed_prompts_reuses_the_rest_and_infers_only_those(tmp_path: Path, demo_model: str):
    """Cold run: every good row generated and added to the cache (the error row is not). Rerun with two
    prompts edited: the nine unchanged rows come from the cache with the same text, only the two edited ones
    reach the engine, and the manifest counts the hits."""
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, QUESTIONS)
    cache = tmp_path / "cache"
    job = write_job(tmp_path / "job.yaml", name="cached", model={"source": demo_model},
                    input={"path": str(data), "id_column": "qid"}, sampling={"max_tokens": 16},
                    output={"path": str(tmp_path / "out"), "max_error_rate": 0.2}, cache={"path": str(cache)})

    cold = run_cli("submit", str(job), "--run-id", "cold", "--set", "model.engine.max_model_len=512", check=True)
    rows, manifest = read_output(str(tmp_path / "out" / "cold"))
    assert len(rows) == 12
    assert all(r.cached is False for r in rows)
    assert manifest["cache"]["used"] is True
    assert manifest["cache"]["hits"] == 0 and manifest["cache"]["entries_written"] == 11
    assert sum(r["rows"] for r in manifest["replicas"]) == 11
    assert "cache        0 of 12 rows reused (0.0%), 11 added" in cold.stdout
    namespace = cache / manifest["cache"]["namespace"]
    assert json.loads((namespace / "_key.json").read_text())["model_fingerprint"] == manifest["model"]["fingerprint"]
    first = {r.id: r for r in rows}

    edited = list(QUESTIONS)
    edited[2] = "In one short sentence, what is a cello?"
    edited[7] = "In one short sentence, what is a tunnel?"
    _write_prompts(data, edited)
    warm = run_cli("submit", str(job), "--run-id", "warm", "--set", "model.engine.max_model_len=512", check=True)
    rows, manifest = read_output(str(tmp_path / "out" / "warm"))
    by_id = {r.id: r for r in rows}
    assert len(rows) == 12 and set(by_id) == set(first)
    for qid in (f"q{i}" for i in range(11)):
        row = by_id[qid]
        assert row.error is None and row.run_id == "warm"
        if qid in ("q2", "q7"):
            assert row.cached is False and row.generated_text
            assert "cello" in row.prompt or "tunnel" in row.prompt
        else:
            assert row.cached is True
            assert row.generated_text == first[qid].generated_text
            assert row.num_generated_tokens == first[qid].num_generated_tokens
            assert row.cumulative_logprob == first[qid].cumulative_logprob
    assert by_id["empty"].error and by_id["empty"].cached is False
    assert manifest["cache"]["hits"] == 9 and manifest["cache"]["hit_rate"] == 0.75
    assert manifest["cache"]["entries_written"] == 2
    assert sum(r["rows"] for r in manifest["replicas"]) == 2       # the engine saw the edited rows only
    assert manifest["rows"] == {"in": 12, "out": 12, "ok": 11, "error": 1, "duplicate_ids": 0}
    assert "cache        9 of 12 rows reused (75.0%), 2 added" in warm.stdout
    assert len(list(namespace.glob("*.parquet"))) == 2
