"""`llmbatch sweep` on the embedded Ray: the demo model and a tiny random-weight Llama run the same four prompts
one after another in one process (two engine starts), then one report compares them and projects each to the
whole input on an H100."""
from __future__ import annotations

import json
import re
from pathlib import Path

from support import REPO, run_cli, write_job
from tiny_families import build_tiny


def test_a_sweep_runs_each_model_and_reports_them_side_by_side(tmp_path: Path, demo_model: str):
    from llmbatch.cluster.model_store import resolve_local

    tiny = build_tiny("llama", tmp_path / "models" / "tiny-llama", resolve_local(demo_model))
    job = write_job(tmp_path / "sweep.yaml", name="sweep-check",
                    model={"source": demo_model, "engine": {"max_model_len": 256}},
                    input={"path": str(REPO / "jobs" / "data" / "quickstart.jsonl"), "prompt_column": "prompt",
                           "limit": 4},
                    sampling={"max_tokens": 8},
                    scoring=[{"name": "has_text", "kind": "regex", "pattern": r"\w"}],
                    output={"path": str(tmp_path / "out")})
    report = tmp_path / "report"
    proc = run_cli("sweep", str(job), "--model", demo_model, "--model", str(tiny), "--project-to", "H100",
                   "--out", str(report), check=True)
    assert proc.returncode == 0

    runs = sorted(path.parent for path in (tmp_path / "out").glob("*/_manifest.json"))
    assert len(runs) == 2, proc.stdout + proc.stderr[-4000:]
    by_slug = {}
    for run in runs:
        found = re.fullmatch(r"sweep-check-(.+)-\d{8}-\d{6}-[0-9a-f]{4}", run.name)
        assert found, run.name
        manifest = json.loads((run / "_manifest.json").read_text())
        assert manifest["status"] == "succeeded" and manifest["rows"]["ok"] == 4
        by_slug[found.group(1)] = manifest["model"]["source"]
    assert by_slug == {"smollm2-135m-instruct": demo_model, "tiny-llama": str(tiny)}

    markdown, page = report / "compare.md", report / "compare.html"
    assert markdown.is_file() and page.is_file()
    text, html = markdown.read_text(), page.read_text()
    for run in runs:
        assert run.name in text and run.name in html
    assert demo_model in text and "tiny-llama" in text
    projected = text.split("## Projected at full size", 1)[1]
    rows = [line for line in projected.splitlines() if line.startswith("| ") and "H100" in line]
    assert len(rows) == 2 and any(demo_model in row for row in rows) and any("tiny-llama" in row for row in rows)
    assert all("| 12 |" in row for row in rows)  # the whole input: input.limit is the runs' only
    assert "## Projected at full size" in proc.stdout and f"wrote {markdown} and {page}" in proc.stdout
