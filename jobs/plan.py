"""`llmbatch plan`: how many replicas, how many GPUs each, how long and how much, from measured throughput (a
profile), else from the throughput model (cluster/throughput_model.py)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llmbatch.cluster import model_store, profiles, throughput_model
from llmbatch.cluster.accelerators import (
    DEFAULT_PRICE_SOURCE, GENERIC, Accelerator, Price, accelerator, price_of,
)
from llmbatch.cluster.model_facts import ModelFacts, facts_for_checkpoint
from llmbatch.cluster.resources import PROMPT_TOKENS_ALLOWANCE, engine_dtype
from llmbatch.cluster.sizing import choose_tensor_parallel, cost_usd, replicas_for_budget, replicas_for_deadline, wall_seconds
from llmbatch.errors import JobFailed, UserError
from llmbatch.jobs.resolve import ResolvedJob, fetched_without_building, model_here, resolve
from llmbatch.jobs.spec import JobSpec

COUNT_ALL_UP_TO = 5000   # rows; above this the input is sampled
SAMPLE_ROWS = 1000
AUTO_MAX_REPLICAS = 64
PLANNED_SEQUENCE_TOKENS = 2048   # the least sequence length a replica is sized for
CHARACTERS_PER_TOKEN = 4         # prompt characters per token where no tokenizer counts them (English text)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tokenizer.tiktoken", "vocab.json",
                   "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


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
    output_tokens_method: str = ""
    price_source: str = DEFAULT_PRICE_SOURCE
    replicas_reason: str = ""
    problems: list[str] = field(default_factory=list)   # why the job cannot run as written, or misses its targets
    notes: list[str] = field(default_factory=list)
    past_errors: list[dict[str, Any]] = field(default_factory=list)
    cluster: dict[str, Any] | None = None   # what the cluster it was fitted to holds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def usd_per_million_output_tokens(self) -> float | None:
        return self.cost_usd / self.output_tokens * 1e6 if self.output_tokens else None

    def for_replicas(self, replicas: int) -> "Plan":
        """The same plan with another replica count (e.g. capped by the cluster)."""
        wall = wall_seconds(self.work_seconds, self.startup_seconds, replicas)
        devices = self.tensor_parallel_size
        return replace(self, replicas=replicas, devices_total=replicas * devices, wall_seconds=round(wall, 1),
                       device_hours=round(wall / 3600 * replicas * devices, 4),
                       cost_usd=round(cost_usd(wall, replicas, devices, self.hourly_usd), 4))


class PlanRefused(JobFailed):
    """The plan shows that the job cannot run as written, or misses its deadline or budget (exit 1)."""


def parallelism_problem(spec: JobSpec, plan: Plan) -> str | None:
    """Replicas that span fewer devices than the model needs on the device: its engines would fail loading it."""
    asked = spec.model.engine.tensor_parallel_size
    if plan.tensor_parallel_size <= asked:
        return None
    return (f"model.engine.tensor_parallel_size: {asked} x {plan.accelerator} per replica cannot hold "
            f"{spec.model.source}; it needs {plan.tensor_parallel_size} ({plan.fit}); set "
            f"model.engine.tensor_parallel_size: {plan.tensor_parallel_size}")


def check_planned_parallelism(spec: JobSpec, plan: Plan) -> None:
    """`replicas: auto` sizes replicas of the planner's tensor parallelism: refuse a job whose replicas span
    fewer devices than its model needs on the device."""
    problem = parallelism_problem(spec, plan)
    if problem:
        raise UserError(problem)


def refuse_if_blocked(plan: Plan) -> None:
    """Exit 1 (after the plan was shown) when the plan found problems."""
    if plan.problems:
        raise PlanRefused("the job cannot run as written, or misses its deadline or budget",
                          problems=plan.problems)


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
    """--accelerator, else the pinned resources.accelerator_type, else the device resources.accelerator means."""
    if name:
        return _named_accelerator(name, "--accelerator")
    wanted = spec.resources.accelerator_type
    if wanted and wanted.lower() in GENERIC:
        raise UserError(f"resources.accelerator_type: '{wanted}' names no GPU type; name one (H100, A10G, ...), "
                        f"or leave it out and set resources.accelerator: {wanted.lower()}")
    if wanted:
        return _named_accelerator(wanted, "resources.accelerator_type")
    return accelerator("gpu" if spec.resources.accelerator == "gpu" else "cpu")


def _named_accelerator(name: str, where: str) -> Accelerator:
    try:
        return accelerator(name)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def count_input_tokens(job: ResolvedJob) -> TokenEstimate:
    """Render and tokenize the input's prompts: all of them when small, an even sample when large. A checkpoint
    without a tokenizer (a folder with only config.json plans too) has its prompts' characters counted instead,
    at CHARACTERS_PER_TOKEN characters a token."""
    from llmbatch.pipelines.read import iter_shard
    from llmbatch.pipelines.render import RowError

    spec, files = job.spec, job.input.files
    total = job.input.rows or 0
    if spec.input.limit is not None:
        total = min(total, spec.input.limit)
    tokens_of, how = _prompt_measure(job)
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
                    tokens += tokens_of(row)
                except RowError:
                    pass  # a row that will fail costs no inference
                counted += 1
                taken += 1
                seen += 1
            if seen >= total or (per_shard is not None and taken >= per_shard):
                break
    if not sampled:
        return TokenEstimate(total, tokens, f"counted every row ({total}){how}")
    estimate = int(tokens / max(1, counted) * total)
    return TokenEstimate(total, estimate, f"sampled the first {per_shard} rows of each of {len(files)} shard(s) "
                                          f"({counted} of {total}) and scaled up{how}")


def _prompt_measure(job: ResolvedJob):
    """(a row's prompt tokens, how they were counted as the plan says it): by the model's tokenizer, else from the
    prompt's characters."""
    from llmbatch.pipelines.render import RenderStage, build_messages, render_plain

    path = job.model.path
    settings = replace(job.render, max_model_len=None)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        renderer = RenderStage(str(path), settings)
        return (lambda row: len(renderer.render(row)[1])), ""

    def characters(row) -> int:
        if settings.messages_column:
            return sum(len(m["content"]) for m in build_messages(row, settings))
        return len(render_plain(row, settings))

    return ((lambda row: math.ceil(characters(row) / CHARACTERS_PER_TOKEN)),
            f"; tokens estimated from the prompts' characters, about {CHARACTERS_PER_TOKEN} a token, as the "
            "checkpoint has no tokenizer")


def planning_len(job: ResolvedJob) -> int:
    """The sequence length a replica's KV cache must hold several of: the job's max_model_len when it sets one;
    else its rows' own length (an allowance for the prompt plus max_tokens, at least 2048) within the model's
    context, which vLLM may hold at full length but the job's rows never reach."""
    if job.spec.model.engine.max_model_len:
        return job.spec.model.engine.max_model_len
    wanted = max(PLANNED_SEQUENCE_TOKENS, PROMPT_TOKENS_ALLOWANCE + job.max_tokens)
    return min(job.model.max_len or wanted, wanted)


@dataclass
class PlanBasis:
    """What the plans of one job on any device share: the resolved job, its model's facts and fingerprint; its
    input tokens and the model's profiles are read once, when a plan first needs them."""
    spec: JobSpec
    job: ResolvedJob
    facts: ModelFacts
    fingerprint: str
    _estimate: TokenEstimate | None = None
    _profiles: list[dict[str, Any]] | None = None
    _scratch: Any = None      # a folder the basis reads from, removed with it

    def estimate(self) -> TokenEstimate:
        if self._estimate is None:
            self._estimate = count_input_tokens(self.job)
        return self._estimate

    def model_profiles(self) -> list[dict[str, Any]]:
        """Every profile of the model, on any device: what calibrates the throughput model."""
        if self._profiles is None:
            self._profiles = profiles.for_model(self.fingerprint)
        return self._profiles


def plan_basis(spec: JobSpec, log=None) -> PlanBasis:
    """Resolve the job as `submit` would (a job it would refuse is refused here: UserError), except that its
    model needs only its config.json, and read that config; never builds a model or downloads weights. A
    model.source that names a released size of a known family (Llama-3.1-8B) is planned from that size's
    figures."""
    size = _known_size(spec.model.source)
    if size is not None:
        return _size_basis(spec, size, log)
    job = resolve(spec, fetch_models=fetched_without_building(spec.model.source), fetch_judges=False,
                  without_weights=True, config_only=True, log=log)
    model_path = model_here(job)
    return PlanBasis(spec, job, facts_for_checkpoint(model_path),
                     model_store.fingerprint_of(spec.model.source, model_path))


def _known_size(source: str):
    """The family size `source` names, when it names nothing else (a catalog model, a path, s3, a hub id)."""
    from llmbatch.cluster.families import load_catalog

    try:
        model_store.classify_source(source)
    except UserError:
        found = load_catalog().size(source)
        if found is None:
            return None
        family, size = found
        sparse = any(mark in a for a in family.architectures for mark in ("Moe", "Mixtral", "Deepseek"))
        if size.kv_latent or sparse:  # a size lists no experts or latent attention: planned as dense, it would be far off
            raise UserError(f"model.source: {size.name} is a mixture of experts or uses latent attention, which a "
                            "size's figures do not describe; plan it from its config.json (a folder holding it)")
        return size
    return None


def _size_basis(spec: JobSpec, size, log) -> PlanBasis:
    """The plan's basis for a released size: its figures written as a config.json in a scratch folder (removed
    with the basis), which the job resolves to as a config-only model; token counts are then estimated."""
    import json
    import tempfile

    from llmbatch.cluster.model_facts import config_for_size

    scratch = tempfile.TemporaryDirectory(prefix="llmbatch-size-")
    folder = Path(scratch.name) / size.name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_for_size(size)), encoding="utf-8")
    as_folder = spec.model_copy(update={"model": spec.model.model_copy(update={"source": str(folder)})})
    job = resolve(as_folder, fetch_models=False, fetch_judges=False, without_weights=True, config_only=True, log=log)
    job = replace(job, spec=spec)
    return PlanBasis(spec, job, facts_for_checkpoint(folder), f"size:{size.name}", _scratch=scratch)


