"""`llmbatch sweep`: one job run on each of several models, then compared and projected to full size."""
from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from llmbatch.errors import JobFailed, UserError
from llmbatch.jobs.full_size import Projection, project, projection_accelerator
from llmbatch.jobs.local_run import Display, run_here
from llmbatch.jobs.run import check_run_id
from llmbatch.jobs.spec import JobSpec, anchor_paths, validate_spec
from llmbatch.jobs.summary import render_summary
from llmbatch.jobs.sweep_report import SweepReport, write_sweep_report
from llmbatch.redact import strip_url_credentials
from llmbatch.storage import join

RUN_ID_MAX = 128
REPORT_FILES = ("compare.md", "compare.html", "logs")   # what a sweep writes in its --out folder
Echo = Callable[[str], None]


@dataclass(frozen=True)
class ModelRun:
    """One model's run of the swept job."""
    model: str
    run_id: str
    spec: JobSpec

    @property
    def run_uri(self) -> str:
        return join(self.spec.output.path, self.run_id)


@dataclass(frozen=True)
class ModelOutcome:
    model: str
    run_id: str
    run_uri: str
    status: str                 # the run's status: succeeded, succeeded_with_errors or failed
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SweepResult:
    outcomes: list[ModelOutcome]
    projections: list[Projection]
    report: SweepReport

    @property
    def failed(self) -> list[ModelOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.succeeded]

    def to_dict(self) -> dict:
        return {"runs": [o.to_dict() for o in self.outcomes], "report": self.report.to_dict(),
                "projections": [p.to_dict() for p in self.projections]}


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def model_slug(source: str) -> str:
    """The last part of a model source as a run id holds it: 'meta-llama/Llama-3.1-8B' -> 'llama-3.1-8b'."""
    last = source.rstrip("/").rsplit("/", 1)[-1].lower()
    slug = re.sub(r"\.{2,}", ".", re.sub(r"[^a-z0-9.]+", "-", last)).strip("-.")
    return slug or "model"


def sweep_run_id(job_name: str, source: str, stamp: str) -> str:
    """<job>-<model slug>-<stamp>-<4 hex>, the slug shortened to keep the run id within RUN_ID_MAX."""
    tail = f"-{stamp}-{secrets.token_hex(2)}"
    room = max(1, RUN_ID_MAX - len(job_name) - 1 - len(tail))
    slug = model_slug(source)[:room].rstrip("-.") or "m"
    return check_run_id(f"{job_name}-{slug}{tail}")


def given_source(source: str) -> str:
    """A --model value as a --set model.source value is read: a relative path from the current directory."""
    raw = {"model": {"source": source}}
    anchor_paths(raw, Path.cwd())
    return raw["model"]["source"]


def spec_for_model(spec: JobSpec, source: str) -> JobSpec:
    """The job on another model, its engine settings kept. A judge scorer keeps its own model; one without
    a model (it grades with the job's model) keeps the job file's, so every model is graded by the same judge."""
    raw = spec.model_dump(mode="json")
    raw["model"]["source"] = source
    for scorer in raw["scoring"]:
        if scorer["kind"] == "judge" and scorer.get("model") is None:
            scorer["model"] = spec.model.model_dump(mode="json")
    return validate_spec(raw)


def model_runs(spec: JobSpec, models: list[str], stamp: str) -> list[ModelRun]:
    sources = [given_source(model) for model in models]
    repeated = sorted({source for source in sources if sources.count(source) > 1})
    if repeated:
        raise UserError(f"--model: {repeated[0]} is given more than once")
    return [ModelRun(source, sweep_run_id(spec.name, source, stamp), spec_for_model(spec, source))
            for source in sources]


def check_quality(spec: JobSpec, quality: str | None) -> None:
    """Refuse a --quality scorer the job does not have before any model runs."""
    if quality is None:
        return
    name = quality.removeprefix("score_")
    known = [scorer.name for scorer in spec.scoring]
    if name != "mean_logprob" and name not in known:
        raise UserError(f"--quality: the job has no scorer '{name}'; it has: "
                        f"{', '.join([*known, 'mean_logprob'])}")


def failure_reason(exc: Exception) -> str:
    """An error and the lines under it, on one line; an unexpected one with its type."""
    if not isinstance(exc, (JobFailed, UserError)):
        return strip_url_credentials(f"{type(exc).__name__}: {exc}")
    head = str(exc)
    lines = getattr(exc, "lines", None) or getattr(exc, "problems", None) or []
    return strip_url_credentials("; ".join([head, *(line for line in lines if line != head)]))


