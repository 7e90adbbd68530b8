"""`llmbatch compare RUN_PATH ...`: runs side by side on quality, speed and cost (markdown + HTML charts)."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbatch.errors import UserError
from llmbatch.jobs.results import load_run
from llmbatch.run_manifest import Rows

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


@dataclass(frozen=True)
class RunPoint:
    run_id: str
    path: str
    model: str
    sampling: str
    quality: float | None
    output_tok_s: float | None
    cost_per_million: float | None
    rows: Rows
    wall_seconds: float

    @property
    def label(self) -> str:
        return f"{self.model} · {self.run_id}"


def quality_of(summary: dict[str, Any], metric: str) -> float | None:
    if metric == "mean_logprob":
        return summary["intrinsic"]["mean_logprob"].get("mean")
    figures = summary["scores"].get(metric)
    if figures is None:
        return None
    return figures.get("pass_rate") if figures["type"] == "boolean" else figures.get("mean")


def choose_metric(summaries: list[dict[str, Any]], wanted: str | None) -> str:
    """The quality axis: the asked-for scorer, else the first scorer every run has, else mean logprob."""
    if wanted:
        name = wanted.removeprefix("score_")
        missing = [s["run_id"] for s in summaries if name != "mean_logprob" and name not in s["scores"]]
        if missing:
            raise UserError(f"--quality: run(s) {', '.join(missing)} have no scorer '{name}'")
        return name
    common = [n for n in summaries[0]["scores"] if all(n in s["scores"] for s in summaries)]
    return common[0] if common else "mean_logprob"


def _sampling(spec_sampling: dict[str, Any]) -> str:
    keys = ("temperature", "top_p", "top_k", "max_tokens", "seed")
    return ", ".join(f"{k}={spec_sampling[k]}" for k in keys if spec_sampling.get(k) is not None)


def collect(run_paths: list[str], wanted: str | None) -> tuple[str, list[RunPoint]]:
    loaded = [(path, *load_run(path)) for path in run_paths]
    metric = choose_metric([summary for _, _, summary in loaded], wanted)
    points = [RunPoint(
        run_id=manifest.run_id, path=path, model=manifest.model.source,
        sampling=_sampling(manifest.spec["sampling"]), quality=quality_of(summary, metric),
        output_tok_s=manifest.output_tokens_per_second,
        cost_per_million=summary.get("cost_per_million_output_tokens_usd"),
        rows=manifest.rows, wall_seconds=manifest.wall_seconds,
    ) for path, manifest, summary in loaded]
    return metric, points


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def md_cell(value: Any) -> str:
    """Run data as literal text in a Markdown table cell: no markup, no HTML, no line or cell breaks."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def render_markdown(metric: str, points: list[RunPoint]) -> str:
    lines = [
        "# llmbatch model comparison", "",
        f"Quality axis: {md_cell(metric)} (higher is better). Output tok/s counts the generation only (judge passes "
        "excluded); cost is each run's device time at the planner's prices.", "",
        f"| run | model | sampling | {md_cell(metric)} | output tok/s | USD per 1M output tokens | rows ok / error | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(f"| {md_cell(p.run_id)} | {md_cell(p.model)} | {md_cell(p.sampling)} | {_fmt(p.quality)} | {_fmt(p.output_tok_s, 1)} | "
                     f"{_fmt(p.cost_per_million, 2)} | {p.rows.ok} / {p.rows.error} | {p.wall_seconds:.1f} |")
    ranked = sorted((p for p in points if p.quality is not None), key=lambda p: p.quality, reverse=True)
    if ranked:
        lines += ["", f"Best on {md_cell(metric)}: **{md_cell(ranked[0].label)}**."]
    return "\n".join(lines) + "\n"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.15 or max(abs(hi) * 0.1, 1e-3)
    return lo - pad, hi + pad


def scatter_svg(title: str, x_label: str, y_label: str, points: list[tuple[str, float, float, str]]) -> str:
    """A scatter chart as inline SVG: one labelled dot per (label, x, y, colour)."""
    width, height, left, right, top, bottom = 620, 380, 70, 20, 40, 55
    if not points:
        return (f'<svg class="chart" width="{width}" height="80" role="img"><text x="10" y="40">{html.escape(title)}: '
                f'no run has both figures</text></svg>')
    x0, x1 = _span([p[1] for p in points])
    y0, y1 = _span([p[2] for p in points])

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
             f'{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             f'fill="#fafafa" stroke="#999"/>']
    for x in _ticks(x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle" font-size="11">{x:.3g}</text>')
    for y in _ticks(y0, y1):
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.3g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle" font-size="12">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 16 {(top + height - bottom) / 2})">{html.escape(y_label)}</text>')
    for label, x, y, colour in points:
        parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="8" fill="{colour}" '
                     f'stroke="#000"><title>{html.escape(label)}: {x:.4g}, {y:.4g}</title></circle>')
        right_half = sx(x) > (left + width - right) / 2
        anchor, dx = ("end", -11) if right_half else ("start", 11)
        parts.append(f'<text x="{sx(x) + dx:.1f}" y="{sy(y) - 9:.1f}" text-anchor="{anchor}" font-size="11">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(metric: str, points: list[RunPoint]) -> str:
    coloured = [(p, PALETTE[i % len(PALETTE)]) for i, p in enumerate(points)]
    speed = [(p.label, p.output_tok_s, p.quality, c) for p, c in coloured
             if p.output_tok_s is not None and p.quality is not None]
    cost = [(p.label, p.cost_per_million, p.quality, c) for p, c in coloured
            if p.cost_per_million is not None and p.quality is not None]
    rows = "\n".join(
        f"<tr><td>{html.escape(p.run_id)}</td><td>{html.escape(p.model)}</td>"
        f"<td>{html.escape(p.sampling)}</td><td>{_fmt(p.quality)}</td><td>{_fmt(p.output_tok_s, 1)}</td>"
        f"<td>{_fmt(p.cost_per_million, 2)}</td><td>{p.rows.ok} / {p.rows.error}</td>"
        f"<td>{p.wall_seconds:.1f}</td></tr>" for p in points)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmbatch model comparison</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} .charts{{display:flex;flex-wrap:wrap;gap:1em}}</style>
</head><body>
<h1>Which open model should we run?</h1>
<p>Quality axis: <code>{html.escape(metric)}</code> (higher is better). One point per run. Output tokens per
second count the generation only (judge passes excluded); cost is each run's device time at the planner's prices.</p>
<div class="charts">
{scatter_svg(f"{metric} vs output tokens/s", "output tokens per second", metric, speed)}
{scatter_svg(f"{metric} vs cost", "USD per 1M output tokens", metric, cost)}
</div>
<table><thead><tr><th>run</th><th>model</th><th>sampling</th><th>{html.escape(metric)}</th><th>output tok/s</th>
<th>USD per 1M output tokens</th><th>rows ok / error</th><th>wall s</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""


def write_report(run_paths: list[str], out_dir: str, quality: str | None) -> tuple[Path, Path]:
    if len(run_paths) < 1:
        raise UserError("compare: give at least one run path")
    metric, points = collect(run_paths, quality)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown, page = out / "compare.md", out / "compare.html"
    markdown.write_text(render_markdown(metric, points), encoding="utf-8")
    page.write_text(render_html(metric, points), encoding="utf-8")
    return markdown, page