def plan_job(spec: JobSpec, accelerator_name: str | None = None, *, prices: str | None = None, log=None) -> Plan:
    """The plan of a job that resolves: a job `submit` would refuse is refused here too (UserError). What the
    plan finds wrong with a job that resolves (a tensor parallelism too small, a missed deadline or budget) is
    in its `problems`. `prices` is a price file (see cluster/accelerators.py)."""
    device = accelerator_for(spec, accelerator_name)
    price = price_of(device, prices)
    return plan_on(plan_basis(spec, log), device, price)


def plan_on(basis: PlanBasis, device: Accelerator, price: Price) -> Plan:
    """The job's plan on `device`: from the profile of the model on it, else from the throughput model.
    Raises DoesNotFit when the model fits no replica of that device."""
    spec, job, facts = basis.spec, basis.job, basis.facts
    max_len = planning_len(job)
    precision = throughput_model.precision_for(facts, engine_settings(spec, device)["dtype"])
    fit = choose_tensor_parallel(facts, device, max_len, precision.activations, precision.weights_of(facts))
    if fit.tensor_parallel_size is None:
        raise throughput_model.DoesNotFit(f"model {spec.model.source} on {device.name}: {fit.reason}")
    if device.name == "CPU":
        tp = 1  # a CPU replica is one machine; the throughput model refuses a model one machine cannot hold
    else:
        tp = max(fit.tensor_parallel_size, spec.model.engine.tensor_parallel_size)
    engine = engine_settings(spec, device, tp)
    key = profiles.profile_key(basis.fingerprint, device.name, engine)
    stored = profiles.load(key)
    measured = profiles.rates(stored)
    estimate = basis.estimate()
    per_row_out, output_method = _output_per_row(measured or _measured_anywhere(basis), spec.sampling.max_tokens)
    output_tokens = int(estimate.rows * per_row_out)
    notes: list[str] = []
    if measured is not None:
        rates, work = measured, measured.replica_seconds(estimate.input_tokens, output_tokens)
        profile = _profile_info(key, measured)
    else:
        calibration = throughput_model.calibration_for(basis.model_profiles(), facts, device)
        engine_spec = spec.model.engine
        predicted = throughput_model.predict(
            facts, device, precision, tp, estimate.input_tokens / max(1, estimate.rows), per_row_out, max_len,
            max_num_seqs=engine_spec.max_num_seqs, max_num_batched_tokens=engine_spec.max_num_batched_tokens,
            calibration=calibration, rows=estimate.rows)
        b = predicted.breakdown
        rates = predicted.rates
        work = estimate.input_tokens / b.prefill_tokens_per_second + output_tokens / b.decode_tokens_per_second
        profile = _model_info(key, predicted)
        notes.append(f"no profile: rates from the throughput model for {device.name} ({b.summary()}); run "
                     f"`llmbatch profile {spec.model.source}` for a measured plan")
    choice = _choose_replicas(spec, work, rates.startup_seconds, tp, price.usd_per_hour)
    plan = Plan(
        model=spec.model.source, accelerator=device.name, engine=engine, rows=estimate.rows,
        input_tokens=estimate.input_tokens, input_tokens_method=estimate.method, output_tokens=output_tokens,
        tensor_parallel_size=tp, fit=fit.reason, replicas=choice.replicas, devices_total=0, wall_seconds=0,
        device_hours=0, cost_usd=0, hourly_usd=price.usd_per_hour, profile=profile, work_seconds=round(work, 2),
        startup_seconds=round(rates.startup_seconds, 2),
        output_tokens_method=f"{estimate.rows} rows x {per_row_out:.4g}: {output_method}",
        price_source=price.source, replicas_reason=choice.reason, notes=notes,
        past_errors=profiles.prediction_errors(stored)[-5:],
    ).for_replicas(choice.replicas)  # fills in devices, wall time and cost
    problems = [parallelism_problem(spec, plan), deadline_problem(spec, plan, choice.deadline_limit),
                budget_problem(spec, plan)]
    return replace(plan, problems=[p for p in problems if p])


