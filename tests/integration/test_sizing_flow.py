"""Throughput-based sizing on the real demo model: profile, plan, run with replicas: auto, feedback."""
from __future__ import annotations

import json
from pathlib import Path

from support import DEMO_MODEL, read_output, run_cli, write_job


def test_profile_plan_run_and_feedback(tmp_path: Path, demo_model: str):
    """A measured profile drives `plan`; `replicas: auto` runs; the run's measurement and the error of the
    prediction go back into the profile, and the next plan shows that error."""
    env = {"LLMBATCH_PROFILE_STORE": str(tmp_path / "profiles")}
    profiled = run_cli("profile", DEMO_MODEL, "--samples", "16", "--max-tokens", "32", env=env, check=True)
    assert "output tok/s" in profiled.stdout and "samples            16 ok of 16" in profiled.stdout
    assert "prefill tok/s" in profiled.stdout and "decode tok/s" in profiled.stdout
    stored = json.loads(next((tmp_path / "profiles").glob("*.json")).read_text())
    assert len(stored["measurements"]) == 1 and len(stored["prefill"]) == 1 and stored["predictions"] == []
    assert stored["prefill"][0]["rows"] == 16 and stored["prefill"][0]["prefill_tokens_per_second"] > 0
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Name {n} animals that live in the sea."}) + "\n"
                            for n in range(2, 26)), encoding="utf-8")
    job = write_job(tmp_path / "job.yaml", name="sized", model={"source": demo_model},
                    input={"path": str(data)}, sampling={"max_tokens": 32},
                    output={"path": str(tmp_path / "out")},
                    resources={"replicas": "auto", "deadline": "2h", "max_replicas": 4})

    planned = json.loads(run_cli("plan", str(job), "--json", env=env, check=True).stdout)
    assert planned["profile"]["used"] is True and planned["profile"]["measurements"] == 1
    assert planned["profile"]["prefill_tokens_per_second"] > 0 and planned["profile"]["decode_tokens_per_second"] > 0
    assert planned["rows"] == 24 and planned["input_tokens_method"] == "counted every row (24)"
    assert planned["input_tokens"] > 24 * 5
    assert 0 < planned["output_tokens"] <= 24 * 32
    assert planned["replicas"] == 1 and planned["tensor_parallel_size"] == 1 and planned["accelerator"] == "CPU"
    assert planned["wall_seconds"] > planned["startup_seconds"] > 0 and planned["cost_usd"] >= 0
    text = run_cli("submit", str(job), "--dry-run", env=env, check=True).stdout
    assert text.startswith(f"plan for {DEMO_MODEL} on CPU") and "replicas           1" in text
    assert not (tmp_path / "out").exists()

    run_cli("submit", str(job), "--run-id", "sized-1", env=env, check=True)
    rows, manifest = read_output(str(tmp_path / "out" / "sized-1"))
    assert len(rows) == 24 and manifest["status"] == "succeeded"
    assert manifest["engine"]["replicas"] == 1
    assert manifest["plan"]["profile"]["used"] is True and manifest["plan"]["wall_seconds"] > 0
    assert manifest["startup_seconds"] > 0 and manifest["replicas"][0]["output_tokens_per_second"] > 0

    profile = json.loads(next((tmp_path / "profiles").glob("*.json")).read_text())
    assert [m["source"] for m in profile["measurements"]][-1] == "run:sized-1"
    assert profile["predictions"][-1]["run_id"] == "sized-1"
    assert profile["predictions"][-1]["measured_wall_seconds"] == manifest["generation_seconds"]
    again = run_cli("plan", str(job), env=env, check=True).stdout
    assert "past prediction    run sized-1: predicted" in again and "(2 measurement(s))" in again
