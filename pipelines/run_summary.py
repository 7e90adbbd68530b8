"""`_summary.json`: what a run's scores say, aggregated from its output parts (streamed, by column)."""
from __future__ import annotations

import math
from array import array
from collections import Counter
from typing import Any

from llmbatch.pipelines.readback import read_back
from llmbatch.pipelines.run_files import SUMMARY_NAME, RunFolder
from llmbatch.pipelines.scorer_specs import read_scorers
from llmbatch.pipelines.scorers import score_column
from llmbatch.run_manifest import Manifest

BUCKETS = 10


class _Stat:
    """Running figures for one numeric or boolean column."""

    def __init__(self, boolean: bool):
        self.boolean = boolean
        self.values = array("d")
        self.nulls = 0

    def add(self, values: list) -> None:
        for value in values:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                self.nulls += 1
            else:
                self.values.append(float(value))

    def figures(self, scale: list[int] | None = None) -> dict[str, Any]:
        n = len(self.values)
        out: dict[str, Any] = {"scored": n, "null": self.nulls}
        if n == 0:
            return out
        finite = [v for v in self.values if math.isfinite(v)]
        if self.boolean:
            passed = int(sum(self.values))
            out.update(passed=passed, pass_rate=round(passed / n, 6))
            return out
        ordered = sorted(finite)
        if not ordered:
            return out
        out.update(mean=round(sum(ordered) / len(ordered), 6), min=ordered[0], max=ordered[-1],
                   median=ordered[len(ordered) // 2], buckets=_buckets(ordered, scale))
        return out


def _buckets(ordered: list[float], scale: list[int] | None) -> list[dict[str, Any]]:
    """Counts per scale point for whole-number scales, else ten equal-width buckets over [min, max]."""
    if scale is not None:
        counts = Counter(int(v) for v in ordered)
        return [{"value": v, "count": counts.get(v, 0)} for v in range(scale[0], scale[1] + 1)]
    lo, hi = ordered[0], ordered[-1]
    if hi == lo:
        return [{"from": lo, "to": hi, "count": len(ordered)}]
    width = (hi - lo) / BUCKETS
    counts = [0] * BUCKETS
    for v in ordered:
        counts[min(BUCKETS - 1, int((v - lo) / width))] += 1
    return [{"from": round(lo + i * width, 6), "to": round(lo + (i + 1) * width, 6), "count": c}
            for i, c in enumerate(counts)]


class ScoreStats:
    """A read-back visitor (pipelines/readback.py) gathering the summary's figures: each scorer's values, the
    intrinsic scores, finish reasons, and which rows failed in which scorer."""

    def __init__(self, scorers: list):
        self.intrinsic = {name: _Stat(False) for name in ("mean_logprob", "perplexity", "num_generated_tokens")}
        self.scores = {s.name: _Stat(s.is_boolean) for s in scorers}
        self.scorer_errors: Counter[str] = Counter()
        self.finish_reasons: Counter[str] = Counter()
        self.other_errors = 0

    def columns(self, part) -> list[str]:
        wanted = ["error", "finish_reason", *self.intrinsic, *(score_column(s) for s in self.scores)]
        return [c for c in wanted if c in part.schema_arrow.names]

    def batch(self, batch) -> None:
        data = batch.to_pydict()
        for error in data.get("error", []):
            if error is None:
                continue
            named = [s for s in self.scores if f"{score_column(s)}:" in error]
            self.scorer_errors.update(named)
            self.other_errors += not named
        self.finish_reasons.update(r for r in data.get("finish_reason", []) if r is not None)
        for column, stat in self.intrinsic.items():
            stat.add(data.get(column, []))
        for scorer, stat in self.scores.items():
            stat.add(data.get(score_column(scorer), []))

    def part_done(self, number: int) -> None:
        pass

    def finish(self, stack) -> None:
        pass


def summarize(run_uri: str, manifest: Manifest | dict[str, Any]) -> dict[str, Any]:
    """Per-scorer figures, intrinsic scores, errors, tokens, throughput and cost of one run, from its parts."""
    manifest = Manifest.model_validate(manifest)
    scorers = read_scorers(manifest.spec.get("scoring", []))
    stats = ScoreStats(scorers)
    read_back(run_uri, [stats])
    return summary_of(stats, scorers, manifest)


def summary_of(stats: ScoreStats, scorers: list, manifest: Manifest | dict[str, Any]) -> dict[str, Any]:
    """`scorers`: the job's scorer specs (pipelines/scorer_specs.py)."""
    manifest = Manifest.model_validate(manifest)
    scores, scorer_errors, other_errors = stats.scores, stats.scorer_errors, stats.other_errors
    intrinsic, finish = stats.intrinsic, stats.finish_reasons
    by_name = {s.name: s for s in scorers}
    tokens = manifest.tokens
    cost = manifest.cost.usd if manifest.cost is not None else None
    return {
        "run_id": manifest.run_id,
        "job": manifest.job,
        "task": manifest.spec.get("task", "generate"),
        "model": manifest.model.source,
        "sampling": manifest.spec["sampling"],
        "status": manifest.status,
        "rows": manifest.rows.model_dump(mode="json"),
        "errors": {"failed_rows": other_errors, "by_scorer": {s: scorer_errors.get(s, 0) for s in scores}},
        "scores": {
            name: {"kind": by_name[name].kind, "type": "boolean" if stat.boolean else "number",
                   **stat.figures(getattr(by_name[name], "scale", None))}
            for name, stat in scores.items()
        },
        "intrinsic": {**{name: stat.figures() for name, stat in intrinsic.items()},
                      "finish_reason": dict(finish)},
        "tokens": tokens.model_dump(mode="json"),
        "wall_seconds": manifest.wall_seconds,
        "output_tokens_per_second": manifest.output_tokens_per_second,
        "cost_usd": cost,
        "cost_per_million_output_tokens_usd": round(cost / tokens.generated * 1e6, 6)
        if cost is not None and tokens.generated else None,
    }


def write_summary(run_uri: str, summary: dict[str, Any]) -> None:
    RunFolder(run_uri).write_json(SUMMARY_NAME, summary, action="write the summary to")


def read_summary(run_uri: str) -> dict[str, Any] | None:
    return RunFolder(run_uri).read_json(SUMMARY_NAME, action="read the summary from")


def summary_uri(run_uri: str) -> str:
    return RunFolder(run_uri).path(SUMMARY_NAME)
