"""The one-screen summary printed when a run ends."""
from __future__ import annotations

from typing import Any

from llmbatch.pipelines.run_files import MANIFEST_NAME
from llmbatch.pipelines.timings import startup_line
from llmbatch.run_manifest import Manifest


def render_summary(manifest: Manifest | dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    manifest = Manifest.model_validate(manifest)
    rows, tokens, engine, cost = manifest.rows, manifest.tokens, manifest.engine, manifest.cost
    replicas = engine.replicas
    pool = f"{replicas[0]}-{replicas[1]}" if isinstance(replicas, list) else str(replicas)
    output = manifest.output.path
    lines = [
        "",
        f"run {manifest.run_id}: {manifest.status}",
        f"  model        {manifest.model.source}  ({pool} x {engine.accelerator} replica)",
        f"  rows         {rows.in_} in, {rows.ok} ok, {rows.error} error",
        f"  tokens       {tokens.input} input, {tokens.generated} generated",
        f"  throughput   {manifest.output_tokens_per_second or 0:.1f} output tok/s",
        f"  wall time    {manifest.wall_seconds:.1f} s",
        *([f"  time         {line}"] if (line := startup_line(manifest.timings)) else []),
        f"  output       {output}",
        f"  manifest     {output.rstrip('/')}/{MANIFEST_NAME}",
    ]
    cache = manifest.cache
    if cache:
        shown = (f"{cache.hits} of {rows.in_} rows reused ({cache.hit_rate:.1%}), {cache.entries_written} added"
                 if cache.used else f"not used: {cache.reason}")
        lines.insert(-3, f"  cache        {shown}")
    if manifest.resumed:
        lines.insert(-3, f"  resumed      {manifest.resumed.rows_skipped} rows kept from the earlier attempt")
    if cost is not None:
        lines.insert(-2, f"  cost         ${cost.usd:.4f}  ({cost.devices} x {cost.device} "
                         f"at ${cost.hourly_usd_per_device:.2f}/h)")
    errors = manifest.errors
    if errors and errors.rows:
        kinds = ", ".join(f"{k.kind} ({k.rows})" for k in errors.kinds[:3])
        lines.append(f"  error rows   {output.rstrip('/')}/{errors.path}: {kinds}")
    if manifest.problems:
        lines.append("  problems     " + "; ".join(manifest.problems))
    if summary:
        lines.extend(render_scores(summary))
    return "\n".join(lines)


def render_scores(summary: dict[str, Any]) -> list[str]:
    """One line per scorer, plus the intrinsic scores."""
    lines = []
    intrinsic = summary.get("intrinsic", {})
    mean_lp, ppl = intrinsic.get("mean_logprob", {}), intrinsic.get("perplexity", {})
    if mean_lp.get("mean") is not None:
        lines.append(f"  logprob      mean {mean_lp['mean']:.3f} per token, median perplexity {ppl.get('median', 0):.2f}")
    for name, figures in summary.get("scores", {}).items():
        errors = summary["errors"]["by_scorer"].get(name, 0)
        tail = f", {errors} could not be scored" if errors else ""
        if figures["type"] == "boolean":
            rate = figures.get("pass_rate")
            shown = f"{rate:.1%} pass ({figures.get('passed', 0)} of {figures['scored']})" if rate is not None \
                else "nothing scored"
        elif figures.get("mean") is not None:
            shown = (f"mean {figures['mean']:.3f} (min {figures['min']:g}, median {figures['median']:g}, "
                     f"max {figures['max']:g}; {figures['scored']} scored)")
        else:
            shown = "nothing scored"
        lines.append(f"    {'score_' + name:<22} {shown}{tail}  [{figures['kind']}]")
    if summary.get("scores"):
        lines.insert(1 if mean_lp.get("mean") is not None else 0, "  scores")
    return lines
