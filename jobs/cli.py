"""The `llmbatch` command line: a thin layer over jobs.run, jobs.spec and cluster.model_store."""
from __future__ import annotations

import sys
import traceback

import click
import structlog

from llmbatch.errors import JobFailed, SpecError, UserError
from llmbatch.jobs.logs import configure_logging
from llmbatch.redact import strip_url_credentials


def _say_error(text: str) -> None:
    click.echo(strip_url_credentials(text), err=True)


GLOBAL_FLAGS = ("--debug",)
GLOBAL_OPTIONS = ("--log-format",)


def global_options_first(args: list[str]) -> list[str]:
    """`llmbatch submit JOB --debug` as `llmbatch --debug submit JOB`: the global options may come anywhere."""
    front, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg in GLOBAL_FLAGS or any(arg.startswith(f"{o}=") for o in GLOBAL_OPTIONS):
            front.append(arg)
        elif arg in GLOBAL_OPTIONS and i + 1 < len(args):
            front += [arg, args[i + 1]]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


class _Group(click.Group):
    """Prints user errors as plain lines (exit 2) and hides tracebacks unless --debug."""

    def main(self, args=None, **kwargs):
        return super().main(args=global_options_first(list(sys.argv[1:] if args is None else args)), **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            if isinstance(exc, SpecError) and exc.source:
                _say_error(f"error: {exc}")
            for line in exc.lines:
                _say_error(f"error: {line}" if not isinstance(exc, SpecError) else f"  {line}")
            ctx.exit(exc.exit_code)
        except JobFailed as exc:
            _say_error(f"error: job failed: {exc}")
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if ctx.obj and ctx.obj.get("traceback_in_logs"):
                traceback.print_exc()
            _say_error(f"error: {type(exc).__name__}: {exc}")
            click.echo("(run with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for every error.")
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True,
              help="Log lines for people (console) or machines (json).")
@click.version_option(package_name="llmbatch")
@click.pass_context
def main(ctx: click.Context, debug: bool, log_format: str) -> None:
    """Run batch inference jobs on open LLMs with Ray Data and vLLM."""
    from llmbatch.cluster.jobs_api import use_token_if_available

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    configure_logging(log_format, "debug" if debug else "info")
    use_token_if_available()  # Ray reads its auth mode once, when first imported


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set sampling.max_tokens=64 (repeatable).")
def validate(job_file: str, overrides: tuple[str, ...]) -> None:
    """Check a job file, its input and its model without starting Ray: every check `submit` makes before an
    engine starts (columns, formats, empty input, the model's weights and context, storage and credentials)."""
    from llmbatch.jobs.resolve import resolve
    from llmbatch.jobs.spec import load_spec

    spec = latest_slot(load_spec(job_file, list(overrides)))
    resolve(spec)
    click.echo(f"ok: {job_file} is valid (job '{spec.name}', model {spec.model.source}, input {spec.input.path})")


ADDRESS_HELP = "Ray Jobs API address of a cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)."


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--run-id", help="Name of this run (default: <job>-<UTC time>-<random>); output goes under output.path/RUN_ID. "
              "An earlier attempt at RUN_ID that never committed is continued if the job and its input files "
              "are unchanged, and started over if not.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set sampling.max_tokens=64 (repeatable).")
@click.option("--address", help=ADDRESS_HELP + " Without one, the job runs on an embedded local Ray.")
@click.option("--wait", is_flag=True, help="With --address: stream the run's logs and exit with its outcome.")
@click.option("--show-worker-logs", is_flag=True, help="Stream Ray worker and vLLM engine logs to the terminal.")
@click.option("--dry-run", is_flag=True, help="Print the plan (replicas, time, cost; fitted to the --address cluster when given) and run nothing.")
@click.option("--overwrite", is_flag=True, help="Replace a committed run already at output.path/RUN_ID, or start an uncommitted one over "
              "instead of continuing it.")
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Continue a crashed or cancelled run: rows it already wrote are kept, not computed again. "
              "Unlike a plain resubmission, it refuses when the job or its input changed.")