def _measured_anywhere(basis: PlanBasis) -> profiles.Rates | None:
    """A profile of the model on any device: how long its outputs are does not depend on the device, so every
    device's plan counts the same output tokens."""
    for stored in sorted(basis.model_profiles(), key=lambda p: len(p.get("measurements") or []), reverse=True):
        rates = profiles.rates(stored)
        if rates is not None and rates.mean_output_tokens:
            return rates
    return None


def _output_per_row(rates: profiles.Rates | None, max_tokens: int) -> tuple[float, str]:
    """Output tokens a row is planned to generate (from the profile's `rates` when there is one), and where that
    number comes from."""
    if rates is None or not rates.mean_output_tokens:
        return max_tokens, "sampling.max_tokens, as no profile measured the output length"
    if rates.mean_output_tokens >= max_tokens:
        return max_tokens, f"sampling.max_tokens, below the profile's mean output of {rates.mean_output_tokens:.1f}"
    return rates.mean_output_tokens, "the profile's mean output length"


def _model_info(key: str, predicted: throughput_model.Prediction) -> dict[str, Any]:
    """What the plan shows of a throughput-model prediction (no profile under `key`)."""
    b = predicted.breakdown
    c = b.calibration
    return {"used": False, "key": key, "model": {
        "prefill_tokens_per_second": round(b.prefill_tokens_per_second, 1),
        "decode_tokens_per_second": round(b.decode_tokens_per_second, 1),
        "output_tokens_per_second": round(predicted.rates.output_tokens_per_second, 1),
        "startup_seconds": b.startup_seconds, "mean_output_tokens": "max_tokens",
        "calibration": c.source if c else None, "summary": b.summary(), "breakdown": b.to_dict()}}


