"""Scored outputs end to end on the demo model: every scorer kind with a judge pass, multiple-choice
log-likelihood scoring, run summaries, `results`, and a `compare` report rendered in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import string
import subprocess
from pathlib import Path

import pytest
import yaml

from support import REPO, read_output, run_cli

EXAMPLES = REPO / "jobs" / "examples"
PYTHON_SCORER = {"name": "words", "kind": "python", "function": "row_scorers:words_per_answer",
                 "options": {"cap": 40}}
SCORER_ENV = {"PYTHONPATH": str(Path(__file__).parent)}


def scored_job(tmp_path: Path, demo_model: str, *, judge: bool, sampling: dict) -> Path:
    spec = yaml.safe_load((EXAMPLES / "scored.yaml").read_text(encoding="utf-8"))
    spec["model"]["source"] = demo_model
    spec["input"]["path"] = str(EXAMPLES / "scored.jsonl")
    spec["sampling"].update(sampling)
    spec["scoring"] = [s for s in spec["scoring"] if judge or s["kind"] != "judge"] + [PYTHON_SCORER]
    spec["output"] = {"path": str(tmp_path / "out"), "max_error_rate": 0.5}  # the python scorer refuses one row
    path = tmp_path / f"scored-{'judge' if judge else 'plain'}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory, demo_model):
    """Two runs of the example scoring job: greedy with a judge pass, and sampled (temperature 0.9) without."""
    root = tmp_path_factory.mktemp("scored")
    greedy = run_cli("submit", str(scored_job(root, demo_model, judge=True, sampling={"logprobs": 3})),
                     "--run-id", "greedy", env=SCORER_ENV, check=True)
    sampled = run_cli("submit", str(scored_job(root, demo_model, judge=False,
                                               sampling={"temperature": 0.9, "seed": 7})),
                      "--run-id", "sampled", env=SCORER_ENV, check=True)
    return root / "out", greedy, sampled


def _norm(text: str, steps: list[str]) -> str:
    if "lowercase" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = "".join(c for c in text if c not in string.punctuation)
    return text.strip() if "strip" in steps else text


def test_every_scorer_kind_scores_every_row(scored_runs):
    """Deterministic scorers agree with the generated text; the judge's scores parse and land on its scale;
    a scorer that cannot score a row leaves a null score, keeps the generation and says why in `error`."""
    out, proc, _ = scored_runs
    rows, manifest = read_output(str(out / "greedy"))
    answers = {json.loads(line)["qid"]: json.loads(line)["answer"]
               for line in (EXAMPLES / "scored.jsonl").read_text(encoding="utf-8").splitlines()}
    assert len(rows) == len(answers)
    for row in rows:
        text, answer = row.generated_text, answers[row.qid]
        assert text, row
        assert row.score_exact == (_norm(text, ["strip", "lowercase", "punctuation"])
                                   == _norm(answer, ["strip", "lowercase", "punctuation"]))
        assert row.score_mentions_answer == (answer.lower() in text.lower())
        assert row.score_has_number == bool(re.search(r"\d", text))
        try:
            parsed, valid = json.loads(text), True
        except ValueError:
            parsed, valid = None, False
        assert row.score_is_json == valid
        assert row.score_person_json == (isinstance(parsed, dict) and isinstance(parsed.get("name"), str)
                                         and type(parsed.get("age")) is int)
        assert 0.0 <= row.score_chrf <= 100.0
        assert row.score_helpful in (1.0, 2.0, 3.0, 4.0, 5.0)           # constrained to the scale
        assert row.score_helpful_raw.strip() == str(int(row.score_helpful))
        assert row.perplexity is not None and row.perplexity >= 1.0
        assert len(row.top_logprobs) == row.num_generated_tokens
        assert all(1 <= len(position) <= 3 for position in row.top_logprobs)
        if row.qid == "math-2plus2":
            assert row.score_words is None
            assert row.error == "score_words: row_scorers:words_per_answer raised ValueError: " \
                                "this scorer refuses arithmetic"
        else:
            assert row.error is None and row.score_words == min(40.0, len(text.split()))
    assert manifest["rows"]["error"] == 1 and manifest["status"] == "succeeded_with_errors"
    assert manifest["judges"]["helpful"]["replicas"] == 1
    assert not (out / "greedy" / "_staging").exists()


def test_summary_file_and_final_screen(scored_runs):
    """`_summary.json` sits beside the manifest with per-scorer figures that match the rows,
    and the CLI's last screen shows them."""
    out, proc, _ = scored_runs
    rows, manifest = read_output(str(out / "greedy"))
    summary = json.loads((out / "greedy" / "_summary.json").read_text())
    assert manifest["summary"] == "_summary.json"
    exact = summary["scores"]["exact"]
    assert exact["scored"] == len(rows) and exact["passed"] == sum(bool(r.score_exact) for r in rows)
    helpful = summary["scores"]["helpful"]
    assert sum(b["count"] for b in helpful["buckets"]) == len(rows)
    assert helpful["mean"] == pytest.approx(sum(r.score_helpful for r in rows) / len(rows), abs=1e-5)
    assert summary["errors"]["by_scorer"]["words"] == 1
    assert summary["tokens"] == manifest["tokens"] and summary["cost_usd"] > 0
    assert "  scores" in proc.stdout and "score_helpful" in proc.stdout and "score_exact" in proc.stdout

    shown = run_cli("results", str(out / "greedy"), "--rows", "2", check=True).stdout
    assert "run greedy: succeeded_with_errors" in shown and "score_exact" in shown
    assert shown.count("    output     ") == 2


