"""Storage that fails mid-run (real S3 endpoint behind a proxy): credentials revoked while parts are being
written, then a 503 storm on the parts while the run resumes. Neither commits a manifest or deletes a complete part, and
once access returns a resubmission finishes the run with every row exactly once."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from flaky_s3 import FlakyS3Proxy
from support import CLI, REPO, kill_session, read_output, run_cli, write_job

ROWS = 24


def _parts(s3) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p in s3.find("results/outage/o1") if p.rsplit("/", 1)[-1].startswith("part-g")}


def test_revoked_credentials_and_a_503_storm_lose_nothing_and_the_run_finishes_once_access_returns(
        tmp_path: Path, s3, s3_server: str, demo_model: str):
    s3.mkdir("inputs")
    s3.mkdir("results")
    s3.pipe_file("inputs/prompts.jsonl", "".join(
        json.dumps({"qid": f"q{i:02d}", "prompt": f"Write a sentence about the number {i}."}) + "\n"
        for i in range(ROWS)).encode())
    job = write_job(tmp_path / "job.yaml", name="outage", model={"source": demo_model},
                    input={"path": "s3://inputs/prompts.jsonl", "id_column": "qid"}, sampling={"max_tokens": 24},
                    output={"path": "s3://results/outage", "rows_per_part": 4}, resources={"batch_size": 4})
    with FlakyS3Proxy(s3_server) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.url}
        proc = subprocess.Popen([CLI, "submit", str(job), "--run-id", "o1"], cwd=REPO, env=env, text=True,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 600
            while not _parts(s3) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            assert proc.poll() is None, "the run ended before its credentials could be revoked"
            proxy.outage = 403
            _, err = proc.communicate(timeout=600)
        finally:
            kill_session(proc)
        assert proc.returncode != 0 and "Traceback" not in err, err[-4000:]
        assert "results" in err and ("denied" in err.lower() or "credential" in err.lower()), err[-4000:]
        written = _parts(s3)
        assert written and not s3.exists("results/outage/o1/_manifest.json")

        proxy.outage, proxy.outage_match = 503, "/part-g"  # the resume lists the run, then reading its parts fails
        storm = run_cli("submit", str(job), "--run-id", "o1", env={"AWS_ENDPOINT_URL_S3": proxy.url}, timeout=900)
        assert storm.returncode != 0 and "Traceback" not in storm.stderr, storm.stderr[-4000:]
        assert not s3.exists("results/outage/o1/_manifest.json") and _parts(s3) >= written

        proxy.outage = proxy.outage_match = None
        done = run_cli("--log-format", "json", "submit", str(job), "--run-id", "o1",
                       env={"AWS_ENDPOINT_URL_S3": proxy.url}, check=True)
    rows, manifest = read_output("s3://results/outage/o1", s3)
    assert sorted(r.id for r in rows) == [f"q{i:02d}" for i in range(ROWS)]
    assert manifest["status"] == "succeeded" and manifest["resumed"]["rows_skipped"] >= 4
    assert manifest["resumed"]["parts_removed"] == [], done.stderr[-2000:]