def _profile_info(key: str, rates: profiles.Rates) -> dict[str, Any]:
    return {"used": True, "key": key, "measurements": rates.measurements,
            "output_tokens_per_second": round(rates.output_tokens_per_second, 2),
            "input_tokens_per_second": round(rates.input_tokens_per_second, 2),
            "prefill_tokens_per_second": _rounded(rates.prefill_tokens_per_second),
            "decode_tokens_per_second": _rounded(rates.decode_tokens_per_second),
            "requests_per_second": round(rates.requests_per_second, 3),
            "startup_seconds": round(rates.startup_seconds, 1),
            "mean_input_tokens": round(rates.mean_input_tokens, 1),
            "mean_output_tokens": round(rates.mean_output_tokens, 1)}


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def _n(value: float) -> str:
    """A number as the arithmetic shows it: at most two decimals, none when whole."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


@dataclass
class ReplicaChoice:
    replicas: int
    reason: str                 # how the count was reached, with its arithmetic
    deadline_limit: str = ""    # what keeps the count below what the deadline needs


def _choose_replicas(spec: JobSpec, work: float, startup: float, tp: int, hourly_usd: float) -> ReplicaChoice:
    resources = spec.resources
    if resources.replicas != "auto":
        low, high = resources.replica_range
        if low == high:
            return ReplicaChoice(high, f"resources.replicas: {high}")
        return ReplicaChoice(high, f"resources.replicas: [{low}, {high}], planned at {high}")
    most = resources.max_replicas or AUTO_MAX_REPLICAS
    cap = "resources.max_replicas" if resources.max_replicas else f"the most without resources.max_replicas, {most}"
    if resources.deadline_seconds is None and resources.budget is None:
        hours = max(1, math.ceil(work / 3600))
        reason = f"about an hour of work per replica (no deadline or budget): ceil({_n(work)} s / 3600 s) = {hours}"
        return ReplicaChoice(min(hours, most), reason + (f", capped at {most} ({cap})" if hours > most else ""))
    choice, reasons, limit = 1, [], ""
    if resources.deadline_seconds is not None:
        deadline = resources.deadline_seconds
        needed = replicas_for_deadline(work, startup, deadline)
        if needed is None:
            choice = min(most, max(1, math.ceil(work / max(startup, 1.0))))
            reasons.append(f"resources.deadline {resources.deadline} ({deadline:g} s) is shorter than start-up "
                           f"({startup:.0f} s); ceil(work / start-up) = ceil({_n(work)} / {_n(startup)}) = {choice}")
        else:
            reasons.append(f"resources.deadline {resources.deadline}: ceil(work / (deadline - start-up)) = "
                           f"ceil({_n(work)} / ({deadline:g} - {_n(startup)})) = {needed}")
            choice = needed
            if needed > most:
                reasons.append(f"capped at {most} ({cap})")
                limit = f"it needs {needed} replicas; raise resources.max_replicas to {needed}"
                choice = most
    if resources.budget is not None:
        budget = f"resources.budget ${resources.budget:g}"
        affordable = replicas_for_budget(work, startup, tp, hourly_usd, resources.budget, most)
        if affordable is None:
            reasons.append(f"{budget} does not cover even 1 replica; planned at 1, the cheapest")
            limit = limit or f"{budget} does not cover more than 1 replica"
            choice = 1
        elif resources.deadline_seconds is None:
            reasons.append(f"{budget}: the most replicas (up to {most}) whose cost stays within it = {affordable}")
            choice = affordable
        elif affordable < choice:
            reasons.append(f"{budget} allows at most {affordable}")
            limit = f"{budget} allows at most {affordable} replica(s)"
            choice = affordable
        else:
            reasons.append(f"{budget} allows up to {affordable}")
    return ReplicaChoice(max(1, min(choice, most)), "; ".join(reasons), limit)


def deadline_problem(spec: JobSpec, plan: Plan, limit: str = "") -> str | None:
    deadline = spec.resources.deadline_seconds
    if deadline is None or plan.wall_seconds <= round(deadline, 1):
        return None
    why = f"start-up alone takes {plan.startup_seconds:.0f} s" if plan.startup_seconds >= deadline else limit
    return (f"resources.deadline {spec.resources.deadline} is missed: {plan.replicas} replica(s) finish in about "
            f"{plan.wall_seconds:.0f} s" + (f"; {why}" if why else ""))


def budget_problem(spec: JobSpec, plan: Plan) -> str | None:
    budget = spec.resources.budget
    if budget is None or plan.cost_usd <= round(budget, 4):
        return None
    cost = f"{plan.cost_usd:.2f}" if plan.cost_usd >= 0.1 else f"{plan.cost_usd:.4f}"
    return (f"resources.budget ${budget:g} is below the cheapest run: ${cost} with {plan.replicas} "
            f"replica(s) at ${plan.hourly_usd:.2f} per device-hour")


def plan_for(spec: JobSpec, accelerator_name: str | None, address: str | None, *, prices: str | None = None,
             log=None) -> Plan:
    """The job's plan, fitted to the cluster at `address` when there is one."""
    plan = plan_job(spec, accelerator_name, prices=prices, log=log)
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
    notes, problems = list(plan.notes), list(plan.problems)
    fitted = plan
    if capacity < 1:
        pinned = f" with {spec.resources.accelerator_type} GPUs" if spec.resources.accelerator_type else ""
        problems.append(f"the cluster at {address} cannot hold one replica ({plan.tensor_parallel_size} x "
                        f"{plan.accelerator} on one node{pinned}); the run would be refused")
    elif plan.replicas > capacity:
        held = f"what the cluster at {address} holds at once"
        if spec.resources.replicas == "auto":
            fitted = replace(plan.for_replicas(capacity), replicas_reason=f"{plan.replicas_reason}; capped at "
                                                                          f"{capacity}, {held}")
            notes.append(f"capped at {capacity} replica(s): {held} (planned {plan.replicas})")
            problems = [p for p in problems if not p.startswith("resources.deadline")]
            problems.append(deadline_problem(spec, fitted, f"the cluster at {address} holds {capacity} at once"))
        elif spec.resources.replica_range[0] > capacity:
            problems.append(f"resources.replicas needs at least {spec.resources.replica_range[0]}, more than the "
                            f"cluster at {address} holds at once ({capacity}); the run would be refused")
        else:
            fitted = replace(plan.for_replicas(capacity), replicas_reason=f"{plan.replicas_reason}; the pool "
                                                                          f"grows to {capacity} here, {held}")
            notes.append(f"the pool grows to {capacity} replica(s) here, {held} "
                         f"(resources.replicas allows {plan.replicas})")
    return replace(fitted, notes=notes, problems=[p for p in problems if p], cluster=info)