@click.option("--on-cluster", is_flag=True, hidden=True)
def submit(job_file: str, run_id: str | None, overrides: tuple[str, ...], address: str | None, wait: bool,
           show_worker_logs: bool, dry_run: bool, overwrite: bool, resume_id: str | None, on_cluster: bool) -> None:
    """Run a job and write parquet results plus a manifest (JOB_FILE '-' reads standard input)."""
    from llmbatch.cluster.jobs_api import cluster_address
    from llmbatch.jobs.run import check_run_id, new_run_id, run_job
    from llmbatch.jobs.spec import load_spec
    from llmbatch.jobs.summary import render_summary

    if on_cluster:  # the logs of a cluster run are read later, by someone else: keep unexpected tracebacks
        from llmbatch.jobs.remote import shipped_job_file

        click.get_current_context().find_root().obj["traceback_in_logs"] = True
        job_file = shipped_job_file()
    spec = latest_slot(load_spec(job_file, list(overrides)))
    if dry_run:
        from llmbatch.jobs.plan import plan_for, render_plan

        from llmbatch.cluster.jobs_api import planning_address

        click.echo(render_plan(plan_for(spec, None, planning_address(address), log=structlog.get_logger())))
        return
    if resume_id:
        if run_id and run_id != resume_id:
            raise UserError(f"--resume {resume_id} and --run-id {run_id} name different runs; pass one of them")
        if overwrite:
            raise UserError("--resume keeps what a run wrote and --overwrite deletes it; pass one of them")
        run_id = resume_id
    run_id = check_run_id(run_id) if run_id else new_run_id(spec.name)
    target = None if on_cluster else cluster_address(address)
    if target is None:
        result = run_job(spec, run_id, log=structlog.get_logger(), show_worker_logs=show_worker_logs or on_cluster,
                         on_cluster=on_cluster, overwrite=overwrite, resume=bool(resume_id))
        click.echo(render_summary(result.manifest, result.summary))
        return
    from llmbatch.jobs.remote import submit_to_cluster, wait_for

    submission = submit_to_cluster(spec, run_id, target, overwrite=overwrite, resume=bool(resume_id))
    attempt = "" if submission.submission_id == run_id else f" as {submission.submission_id}"
    shown = strip_url_credentials(target)
    click.echo(f"submitted {run_id}{attempt} to {shown}; output: {submission.run_uri}")
    if not wait:
        click.echo(f"follow it with: llmbatch logs {run_id} --follow --address {shown}")
        return
    status = wait_for(target, run_id, lambda chunk: click.echo(chunk, nl=False), submission.submission_id)
    click.echo(f"run {run_id}: {status}")
    if status != "SUCCEEDED":
        raise JobFailed(f"run {run_id} ended {status}; see llmbatch logs {run_id} --address {target}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set resources.replicas=auto (repeatable).")
@click.option("--accelerator", help="Plan for this accelerator (CPU, L4, A10G, A100-40GB, A100-80GB, H100-80GB); "
                                    "default: resources.accelerator_type, A10G for gpu, else CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--address", help="Fit the plan to this Ray cluster's capacity (its dashboard, http://HEAD:8265; "
                                "default: RAY_ADDRESS when it is such a URL, else no cluster check).")
def plan(job_file: str, overrides: tuple[str, ...], accelerator: str | None, as_json: bool,
         address: str | None) -> None:
    """Estimate replicas, GPUs, wall time, GPU-hours and cost from measured throughput."""
    import json

    from llmbatch.cluster.jobs_api import planning_address
    from llmbatch.jobs.plan import plan_for, render_plan
    from llmbatch.jobs.spec import load_spec

    spec = latest_slot(load_spec(job_file, list(overrides)))
    result = plan_for(spec, accelerator, planning_address(address), log=structlog.get_logger())
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render_plan(result))


