"""`llmbatch plan`: how many replicas, how many GPUs each, how long and how much, from measured throughput."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llmbatch.cluster import model_store, profiles
from llmbatch.cluster.accelerators import ACCELERATORS, Accelerator, accelerator
from llmbatch.cluster.model_facts import facts_for_checkpoint
from llmbatch.cluster.resources import PROMPT_TOKENS_ALLOWANCE, engine_dtype
from llmbatch.cluster.sizing import choose_tensor_parallel, cost_usd, replicas_for_budget, replicas_for_deadline, wall_seconds
from llmbatch.errors import UserError
from llmbatch.jobs.resolve import ResolvedJob, resolve
from llmbatch.jobs.spec import JobSpec

COUNT_ALL_UP_TO = 5000   # rows; above this the input is sampled
SAMPLE_ROWS = 1000
AUTO_MAX_REPLICAS = 64
PLANNED_SEQUENCE_TOKENS = 2048   # the least sequence length a replica is sized for


@dataclass
class TokenEstimate:
    rows: int
    input_tokens: int
    method: str


@dataclass
class Plan:
    model: str
    accelerator: str
    engine: dict[str, Any]
    rows: int
    input_tokens: int
    input_tokens_method: str
    output_tokens: int
    tensor_parallel_size: int
    fit: str
    replicas: int
    devices_total: int
    wall_seconds: float
    device_hours: float
    cost_usd: float
    hourly_usd: float
    profile: dict[str, Any]
    work_seconds: float = 0.0        # replica-seconds of inference
    startup_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    past_errors: list[dict[str, Any]] = field(default_factory=list)
    cluster: dict[str, Any] | None = None   # what the cluster it was fitted to holds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_replicas(self, replicas: int) -> "Plan":
        """The same plan with another replica count (e.g. capped by the cluster)."""
        wall = wall_seconds(self.work_seconds, self.startup_seconds, replicas)
        devices = self.tensor_parallel_size
        return replace(self, replicas=replicas, devices_total=replicas * devices, wall_seconds=round(wall, 1),
                       device_hours=round(wall / 3600 * replicas * devices, 4),
                       cost_usd=round(cost_usd(wall, replicas, devices, self.hourly_usd), 4))


def check_planned_parallelism(spec: JobSpec, plan: Plan) -> None:
    """`replicas: auto` sizes replicas of the planner's tensor parallelism: refuse a job whose replicas span
    fewer devices than its model needs on the device (the engines would fail loading it)."""
    asked = spec.model.engine.tensor_parallel_size
    if plan.tensor_parallel_size > asked:
        raise UserError(f"model.engine.tensor_parallel_size: {asked} x {plan.accelerator} per replica cannot hold "
                        f"{spec.model.source}; it needs {plan.tensor_parallel_size} ({plan.fit}); set "
                        f"model.engine.tensor_parallel_size: {plan.tensor_parallel_size}")


def engine_settings(spec: JobSpec, device: Accelerator, tp: int | None = None) -> dict[str, Any]:
    engine = spec.model.engine
    dtype = engine_dtype(engine.dtype, device.name == "CPU")
    settings = {"dtype": dtype, "max_model_len": engine.max_model_len,
                "tensor_parallel_size": tp or engine.tensor_parallel_size,
                "enable_prefix_caching": engine.enable_prefix_caching}
    if engine.enforce_eager is not None:  # it changes step speed on GPU
        settings["enforce_eager"] = engine.enforce_eager
    return settings


def accelerator_for(spec: JobSpec, name: str | None) -> Accelerator:
    if name:
        return accelerator(name)
    wanted = spec.resources.accelerator_type
    if wanted:
        try:
            return accelerator(wanted)
        except UserError as exc:
            raise UserError(f"resources.accelerator_type: {exc}; or pass --accelerator one of "
                            f"{', '.join(ACCELERATORS)}") from None
    if spec.resources.accelerator == "gpu":
        return ACCELERATORS["A10G"]
    return ACCELERATORS["CPU"]


def count_input_tokens(job: ResolvedJob) -> TokenEstimate:
    """Render and tokenize the input's prompts: all of them when small, an even sample when large."""
    from llmbatch.pipelines.read import iter_shard
    from llmbatch.pipelines.render import RenderStage, RowError

    spec, files = job.spec, job.input.files
    total = job.input.rows or 0
    if spec.input.limit is not None:
        total = min(total, spec.input.limit)
    renderer = RenderStage(str(job.model.path), replace(job.render, max_model_len=None))
    sampled = total > COUNT_ALL_UP_TO
    per_shard = max(1, SAMPLE_ROWS // len(files)) if sampled else None
    counted = tokens = seen = 0
    for f in files:
        taken = 0
        for table in iter_shard(f.uri, f.format):
            for row in table.drop_columns(["_row_number", "_row_error"]).to_pylist():
                if seen >= total or (per_shard is not None and taken >= per_shard):
                    break
                try:
                    tokens += len(renderer.render(row)[1])
                except RowError:
                    pass  # a row that will fail costs no inference
                counted += 1
                taken += 1
                seen += 1
            if seen >= total or (per_shard is not None and taken >= per_shard):
                break
    if not sampled:
        return TokenEstimate(total, tokens, f"counted every row ({total})")
    estimate = int(tokens / max(1, counted) * total)
    return TokenEstimate(total, estimate, f"sampled the first {per_shard} rows of each of {len(files)} shard(s) "
                                          f"({counted} of {total}) and scaled up")


def assumed_rates(params: int, device: Accelerator) -> profiles.Rates:
    """A stated guess when no profile exists: decode speed falls with model size."""
    base = 110.0 if device.name == "CPU" else 2500.0  # tok/s of a ~135M model on this CPU; of a 7B on one GPU
    scale = (1.35e8 if device.name == "CPU" else 7e9) / max(params, 1)
    out = base * min(4.0, max(0.02, scale)) ** 0.5
    return profiles.Rates(output_tokens_per_second=out, input_tokens_per_second=out * 4,
                          requests_per_second=out / 64, startup_seconds=30.0 if device.name == "CPU" else 180.0,
                          mean_input_tokens=0.0, mean_output_tokens=0.0, measurements=0)


def planning_len(job: ResolvedJob) -> int:
    """The sequence length a replica's KV cache must hold several of: the job's max_model_len when it sets one;
    else its rows' own length (an allowance for the prompt plus max_tokens, at least 2048) within the model's
    context, which vLLM may hold at full length but the job's rows never reach."""
    if job.spec.model.engine.max_model_len:
        return job.spec.model.engine.max_model_len
    wanted = max(PLANNED_SEQUENCE_TOKENS, PROMPT_TOKENS_ALLOWANCE + job.max_tokens)
    return min(job.model.max_len or wanted, wanted)


def plan_job(spec: JobSpec, accelerator_name: str | None = None, *, log=None) -> Plan:
    """The plan of a job that resolves: a job `submit` would refuse is refused here too (UserError)."""
    device = accelerator_for(spec, accelerator_name)
    job = resolve(spec, fetch_models=True, fetch_judges=False, without_weights=True, log=log)
    model_path = job.model.path
    facts = facts_for_checkpoint(model_path)
    max_len = planning_len(job)
    dtype = engine_settings(spec, device)["dtype"]
    fit = choose_tensor_parallel(facts, device, max_len, None if dtype == "auto" else dtype)
    notes: list[str] = []
    if fit.tensor_parallel_size is None:
        raise UserError(f"model {spec.model.source} on {device.name}: {fit.reason}")
    tp = max(fit.tensor_parallel_size, spec.model.engine.tensor_parallel_size)
    if device.name == "CPU":
        tp = 1  # a CPU replica is one machine; its memory check is the fit above
    elif tp != spec.model.engine.tensor_parallel_size:
        notes.append(f"model.engine.tensor_parallel_size is {spec.model.engine.tensor_parallel_size}; "
                     f"the model needs {tp} x {device.name} per replica")
    engine = engine_settings(spec, device, tp)
    fingerprint = model_store.fingerprint_of(spec.model.source, model_path)
    key = profiles.profile_key(fingerprint, device.name, engine)
    stored = profiles.load(key)
    rates = profiles.rates(stored)
    if rates is None:
        rates = assumed_rates(facts.parameters, device)
        profile_info = {"used": False, "key": key, "assumed": {
            "output_tokens_per_second": round(rates.output_tokens_per_second, 1),
            "startup_seconds": rates.startup_seconds, "mean_output_tokens": "max_tokens"}}
        notes.append(f"no profile for this model on {device.name}: rates are assumed; "
                     f"run `llmbatch profile {spec.model.source}` for a measured plan")
    else:
        profile_info = {"used": True, "key": key, "measurements": rates.measurements,
                        "output_tokens_per_second": round(rates.output_tokens_per_second, 2),
                        "input_tokens_per_second": round(rates.input_tokens_per_second, 2),
                        "prefill_tokens_per_second": _rounded(rates.prefill_tokens_per_second),
                        "decode_tokens_per_second": _rounded(rates.decode_tokens_per_second),
                        "requests_per_second": round(rates.requests_per_second, 3),
                        "startup_seconds": round(rates.startup_seconds, 1),
                        "mean_input_tokens": round(rates.mean_input_tokens, 1),
                        "mean_output_tokens": round(rates.mean_output_tokens, 1)}

    estimate = count_input_tokens(job)
    per_row_out = min(rates.mean_output_tokens or spec.sampling.max_tokens, spec.sampling.max_tokens)
    output_tokens = int(estimate.rows * per_row_out)
    work = rates.replica_seconds(estimate.input_tokens, output_tokens)
    replicas = _choose_replicas(spec, work, rates.startup_seconds, tp, device, notes)
    wall = wall_seconds(work, rates.startup_seconds, replicas)
    return Plan(
        model=spec.model.source, accelerator=device.name, engine=engine, rows=estimate.rows,
        input_tokens=estimate.input_tokens, input_tokens_method=estimate.method, output_tokens=output_tokens,
        tensor_parallel_size=tp, fit=fit.reason, replicas=replicas, devices_total=replicas * tp,
        wall_seconds=round(wall, 1), device_hours=round(wall / 3600 * replicas * tp, 4),
        cost_usd=round(cost_usd(wall, replicas, tp, device.hourly_usd), 4), hourly_usd=device.hourly_usd,
        profile=profile_info, work_seconds=round(work, 2), startup_seconds=round(rates.startup_seconds, 2),
        notes=notes, past_errors=profiles.prediction_errors(stored)[-5:],
    )


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def _choose_replicas(spec: JobSpec, work: float, startup: float, tp: int, device: Accelerator,
                     notes: list[str]) -> int:
    resources = spec.resources
    if resources.replicas != "auto":
        return resources.replica_range[1]
    most = resources.max_replicas or AUTO_MAX_REPLICAS
    choice = 1
    if resources.deadline_seconds is not None:
        needed = replicas_for_deadline(work, startup, resources.deadline_seconds)
        if needed is None:
            choice = min(most, max(1, math.ceil(work / max(startup, 1.0))))
            notes.append(f"resources.deadline {resources.deadline} cannot be met: start-up alone takes "
                         f"{startup:.0f} s; {choice} replica(s) finish in about "
                         f"{wall_seconds(work, startup, choice):.0f} s")
        elif needed > most:
            notes.append(f"resources.deadline {resources.deadline} needs {needed} replicas; capped at {most} "
                         f"(raise resources.max_replicas to {needed} to meet it)")
            choice = most
        else:
            choice = needed
    if resources.budget is not None:
        affordable = replicas_for_budget(work, startup, tp, device.hourly_usd, resources.budget, most)
        if affordable is None:
            cheapest = cost_usd(wall_seconds(work, startup, 1), 1, tp, device.hourly_usd)
            notes.append(f"resources.budget ${resources.budget:g} is below the cheapest run "
                         f"(${cheapest:.2f} with 1 replica)")
            choice = 1
        elif resources.deadline_seconds is None:
            choice = affordable
        elif affordable < choice:
            notes.append(f"resources.budget ${resources.budget:g} allows {affordable} replicas, fewer than the "
                         "deadline needs")
            choice = affordable
    if resources.deadline_seconds is None and resources.budget is None:
        choice = min(most, max(1, math.ceil(work / 3600)))  # about an hour of work per replica
    return max(1, min(choice, most))


def plan_for(spec: JobSpec, accelerator_name: str | None, address: str | None, *, log=None) -> Plan:
    """The job's plan, fitted to the cluster at `address` when there is one."""
    plan = plan_job(spec, accelerator_name, log=log)
    if address is None:
        return plan
    from llmbatch.cluster.jobs_api import cluster_nodes

    return fit_to_cluster(plan, spec, address, cluster_nodes(address))


def fit_to_cluster(plan: Plan, spec: JobSpec, address: str, nodes: list[dict[str, float]]) -> Plan:
    """Cap the plan by what the cluster at `address` holds at once, and say so."""
    from llmbatch.cluster.resources import can_host, replica_capacity, replica_shape

    shape = replica_shape("cpu" if plan.accelerator == "CPU" else "gpu", plan.tensor_parallel_size)
    hosts = [n for n in nodes if can_host(shape, n, spec.resources.accelerator_type)]
    totals: dict[str, float] = {}
    for node in nodes:  # as `submit` counts them
        for key, amount in node.items():
            totals[key] = totals.get(key, 0.0) + amount
    capacity = replica_capacity(shape, totals) if hosts else 0
    info = {"address": address, "nodes": len(nodes), "nodes_that_can_host": len(hosts),
            "cpus": totals.get("CPU", 0.0), "gpus": totals.get("GPU", 0.0), "replica_capacity": capacity}
    notes = list(plan.notes)
    fitted = plan
    if capacity < 1:
        notes.append(f"the cluster at {address} cannot hold one replica ({plan.tensor_parallel_size} x "
                     f"{plan.accelerator} on one node); the run would be refused")
    elif plan.replicas > capacity:
        if spec.resources.replicas == "auto":
            fitted = plan.for_replicas(capacity)
            notes.append(f"capped at {capacity} replica(s): what the cluster at {address} holds at once "
                         f"(planned {plan.replicas})")
        elif spec.resources.replica_range[0] > capacity:
            notes.append(f"resources.replicas needs at least {spec.resources.replica_range[0]}, more than the "
                         f"cluster at {address} holds at once ({capacity}); the run would be refused")
        else:
            fitted = plan.for_replicas(capacity)
            notes.append(f"the pool grows to {capacity} replica(s) here, what the cluster at {address} holds at once "
                         f"(resources.replicas allows {plan.replicas})")
    return replace(fitted, notes=notes, cluster=info)


def render_plan(plan: Plan) -> str:
    hours, rest = divmod(int(plan.wall_seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    wall = f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
    lines = [
        f"plan for {plan.model} on {plan.accelerator}",
        f"  rows               {plan.rows}",
        f"  input tokens       {plan.input_tokens}  ({plan.input_tokens_method})",
        f"  output tokens      {plan.output_tokens}  (estimated)",
        f"  per replica        {plan.tensor_parallel_size} x {plan.accelerator}  ({plan.fit})",
        f"  replicas           {plan.replicas}",
        f"  devices in total   {plan.devices_total}",
        f"  estimated wall     {wall}  ({plan.wall_seconds:.0f} s)",
        f"  device-hours       {plan.device_hours:.3f}",
        f"  estimated cost     ${plan.cost_usd:.2f}  (at ${plan.hourly_usd:.2f} per device-hour)",
    ]
    p = plan.profile
    if p["used"]:
        lines.append(f"  profile            {p['key']}: {p['output_tokens_per_second']} output tok/s per replica, "
                     f"start-up {p['startup_seconds']} s, mean output {p['mean_output_tokens']} tokens "
                     f"({p['measurements']} measurement(s))")
        if p.get("prefill_tokens_per_second"):
            lines.append(f"  prefill / decode   {p['prefill_tokens_per_second']} prompt tok/s, "
                         f"{p['decode_tokens_per_second']} output tok/s per replica (measured apart)")
    else:
        lines.append(f"  profile            none; assumed {p['assumed']['output_tokens_per_second']} output tok/s "
                     f"per replica and {p['assumed']['startup_seconds']:.0f} s start-up")
    if plan.cluster:
        c = plan.cluster
        lines.append(f"  cluster            {c['address']}: {c['nodes']} node(s), {c['cpus']:g} CPUs, {c['gpus']:g} GPUs; "
                     f"holds {c['replica_capacity']} replica(s) of this shape")
    for e in plan.past_errors:
        lines.append(f"  past prediction    run {e['run_id']}: predicted {e['predicted_wall_seconds']:.0f} s, "
                     f"measured {e['measured_wall_seconds']:.0f} s ({e['error'] * 100:+.0f}%)")
    for note in plan.notes:
        lines.append(f"  note               {note}")
    return "\n".join(lines)