def wall_text(seconds: float) -> str:
    """1h02m05s, 4m10s."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def render_plan(plan: Plan) -> str:
    wall = wall_text(plan.wall_seconds)
    lines = [
        f"plan for {plan.model} on {plan.accelerator}",
        f"  rows               {plan.rows}",
        f"  input tokens       {plan.input_tokens}  ({plan.input_tokens_method})",
        f"  output tokens      {plan.output_tokens}  ({plan.output_tokens_method or 'estimated'})",
        f"  per replica        {plan.tensor_parallel_size} x {plan.accelerator}  ({plan.fit})",
        f"  replicas           {plan.replicas}",
        f"  devices in total   {plan.devices_total}",
        f"  estimated wall     {wall}  ({plan.wall_seconds:.0f} s)",
        f"  device-hours       {plan.device_hours:.3f}",
        f"  estimated cost     ${plan.cost_usd:.2f}  (at ${plan.hourly_usd:.2f} per device-hour: {plan.price_source})",
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
        m = p["model"]
        lines.append(f"  profile            none; throughput model: {m['prefill_tokens_per_second']} prompt tok/s, "
                     f"{m['decode_tokens_per_second']} output tok/s per replica, {m['startup_seconds']:.0f} s start-up "
                     f"({'calibrated from ' + m['calibration'] if m['calibration'] else 'uncalibrated'})")
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


def render_explanation(plan: Plan) -> str:
    """The arithmetic behind the plan's numbers."""
    p = plan.profile
    wall = f"{_n(plan.startup_seconds)} + {_n(plan.work_seconds)} / {plan.replicas} = {_n(plan.wall_seconds)} s"
    lines = [
        "how the plan was worked out",
        f"  tokens in          {plan.input_tokens}  ({plan.input_tokens_method})",
        f"  tokens out         {plan.output_tokens} = {plan.output_tokens_method}",
        f"  rates              {_rates_used(p)}",
        f"  replica-seconds    {_work_arithmetic(plan)}",
        f"  wall               start-up + work / replicas = {wall}",
        f"  cost               wall x replicas x devices x $/h = {_n(plan.wall_seconds)} s / 3600 x {plan.replicas} x "
        f"{plan.tensor_parallel_size} x ${plan.hourly_usd:g} = ${plan.cost_usd:.4f}  (price: {plan.price_source})",
        f"  replicas           {plan.replicas}: {plan.replicas_reason}",
    ]
    if not p["used"]:
        lines[4:4] = _model_arithmetic(p["model"]["breakdown"])
    return "\n".join(lines)