@main.command()
@click.argument("model_source")
@click.option("--input", "input_path", help="Prompts to calibrate on (default: 64 prompts shipped with llmbatch).")
@click.option("--samples", default=64, show_default=True, type=click.IntRange(1), help="Rows to run.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="sampling.max_tokens of the calibration run.")
@click.option("--set", "engine_overrides", multiple=True, metavar="KEY=VALUE",
              help="An engine setting as in model.engine, e.g. --set max_model_len=4096 (repeatable).")
def profile(model_source: str, input_path: str | None, samples: int, max_tokens: int,
            engine_overrides: tuple[str, ...]) -> None:
    """Measure a model's throughput per replica on real prompts and store the profile."""
    from llmbatch.jobs.profile import profile_model
    from llmbatch.jobs.spec import apply_override

    engine: dict = {}
    for item in engine_overrides:
        apply_override(engine, item)
    manifest, prefill_manifest = profile_model(model_source, input_path=input_path, samples=samples,
                                               max_tokens=max_tokens, engine=engine, log=structlog.get_logger())
    from llmbatch.cluster.profiles import measurement_from_manifest, prefill_from_manifest, rates

    rows, engine = manifest.rows, manifest.engine
    click.echo(f"profile of {model_source} ({engine.accelerator}, {engine.dtype}, "
               f"max_model_len {getattr(engine, 'max_model_len', None)})")
    click.echo(f"  samples            {rows.ok} ok of {rows.in_}")
    measured = measurement_from_manifest(manifest, "profile")
    if measured is None:
        raise JobFailed("no replica finished a batch, so nothing was measured")
    if manifest.startup_seconds is not None:
        click.echo(f"  start-up           {manifest.startup_seconds:.1f} s")
    click.echo(f"  output tok/s       {measured['output_tokens_per_second']:.1f} per replica (prefill included)")
    click.echo(f"  input tok/s        {measured['input_tokens_per_second']:.1f} per replica (alongside decode)")
    prefill = prefill_from_manifest(prefill_manifest, "profile")
    if prefill is not None:
        alone = rates({"measurements": [measured], "prefill": [prefill]})
        click.echo(f"  prefill tok/s      {prefill['prefill_tokens_per_second']:.1f} per replica "
                   f"(measured alone: one output token per request)")
        if alone.decode_tokens_per_second:
            click.echo(f"  decode tok/s       {alone.decode_tokens_per_second:.1f} per replica (prefill time taken out)")
    click.echo(f"  requests/s         {measured['requests_per_second']:.2f} per replica")
    click.echo(f"  mean input tokens  {measured['mean_input_tokens']:.1f}")
    click.echo(f"  mean output tokens {measured['mean_output_tokens']:.1f}")


def _address(address: str | None) -> str:
    from llmbatch.cluster.jobs_api import required_address

    return required_address(address, "runs on the embedded local Ray are only visible while `submit` runs")


@main.command()
@click.argument("run_id")
@click.option("--address", help=ADDRESS_HELP)
def status(run_id: str, address: str | None) -> None:
    """Show a cluster run's status (and row counts once it has finished)."""
    from llmbatch.jobs.remote import describe_status

    info = describe_status(_address(address), run_id)
    for key, value in info.items():
        if value is not None:
            click.echo(f"{key + ':':<12} {value}")


@main.command()
@click.argument("run_id")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the run ends.")
def logs(run_id: str, address: str | None, follow: bool) -> None:
    """Print a cluster run's logs."""
    from llmbatch.jobs.remote import follow_logs, logs as fetch_logs

    target = _address(address)
    if follow:
        follow_logs(target, run_id, lambda chunk: click.echo(chunk, nl=False))
    else:
        click.echo(fetch_logs(target, run_id), nl=False)


@main.command("list")
@click.option("--address", help=ADDRESS_HELP)
def list_cmd(address: str | None) -> None:
    """List llmbatch runs on a cluster, newest first."""
    from llmbatch.jobs.remote import list_runs

    runs = list_runs(_address(address))
    if not runs:
        click.echo("no llmbatch runs on this cluster")
        return
    click.echo(f"{'RUN_ID':<44} {'STATUS':<10} {'ROWS OK/ERR':<12} {'STARTED':<21} JOB / MODEL")
    for run in runs:
        counts = f"{run['rows_ok']}/{run['rows_error']}" if "rows_ok" in run else "-"
        click.echo(f"{run['run_id']:<44} {run['status']:<10} {counts:<12} {run['started'] or '-':<21} "
                   f"{run['job']} / {run['model']}")


@main.command()
@click.argument("run_id")
@click.option("--address", help=ADDRESS_HELP)
def cancel(run_id: str, address: str | None) -> None:
    """Stop a running cluster run; it commits no manifest."""
    from llmbatch.jobs.remote import cancel as stop

    click.echo(f"run {run_id}: {stop(_address(address), run_id)}")


@main.command()
@click.argument("run_path")
@click.option("--rows", default=5, show_default=True, type=click.IntRange(0), help="Sample rows to print.")
def results(run_path: str, rows: int) -> None:
    """Print a finished run's summary and a sample of its rows (RUN_PATH = output.path/RUN_ID)."""
    from llmbatch.jobs.results import render_results

    click.echo(render_results(run_path, rows))


@main.command()
@click.argument("run_paths", nargs=-1, required=True)
@click.option("--out", "out_dir", default="compare", show_default=True,
              help="Directory for compare.md and compare.html.")
@click.option("--quality", help="Scorer to rank by (default: the first scorer every run has, else mean logprob).")
def compare(run_paths: tuple[str, ...], out_dir: str, quality: str | None) -> None:
    """Compare runs on quality, output tok/s and cost per 1M tokens: a markdown table and an HTML page with charts."""
    from llmbatch.jobs.compare import write_report

    markdown, page = write_report(list(run_paths), out_dir, quality)
    click.echo(markdown.read_text(encoding="utf-8"))
    click.echo(f"wrote {markdown} and {page}")


@main.group()
def models() -> None:
    """Prepare, list, inspect and convert models; the open model families llmbatch runs."""


@models.command("prepare")
@click.argument("name")
def models_prepare(name: str) -> None:
    """Build a catalog model's checkpoint into the cache (once)."""
    from llmbatch.cluster.model_store import prepare

    path = prepare(name, log=structlog.get_logger())
    click.echo(f"{name}: {path}")


@models.command("list")
def models_list() -> None:
    """Show the models in the cache, and catalog models not prepared yet."""
    from llmbatch.cluster.home import models_dir
    from llmbatch.cluster.model_catalog import CATALOG
    from llmbatch.cluster.model_store import list_cached

    cached = list_cached()
    click.echo(f"model cache: {models_dir()}")
    if cached:
        click.echo(f"{'NAME':<32} {'KIND':<8} {'SIZE':>9}  SOURCE")
        for m in cached:
            click.echo(f"{m.name:<32} {m.kind:<8} {m.bytes / 2**20:>7.0f}MB  {m.source}")
    else:
        click.echo("(empty)")
    missing = [name for name in CATALOG if name not in {m.source for m in cached}]
    for name in missing:
        click.echo(f"not prepared yet: {name} (llmbatch models prepare {name})")


@models.command("families")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def models_families(as_json: bool) -> None:
    """Show the model families llmbatch knows: how each runs, its architectures, seed models and caveats."""
    import json

    from llmbatch.cluster.families import load_catalog, render_families

    catalog = load_catalog()
    click.echo(json.dumps(catalog.model_dump(mode="json"), indent=2) if as_json else render_families(catalog))


@models.command("inspect")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def models_inspect(source: str, as_json: bool) -> None:
    """Say which family a checkpoint is, how it will run and what would stop it (reads config.json only)."""
    import json

    from llmbatch.cluster.model_inspect import inspect_source, render_inspection

    found = inspect_source(source)
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else render_inspection(found))


@models.command("convert")
@click.argument("source")
@click.option("--to", "target", type=click.Choice(["gptj"]), required=True,
              help="Layout to write: gptj (from CodeGen, which vLLM does not run).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New directory for the converted checkpoint.")
def models_convert(source: str, target: str, out_dir: str) -> None:
    """Rewrite a checkpoint in a layout vLLM runs natively (CodeGen -> GPT-J, exactly)."""
    from pathlib import Path

    from llmbatch.cluster.convert_codegen import convert_codegen
    from llmbatch.cluster.model_inspect import locate_checkpoint

    _, path = locate_checkpoint(source)
    out = convert_codegen(path, Path(out_dir).expanduser().resolve(), log=structlog.get_logger())
    click.echo(f"wrote {out} ({target}, from {path}); use it as model.source: {out}")


@main.command("spec")
def spec_cmd() -> None:
    """Print every job-file field with its default and meaning."""
    from llmbatch.jobs.spec import spec_reference

    click.echo(spec_reference())


from llmbatch.jobs.schedule_cli import latest_slot, schedule, scheduler  # noqa: E402  (the groups register on main)

main.add_command(scheduler)
main.add_command(schedule)

if __name__ == "__main__":
    sys.exit(main())
