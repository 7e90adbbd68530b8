"""A sweep's report: `compare`'s report of the runs that succeeded, the runs that failed, and each model's
plan at full size."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbatch.errors import UserError
from llmbatch.jobs.compare import md_cell as cell
from llmbatch.jobs.compare import write_report
from llmbatch.jobs.full_size import Projection

NOT_PLANNED = "–"


@dataclass(frozen=True)
class SweepReport:
    markdown: Path
    html: Path | None         # none when no run could be compared

    def to_dict(self) -> dict[str, Any]:
        return {"markdown": str(self.markdown), "html": str(self.html) if self.html else None}


def write_sweep_report(outcomes: list, projections: list[Projection], out: Path, quality: str | None, *,
                       rows: int | None = None) -> SweepReport:
    """compare.md and compare.html of the runs that succeeded, compare.md with the failed runs and the
    projections added."""
    compared = [outcome.run_uri for outcome in outcomes if outcome.succeeded]
    markdown, page, text = out / "compare.md", None, None
    if compared:
        try:
            markdown, page = write_report(compared, str(out), quality)
            text = markdown.read_text(encoding="utf-8")
        except UserError as exc:
            text = f"# llmbatch model comparison\n\nThe runs could not be compared: {cell(exc)}\n"
    else:
        text = "# llmbatch model comparison\n\nNo model's run succeeded, so there is nothing to compare.\n"
    out.mkdir(parents=True, exist_ok=True)
    failed = [outcome for outcome in outcomes if not outcome.succeeded]
    sections = [text.rstrip("\n")]
    if failed:
        sections.append(render_failures(failed))
    sections.append(render_projections(projections, rows))
    markdown.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return SweepReport(markdown, page)


def render_failures(failed: list) -> str:
    lines = ["## Runs that failed", "", "| model | run | why |", "|---|---|---|"]
    lines += [f"| {cell(o.model)} | {cell(o.run_id)} | {cell(o.error or o.status)} |" for o in failed]
    return "\n".join(lines)


def render_projections(projections: list[Projection], rows: int | None) -> str:
    size = f"{rows} rows (--rows)" if rows is not None else "the whole input (input.limit removed)"
    lines = [
        "## Projected at full size", "",
        f"Each model's plan (`llmbatch plan`) for {size}. The rates are the model's measured profile on that "
        "accelerator when one exists (every finished run adds to the profile of the device it ran on), else "
        "the throughput model's estimate.", "",
        "| model | accelerator | rows | replicas | wall | cost | USD per 1M output tokens | rates from |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    problems = []
    for projection in projections:
        plan = projection.plan
        if plan is None:
            blanks = " | ".join([NOT_PLANNED] * 5)
            lines.append(f"| {cell(projection.model)} | {cell(projection.accelerator)} | {blanks} | "
                         f"not planned: {cell(projection.error)} |")
            continue
        per_million = projection.usd_per_million_output_tokens
        replicas = str(plan.replicas) if plan.tensor_parallel_size == 1 else \
            f"{plan.replicas} x {plan.tensor_parallel_size} devices"
        lines.append(f"| {cell(projection.model)} | {cell(plan.accelerator)} | {plan.rows} | {replicas} | "
                     f"{duration(plan.wall_seconds)} | {dollars(plan.cost_usd)} | "
                     f"{NOT_PLANNED if per_million is None else f'{per_million:.2f}'} | {rates_from(projection)} |")
        problems += [f"- {cell(projection.model)}: {cell(problem)}" for problem in plan.problems]
    if problems:
        lines += ["", "What the plans find wrong with the job as written:", "", *problems]
    return "\n".join(lines)


def rates_from(projection: Projection) -> str:
    plan = projection.plan
    if projection.measured:
        count = plan.profile.get("measurements")
        return f"measured profile ({count} measurement{'s' * (count != 1)})" if count else "measured profile"
    return f"throughput model (no profile on {cell(plan.accelerator)})"


def duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def dollars(usd: float) -> str:
    return f"${usd:.2f}" if usd >= 0.1 else f"${usd:.4f}"