def _model_arithmetic(b: dict[str, Any]) -> list[str]:
    """The throughput model's steps: a decode step's time and batch, prefill, calibration."""
    peak = f"{b['tflops']:g} TFLOPS {b['peak']} x {b['eff_compute']:g}"
    c = b["calibration"]
    calibration = (f"{c['source']}: measured / predicted there = decode x{c['decode']:.3g}, prefill "
                   f"x{c['prefill']:.3g}, applied to both rates" if c else
                   "none (no profile of this model on any device): the default efficiency factors stand")
    return [
        f"  decode step        max(reads {b['bytes_per_step'] / 1e9:.3g} GB / ({b['bandwidth_gb_per_s']:g} GB/s x "
        f"{b['eff_bandwidth']:g}), matmuls at {peak}) + all-reduce + engine overhead = "
        f"max({b['memory_seconds'] * 1000:.1f}, {b['compute_seconds'] * 1000:.1f}) + "
        f"{b['all_reduce_seconds'] * 1000:.2f} + {throughput_model.STEP_OVERHEAD_SECONDS * 1000:g} ms = "
        f"{b['step_seconds'] * 1000:.1f} ms for {b['batch']} sequences (bounded by {b['batch_limit']}; KV cache "
        f"{b['kv_cache_tokens']} tokens on {b['tensor_parallel_size']} x {b['accelerator']} at {b['precision']})",
        f"  prefill            compute-bound at {peak} per device",
        f"  calibration        {calibration}",
    ]