def run_each_here(runs: list[ModelRun], display: Display, echo: Echo) -> list[ModelOutcome]:
    """One model after another on the embedded Ray (the first run starts it, the next ones reuse it);
    a model whose run fails is recorded and the next one runs."""
    outcomes = []
    for number, run in enumerate(runs, start=1):
        echo(f"model {number} of {len(runs)}: {run.model} (run {run.run_id})")
        try:
            result = run_here(run.spec, run.run_id, display)
        except Exception as exc:  # one model's failure, whatever it is, leaves the next models their runs
            outcome = ModelOutcome(run.model, run.run_id, run.run_uri, "failed", failure_reason(exc))
            echo(f"run {run.run_id}: failed: {outcome.error}")
        else:
            outcome = ModelOutcome(run.model, run.run_id, result.run_uri, result.status)
            echo(render_summary(result.manifest, result.summary))
        outcomes.append(outcome)
    return outcomes


def run_each_on_cluster(runs: list[ModelRun], address: str, echo: Echo, log_dir: Path) -> list[ModelOutcome]:
    """Every model's run submitted at once (the cluster's capacity decides how many run side by side), then
    each waited for; each run's logs are saved in `log_dir`."""
    from llmbatch.jobs.cluster_watch import LineSplitter, shown_line
    from llmbatch.jobs.remote import manifest_counts, submit_to_cluster, wait_for

    shown = strip_url_credentials(address)
    outcomes: dict[str, ModelOutcome] = {}
    submitted = []
    for run in runs:
        try:
            submission = submit_to_cluster(run.spec, run.run_id, address)
        except Exception as exc:
            outcomes[run.run_id] = ModelOutcome(run.model, run.run_id, run.run_uri, "failed", failure_reason(exc))
            echo(f"run {run.run_id} ({run.model}): not submitted: {outcomes[run.run_id].error}")
            continue
        echo(f"submitted {run.run_id} ({run.model}) to {shown}; output: {submission.run_uri}")
        submitted.append((run, submission))
    log_dir.mkdir(parents=True, exist_ok=True)
    for run, submission in submitted:
        log_path = log_dir / f"{run.run_id}.log"
        try:
            with log_path.open("w", encoding="utf-8") as log:
                lines = LineSplitter(lambda line: log.write(shown_line(line, "console") + "\n"))
                status = wait_for(address, run.run_id, lines, submission.submission_id)
                lines.close()
        except Exception as exc:
            outcome = ModelOutcome(run.model, run.run_id, submission.run_uri, "failed",
                                   f"not followed to its end: {failure_reason(exc)}")
        else:
            if status == "SUCCEEDED":
                run_status = manifest_counts(submission.run_uri).get("run_status") or "succeeded"
                outcome = ModelOutcome(run.model, run.run_id, submission.run_uri, run_status)
            else:
                outcome = ModelOutcome(run.model, run.run_id, submission.run_uri, "failed",
                                       f"ended {status}; its logs: {log_path}")
        outcomes[run.run_id] = outcome
        echo(f"run {run.run_id} ({run.model}): {outcome.status}" + (f": {outcome.error}" if outcome.error else ""))
    return [outcomes[run.run_id] for run in runs]


def check_out_is_free(out: Path) -> None:
    """A sweep's report never replaces an earlier one: refused before any model runs."""
    taken = [name for name in REPORT_FILES if (out / name).exists()]
    if taken:
        raise UserError(f"--out {out.resolve()}: already holds {', '.join(taken)} of an earlier report; give "
                        "another folder, or move those away")


def run_sweep(spec: JobSpec, models: list[str], *, address: str | None, display: Display, project_to: str | None,
              rows: int | None, out_dir: str | None, quality: str | None, echo: Echo, log=None) -> SweepResult:
    """Run the job on each model, then compare the runs that succeeded and plan each model at full size (after
    the runs, so that the rates they measured are in the profiles the plans read)."""
    stamp = utc_stamp()
    runs = model_runs(spec, models, stamp)
    check_quality(spec, quality)
    accelerator_name = projection_accelerator(spec, project_to)
    out = Path(out_dir or f"sweep-{spec.name}-{stamp}")
    check_out_is_free(out)
    if address is None:
        outcomes = run_each_here(runs, display, echo)
    else:
        outcomes = run_each_on_cluster(runs, address, echo, out / "logs")
    projections = [project(run.spec, accelerator_name, rows, log=log) for run in runs]
    report = write_sweep_report(outcomes, projections, out, quality, rows=rows)
    return SweepResult(outcomes, projections, report)
