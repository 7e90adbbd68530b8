"""A job planned at full size: its whole input (input.limit removed), or a given row count, on one accelerator."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from llmbatch.cluster.accelerators import accelerator
from llmbatch.errors import UserError
from llmbatch.jobs import plan as planner
from llmbatch.jobs.plan import Plan, budget_problem, deadline_problem, parallelism_problem
from llmbatch.jobs.spec import JobSpec
from llmbatch.redact import strip_url_credentials

DEFAULT_ACCELERATOR = "H100"


@dataclass(frozen=True)
class Projection:
    """One model's plan at full size, or why it has none."""
    model: str
    accelerator: str
    plan: Plan | None = None
    error: str | None = None

    @property
    def measured(self) -> bool:
        """Whether the plan's rates come from a measured profile (else from the throughput model)."""
        return bool(self.plan and self.plan.profile.get("used"))

    @property
    def usd_per_million_output_tokens(self) -> float | None:
        return self.plan.usd_per_million_output_tokens if self.plan is not None else None

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"model": self.model, "accelerator": self.accelerator, "error": self.error}
        if self.plan is None:
            return found
        plan = self.plan
        per_million = self.usd_per_million_output_tokens
        return {**found, "rows": plan.rows, "replicas": plan.replicas,
                "tensor_parallel_size": plan.tensor_parallel_size, "devices_total": plan.devices_total,
                "wall_seconds": plan.wall_seconds, "cost_usd": plan.cost_usd,
                "usd_per_million_output_tokens": None if per_million is None else round(per_million, 4),
                "rates": "profile" if self.measured else "throughput model",
                "profile_measurements": plan.profile.get("measurements") if self.measured else 0,
                "problems": list(plan.problems), "notes": list(plan.notes)}


def projection_accelerator(spec: JobSpec, name: str | None) -> str:
    """The device to project to: `name` (--project-to), else resources.accelerator_type, else H100."""
    if name:
        chosen, where = name, "--project-to"
    elif spec.resources.accelerator_type:
        chosen, where = spec.resources.accelerator_type, "resources.accelerator_type"
    else:
        chosen, where = DEFAULT_ACCELERATOR, "--project-to"
    try:
        return accelerator(chosen).name
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def without_limit(spec: JobSpec) -> JobSpec:
    return spec.model_copy(update={"input": spec.input.model_copy(update={"limit": None})})


def project(spec: JobSpec, accelerator_name: str, rows: int | None = None, *, log=None) -> Projection:
    """The plan of `spec` over its whole input, or over `rows` rows, on `accelerator_name`; a model the planner
    cannot plan (one that fits no replica of the device, say) gets the planner's reason instead."""
    try:
        full = without_limit(spec)
        plan = planner.plan_job(full, accelerator_name, log=log)
        if rows is not None:
            plan = at_rows(plan, full, rows)
    except Exception as exc:  # one model's plan failing leaves the others' projections
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return Projection(spec.model.source, accelerator_name, error=strip_url_credentials(reason))
    return Projection(spec.model.source, plan.accelerator, plan)


def at_rows(plan: Plan, spec: JobSpec, rows: int) -> Plan:
    """`plan` (which counts the rows of the input itself) for `rows` rows: tokens and work in proportion, the
    replicas chosen again the way the planner chooses them, the deadline and budget checked again."""
    if plan.rows < 1:
        raise UserError("--rows: the input has no rows to scale the plan from")
    factor = rows / plan.rows
    work = plan.work_seconds * factor
    choice = planner._choose_replicas(spec, work, plan.startup_seconds, plan.tensor_parallel_size, plan.hourly_usd)
    scaled_from = f"scaled from {plan.rows} to {rows} rows"
    scaled = replace(
        plan, rows=rows, input_tokens=round(plan.input_tokens * factor),
        input_tokens_method=f"{plan.input_tokens_method}; {scaled_from}",
        output_tokens=round(plan.output_tokens * factor),
        output_tokens_method=f"{plan.output_tokens_method}; {scaled_from}",
        work_seconds=round(work, 2), replicas_reason=choice.reason,
    ).for_replicas(choice.replicas)
    problems = [parallelism_problem(spec, scaled), deadline_problem(spec, scaled, choice.deadline_limit),
                budget_problem(spec, scaled)]
    return replace(scaled, problems=[p for p in problems if p])