def _rates_used(p: dict[str, Any]) -> str:
    if not p["used"]:
        m = p["model"]
        return (f"throughput model (no profile {p['key']}): prefill {m['prefill_tokens_per_second']} tok/s, decode "
                f"{m['decode_tokens_per_second']} tok/s per replica, {m['startup_seconds']:g} s start-up")
    measured = f"profile {p['key']} ({p['measurements']} measurement(s))"
    if p.get("decode_tokens_per_second"):
        return (f"{measured}: prefill {p['prefill_tokens_per_second']} tok/s, decode {p['decode_tokens_per_second']} "
                f"tok/s per replica, start-up {p['startup_seconds']:g} s")
    return f"{measured}: {p['output_tokens_per_second']} output tok/s per replica, start-up {p['startup_seconds']:g} s"


def _work_arithmetic(plan: Plan) -> str:
    p = plan.profile
    rates = p if p["used"] else p["model"]
    if rates.get("decode_tokens_per_second"):
        return (f"input / prefill + output / decode = {plan.input_tokens} / {rates['prefill_tokens_per_second']} + "
                f"{plan.output_tokens} / {rates['decode_tokens_per_second']} = {_n(plan.work_seconds)} s of work")
    return (f"output / output tok/s = {plan.output_tokens} / {p['output_tokens_per_second']} = "
            f"{_n(plan.work_seconds)} s of work")