def test_multiple_choice_scoring_picks_the_likely_answer(tmp_path, demo_model):
    """task: score writes each choice's log-likelihood after the prompt and takes the argmax;
    the demo model gets easy facts right far above chance (1 in 3)."""
    spec = yaml.safe_load((EXAMPLES / "multiple_choice.yaml").read_text(encoding="utf-8"))
    spec["model"]["source"] = demo_model
    spec["input"]["path"] = str(EXAMPLES / "multiple_choice.jsonl")
    spec["output"] = {"path": str(tmp_path / "out"), "max_error_rate": 0.5}  # the python scorer refuses one row
    job = tmp_path / "mc.yaml"
    job.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")

    proc = run_cli("submit", str(job), "--run-id", "mc", check=True)
    rows, manifest = read_output(str(tmp_path / "out" / "mc"))
    assert len(rows) == 10 and all(r.error is None for r in rows)
    for row in rows:
        assert len(row.choice_logprobs) == 3 and all(lp < 0 for lp in row.choice_logprobs)
        assert row.choice == max(range(3), key=lambda i: row.choice_logprobs[i])
        assert row.generated_text == row.choices[row.choice]
        assert row.cumulative_logprob == pytest.approx(row.choice_logprobs[row.choice])
        assert all(n >= 1 for n in row.choice_num_tokens)
    correct = sum(bool(r.score_correct) for r in rows)
    assert correct >= 8, [(r.qid, r.generated_text) for r in rows]
    assert "score_correct" in proc.stdout


def test_compare_report_renders_charts_in_chromium(scored_runs, tmp_path):
    """`compare` over two runs with different sampling writes markdown and an HTML page whose two charts
    show one point per run when Chromium renders it."""
    out, _, _ = scored_runs
    proc = run_cli("compare", str(out / "greedy"), str(out / "sampled"), "--out", str(tmp_path / "report"),
                   "--quality", "chrf", check=True)
    markdown = (tmp_path / "report" / "compare.md").read_text()
    assert "| greedy |" in markdown and "| sampled |" in markdown and "temperature=0.9" in markdown
    assert "compare.html" in proc.stdout

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test (.ci/run installs it)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium'}"]
    page = (tmp_path / "report" / "compare.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="chart"') == 2 and dom.stdout.count('class="point"') == 4
    shot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1400,1000", page],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = Image.open(shot).convert("RGB")
    colours = {pixels.getpixel((x, y)) for x in range(0, pixels.width, 2) for y in range(0, pixels.height, 2)}
    assert (0x1f, 0x77, 0xb4) in colours and (0xd6, 0x27, 0x28) in colours  # both runs' points were painted
