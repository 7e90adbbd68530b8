"""`llmbatch plan --accelerators A,B,C`: the job planned on several devices, side by side, the cheapest marked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmbatch.cluster.accelerators import accelerator, price_of
from llmbatch.cluster.throughput_model import DoesNotFit
from llmbatch.errors import UserError
from llmbatch.jobs.plan import Plan, PlanBasis, PlanRefused, fit_to_cluster, plan_basis, plan_on, wall_text
from llmbatch.jobs.spec import JobSpec


@dataclass
class DeviceOption:
    accelerator: str
    plan: Plan | None             # None: the model fits no replica of this device
    refused: str = ""             # why, when it does not fit
    meets_deadline: bool | None = None    # None: the job sets no deadline
    cheapest: bool = False        # the cheapest that meets the deadline, else the cheapest

    @property
    def usd_per_million_output_tokens(self) -> float | None:
        return self.plan.usd_per_million_output_tokens if self.plan is not None else None

    def to_dict(self) -> dict[str, Any]:
        if self.plan is None:
            return {"accelerator": self.accelerator, "fits": False, "reason": self.refused}
        per_million = self.usd_per_million_output_tokens
        return {**self.plan.to_dict(), "fits": True, "meets_deadline": self.meets_deadline,
                "usd_per_million_output_tokens": round(per_million, 4) if per_million is not None else None,
                "cheapest": self.cheapest}


def device_names(text: str) -> list[str]:
    """The devices a comma-separated list names, each once, in its order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError("--accelerators: name at least one accelerator, e.g. L4,A100-80GB,H100")
    devices: list[str] = []
    for name in names:
        try:
            found = accelerator(name).name
        except UserError as exc:
            raise UserError(f"--accelerators: {exc}") from None
        if found not in devices:
            devices.append(found)
    return devices


def compare_devices(spec: JobSpec, names: list[str], *, prices: str | None = None, address: str | None = None,
                    log=None) -> list[DeviceOption]:
    """The job planned on each device (its input counted once), fitted to the cluster at `address` when given."""
    devices = [accelerator(name) for name in names]
    priced = [(device, price_of(device, prices)) for device in devices]
    basis: PlanBasis = plan_basis(spec, log)
    nodes = None
    if address is not None:
        from llmbatch.cluster.jobs_api import cluster_nodes

        nodes = cluster_nodes(address)
    options = []
    deadline = spec.resources.deadline_seconds
    for device, price in priced:
        try:
            plan = plan_on(basis, device, price)
        except DoesNotFit as exc:
            options.append(DeviceOption(device.name, None, str(exc)))
            continue
        if nodes is not None:
            plan = fit_to_cluster(plan, spec, address, nodes)
        meets = None if deadline is None else plan.wall_seconds <= round(deadline, 1)
        options.append(DeviceOption(device.name, plan, meets_deadline=meets))
    fitting = [o for o in options if o.plan is not None]
    if not fitting:
        raise UserError(f"model {spec.model.source} fits none of {', '.join(names)}",
                        lines=[o.refused for o in options])
    runnable = [o for o in fitting if not o.plan.problems] or fitting
    candidates = [o for o in runnable if o.meets_deadline is not False] or runnable
    min(candidates, key=lambda o: o.plan.cost_usd).cheapest = True
    return options


def refuse_if_chosen_is_blocked(options: list[DeviceOption]) -> None:
    """Exit 1 (after the table was shown) when the marked device's plan has problems: it is marked first among
    those without problems, so then no device runs the job as written within its targets."""
    chosen = next(o for o in options if o.cheapest)
    if chosen.plan.problems:
        raise PlanRefused(f"the cheapest choice, {chosen.accelerator}, cannot run the job as written, or misses "
                          "its deadline or budget", problems=[f"{chosen.accelerator}: {p}" for p in chosen.plan.problems])


def render_comparison(spec: JobSpec, options: list[DeviceOption]) -> str:
    """The plans as a table (the marked row starts with *), then each device's rates and problems."""
    first = next(o.plan for o in options if o.plan is not None)
    deadline = spec.resources.deadline
    rows = [("accelerator", "per replica", "replicas", "wall", "device-hours", "cost", "$/1M output",
             f"meets {deadline}" if deadline else "deadline")]
    for o in options:
        p = o.plan
        if p is None:
            rows.append((o.accelerator, "does not fit", "", "", "", "", "", ""))
            continue
        meets = "-" if o.meets_deadline is None else ("yes" if o.meets_deadline else "no")
        rows.append((o.accelerator, f"{p.tensor_parallel_size} x {p.accelerator}", str(p.replicas),
                     wall_text(p.wall_seconds), f"{p.device_hours:.3f}", f"${p.cost_usd:.2f}",
                     f"${o.usd_per_million_output_tokens:.3f}", meets))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    marks = ["  "] + ["* " if o.cheapest else "  " for o in options]
    lines = [f"plan for {first.model} on {len(options)} accelerators",
             f"  rows {first.rows}; input tokens {first.input_tokens} ({first.input_tokens_method}); output tokens "
             f"{first.output_tokens} ({first.output_tokens_method})", ""]
    lines += [mark + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for mark, row in zip(marks, rows)]
    conditions = (["runs the job as written"] if any(o.plan and o.plan.problems for o in options) else []) \
        + (["meets the deadline"] if any(o.meets_deadline for o in options) else [])
    why = "the cheapest" + (" that " + " and ".join(conditions) if conditions else "")
    lines += [f"* {why}", "", "rates per replica:"]
    for o in options:
        if o.plan is None:
            lines.append(f"  {o.accelerator}: {o.refused}")
            continue
        p = o.plan.profile
        lines.append(f"  {o.accelerator}: " + (
            f"profile {p['key']} ({p['measurements']} measurement(s)): {p['output_tokens_per_second']} output tok/s"
            if p["used"] else f"throughput model: {p['model']['summary']}"))
    problems = [f"  {o.accelerator}: {problem}" for o in options if o.plan for problem in o.plan.problems]
    return "\n".join(lines + (["", "problems:"] + problems if problems else []))
