"""A cluster run's local paths: what a node that does not see them as the driver does reports, and the refusal."""
from __future__ import annotations

from pathlib import Path

from llmbatch.cluster.shared_paths import PathCheck, refusal, unseen


def test_a_node_reports_paths_missing_or_of_another_size(tmp_path: Path):
    here = tmp_path / "prompts.jsonl"
    here.write_text("{}\n")
    checks = [PathCheck("input.path", str(here), 3), PathCheck("input.path", str(here), 99),
              PathCheck("output.path", str(tmp_path / "out" / "_lock" / "g000001.json"), 10)]
    assert unseen(checks) == [f"input.path: {here} (3 bytes there, 99 on the driver's node)",
                              f"output.path: {tmp_path / 'out' / '_lock' / 'g000001.json'} (not there)"]
    assert unseen(checks[:1]) == []


def test_the_refusal_names_each_node_and_path_and_says_what_to_use():
    error = refusal({"10.0.0.7 (ab12cd34)": ["input.path: /data/p.jsonl (not there)",
                                            "output.path: /out/r/_lock/g000001.json (not there)"]})
    assert str(error).startswith("node 10.0.0.7 (ab12cd34) does not see input.path: /data/p.jsonl (not there): "
                                 "a run on a cluster needs paths every node sees; use s3://")
    assert error.lines[:2] == ["node 10.0.0.7 (ab12cd34) does not see input.path: /data/p.jsonl (not there)",
                               "node 10.0.0.7 (ab12cd34) does not see output.path: /out/r/_lock/g000001.json "
                               "(not there)"]
    assert "cache.path" in error.lines[-1] and error.exit_code == 2
