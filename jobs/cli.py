"""The `llmbatch` command line: a thin layer over jobs.run, jobs.spec and cluster.model_store."""
from __future__ import annotations

import sys
import traceback

import click
import structlog

from llmbatch.cluster.accelerators import PRICES_ENV, accelerator_names
from llmbatch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, EXIT_USER, JobFailed, UserError
from llmbatch.jobs.error_report import ReportedElsewhere, emit, log_format_asked, report_for, usage_report
from llmbatch.jobs.logs import configure_logging
from llmbatch.redact import strip_url_credentials


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
    """Reports every error in one format (jobs.error_report) and exits with its code; tracebacks only with
    --debug (and in a cluster run's logs)."""

    def main(self, args=None, **kwargs):
        return super().main(args=global_options_first(list(sys.argv[1:] if args is None else args)), **kwargs)

    def make_context(self, info_name, args, parent=None, **extra):
        log_format = log_format_asked(args)  # parsing consumes args
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            emit(usage_report(exc), log_format)
            raise click.exceptions.Exit(exc.exit_code) from None

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.NoArgsIsHelpError):
            raise
        except click.UsageError as exc:
            report = usage_report(exc)
        except click.ClickException:
            raise
        except (UserError, JobFailed, ReportedElsewhere) as exc:
            report = report_for(exc, traceback.format_exc() if debug else None)
        except KeyboardInterrupt as exc:
            report = report_for(exc)
        except Exception as exc:
            keep_traceback = debug or bool(ctx.obj and ctx.obj.get("traceback_in_logs"))
            report = report_for(exc, traceback.format_exc() if keep_traceback else None)
        emit(report, ctx.params.get("log_format") or "console")
        ctx.exit(report.exit_code)


EXIT_CODES_HELP = f"""\b
Exit codes:
  {EXIT_OK}    ok
  {EXIT_JOB_FAILED}    the job failed: its pipeline stopped, or it had more error rows than output.max_error_rate;
       plan (and submit --dry-run): the job cannot run as written or misses its deadline or budget
  {EXIT_USER}    a user error: the job file, a flag, the input, the model, storage or credentials
  {EXIT_INTERNAL}    an internal error in llmbatch (--debug shows the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)

Errors go to stderr as lines that start with 'error: ' (with --log-format json: one JSON object per error,
with its exit_code).
"""


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
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
    ctx.obj["log_format"] = log_format
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
@click.option("--wait", is_flag=True, help="With --address: watch the run (the live view on a terminal, its log "
              "lines otherwise) and exit with its outcome; Ctrl-C stops the watching, not the run.")
@click.option("--show-worker-logs", is_flag=True, help="Stream Ray worker and vLLM engine logs to the terminal "
              "(they go to the run's log file otherwise, or stay in a cluster run's log), with plain log lines "
              "instead of the live view.")
@click.option("--dashboard", is_flag=True, help="Start Ray's dashboard with the embedded Ray and show its address "
              "(a cluster has its own: --address prints the run's link).")
@click.option("--dry-run", is_flag=True, help="Print the plan (replicas, time, cost; fitted to the --address cluster when given) and run nothing; "
              "exit 1 when it finds the job cannot run as written or misses its deadline or budget (as `plan`).")
@click.option("--overwrite", is_flag=True, help="Replace a committed run already at output.path/RUN_ID, or start an uncommitted one over "
              "instead of continuing it.")
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Continue a crashed or cancelled run: rows it already wrote are kept, not computed again. "
              "Unlike a plain resubmission, it refuses when the job or its input changed.")
@click.option("--on-cluster", is_flag=True, hidden=True)
def submit(job_file: str, run_id: str | None, overrides: tuple[str, ...], address: str | None, wait: bool,
           show_worker_logs: bool, dashboard: bool, dry_run: bool, overwrite: bool, resume_id: str | None,
           on_cluster: bool) -> None:
    """Run a job and write parquet results plus a manifest (JOB_FILE '-' reads standard input).

    On the embedded Ray, a live view on a terminal shows the run's phase, rows, speed, time left and engine
    replicas; otherwise, and with --log-format json, log lines do. Ray's and vLLM's own output goes to the run's
    log file (its path is shown), and the run joins this machine's history (`llmbatch runs`). With --address,
    the run's dashboard link is printed; with --wait as well, the same view (or log lines) follows the run on
    the cluster, and a driver's error comes back with its exit code."""
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
        from llmbatch.cluster.jobs_api import planning_address
        from llmbatch.jobs.plan import plan_for

        _show_plan(plan_for(spec, None, planning_address(address), log=structlog.get_logger()))
        return
    if resume_id:
        if run_id and run_id != resume_id:
            raise UserError(f"--resume {resume_id} and --run-id {run_id} name different runs; pass one of them")
        if overwrite:
            raise UserError("--resume keeps what a run wrote and --overwrite deletes it; pass one of them")
        run_id = resume_id
    run_id = check_run_id(run_id) if run_id else new_run_id(spec.name)
    target = None if on_cluster else cluster_address(address)
    if on_cluster:
        from llmbatch.jobs.cluster_watch import SUMMARY_EVENT

        log = structlog.get_logger()
        result = run_job(spec, run_id, log=log, show_worker_logs=True, on_cluster=True, overwrite=overwrite,
                         resume=bool(resume_id))
        log.info(SUMMARY_EVENT, run_id=run_id, text=render_summary(result.manifest, result.summary))
        return
    if target is None:
        from llmbatch.jobs.local_run import Display, run_here

        settings = click.get_current_context().find_root().obj
        display = Display(settings["log_format"], "debug" if settings["debug"] else "info", show_worker_logs,
                          dashboard)
        result = run_here(spec, run_id, display, overwrite=overwrite, resume=bool(resume_id))
        click.echo(render_summary(result.manifest, result.summary))
        return
    from llmbatch.jobs.remote import submit_to_cluster

    submission = submit_to_cluster(spec, run_id, target, overwrite=overwrite, resume=bool(resume_id))
    attempt = "" if submission.submission_id == run_id else f" as {submission.submission_id}"
    shown = strip_url_credentials(target)
    click.echo(f"submitted {run_id}{attempt} to {shown}; output: {submission.run_uri}")
    link = _dashboard_link(target, submission.submission_id)
    if link:
        click.echo(f"dashboard: {link}")
    if not wait:
        click.echo(f"watch it with: llmbatch watch {run_id} --address {shown}")
        return
    _watch_cluster_run(target, run_id, submission.submission_id, spec.name, show_worker_logs)


def _dashboard_link(target: str, submission_id: str) -> str | None:
    """The Ray dashboard's page of a submission; none when the address holds credentials (they are not shown)."""
    shown = strip_url_credentials(target)
    if shown != target or not shown.startswith(("http://", "https://")):
        return None
    return f"{shown.rstrip('/')}/#/jobs/{submission_id}"


def _watch_cluster_run(target: str, run_id: str, submission_id: str, job: str, show_worker_logs: bool) -> None:
    """The run's live view (or its log lines) until it ends, then its summary; its driver's error, with the
    driver's exit code."""
    from dataclasses import replace

    from llmbatch.jobs.cluster_watch import watch_run
    from llmbatch.jobs.error_report import ReportedElsewhere

    settings = click.get_current_context().find_root().obj
    shown = strip_url_credentials(target)
    logs_command = f"llmbatch logs {run_id} --address {shown}"
    try:
        outcome = watch_run(target, run_id, submission_id, job=job, dashboard=_dashboard_link(target, submission_id),
                            logs_command=logs_command, log_format=settings["log_format"],
                            show_worker_logs=show_worker_logs)
    except KeyboardInterrupt:
        click.echo(f"stopped watching; run {run_id} goes on on the cluster: watch it again with llmbatch watch "
                   f"{run_id} --address {shown}, stop it with llmbatch cancel {run_id} --address {shown}", err=True)
        raise
    if outcome.summary:
        click.echo(outcome.summary)
    click.echo(f"run {run_id}: {outcome.status}")
    if outcome.error is not None:
        report = outcome.error
        if report.traceback and not settings["debug"]:
            report = replace(report, traceback=None, hint=f"its traceback is in {logs_command}")
        raise ReportedElsewhere(report)
    if outcome.status != "SUCCEEDED":
        raise JobFailed(f"run {run_id} ended {outcome.status}; see {logs_command}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set resources.replicas=auto (repeatable).")
@click.option("--accelerator", metavar="NAME", help=f"Plan for this accelerator: {accelerator_names()}. Default: "
              "resources.accelerator_type, else gpu for resources.accelerator: gpu, else cpu.")
@click.option("--accelerators", "accelerator_list", metavar="A,B,...",
              help="Plan on each of these accelerators and print them side by side (replicas, wall time, "
                   "device-hours, cost, $ per 1M output tokens, deadline met), the cheapest that meets the "
                   "deadline marked; e.g. L4,A100-80GB,H100.")
@click.option("--prices", "prices_file", metavar="FILE",
              help="USD per device-hour by accelerator name, a YAML or JSON mapping such as 'H100: 2.49' (default: "
                   f"the file ${PRICES_ENV} names; accelerators it leaves out keep their list price).")
@click.option("--explain", is_flag=True, help="Also print the arithmetic: tokens, rates, replica-seconds, wall time, "
                                              "cost and how the replica count was chosen.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (with its problems and reasoning); "
                                                      "with --accelerators, a list of plans.")
@click.option("--address", help="Fit the plan to this Ray cluster's capacity (its dashboard, http://HEAD:8265; "
                                "default: RAY_ADDRESS when it is such a URL, else no cluster check).")
def plan(job_file: str, overrides: tuple[str, ...], accelerator: str | None, accelerator_list: str | None,
         prices_file: str | None, explain: bool, as_json: bool, address: str | None) -> None:
    """Estimate replicas, GPUs, wall time, GPU-hours and cost from measured throughput (a profile of the model
    on the device), else from the throughput model of the device.

    Exits 1 after the plan, with one error line per reason, when the job cannot run as written (a
    tensor_parallel_size below what the model needs, a cluster that cannot hold it) or misses its
    resources.deadline or resources.budget; with --accelerators, when the marked device's plan does. Never
    builds or downloads model weights: a catalog model must be prepared first (llmbatch models prepare NAME)."""
    from llmbatch.cluster.jobs_api import planning_address
    from llmbatch.jobs.plan import plan_for
    from llmbatch.jobs.spec import load_spec

    if accelerator and accelerator_list:
        raise UserError("give --accelerator or --accelerators, not both")
    devices = None
    if accelerator_list is not None:
        from llmbatch.jobs.plan_compare import device_names

        devices = device_names(accelerator_list)
    spec = latest_slot(load_spec(job_file, list(overrides)))
    if devices is not None:
        _show_comparison(spec, devices, prices_file, planning_address(address), as_json=as_json, explain=explain)
        return
    result = plan_for(spec, accelerator, planning_address(address), prices=prices_file, log=structlog.get_logger())
    _show_plan(result, as_json=as_json, explain=explain)


def _show_comparison(spec, devices: list[str], prices_file: str | None, address: str | None, *, as_json: bool,
                     explain: bool) -> None:
    """Print the job's plans on `devices` side by side, then exit 1 when the marked one has problems."""
    import json

    from llmbatch.jobs.plan import render_explanation
    from llmbatch.jobs.plan_compare import compare_devices, refuse_if_chosen_is_blocked, render_comparison

    options = compare_devices(spec, devices, prices=prices_file, address=address, log=structlog.get_logger())
    if as_json:
        click.echo(json.dumps([option.to_dict() for option in options], indent=2))
    else:
        click.echo(render_comparison(spec, options))
        for option in options if explain else []:
            if option.plan is not None:
                click.echo(f"\n{option.accelerator}: " + render_explanation(option.plan))
    refuse_if_chosen_is_blocked(options)


def _show_plan(result, *, as_json: bool = False, explain: bool = False) -> None:
    """Print a plan, then exit 1 with its problems when it has any."""
    import json

    from llmbatch.jobs.plan import refuse_if_blocked, render_explanation, render_plan

    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(render_plan(result))
        if explain:
            click.echo(render_explanation(result))
    refuse_if_blocked(result)


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
    """Print a cluster run's log: its driver's events as log lines (as the JSON the driver wrote, with
    --log-format json), Ray's and vLLM's output as it is."""
    from llmbatch.jobs.cluster_watch import LineSplitter, shown_line
    from llmbatch.jobs.remote import follow_logs, logs as fetch_logs

    target = _address(address)
    log_format = click.get_current_context().find_root().obj["log_format"]
    lines = LineSplitter(lambda line: click.echo(shown_line(line, log_format)))
    if follow:
        follow_logs(target, run_id, lines)
    else:
        lines(fetch_logs(target, run_id))
    lines.close()


@main.command()
@click.argument("run_id")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--show-worker-logs", is_flag=True, help="Print Ray's and vLLM's lines of the run's log too, with "
              "plain log lines instead of the live view.")
def watch(run_id: str, address: str | None, show_worker_logs: bool) -> None:
    """Watch a cluster run until it ends, as `submit --wait` does: the live view on a terminal (its log lines
    otherwise), then its summary; exits with the run's outcome. Ctrl-C stops the watching, not the run."""
    from llmbatch.jobs.remote import job_info

    target = _address(address)
    info = job_info(target, run_id)
    _watch_cluster_run(target, run_id, info.submission_id, (info.metadata or {}).get("job") or run_id,
                       show_worker_logs)


@main.command("list")
@click.option("--address", help=ADDRESS_HELP)
def list_cmd(address: str | None) -> None:
    """List llmbatch runs on a cluster, newest first (`llmbatch runs` adds the runs this machine started)."""
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


@main.command("runs")
@click.option("--job", metavar="NAME", help="Only the runs of this job.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@click.option("--address", help="Also list the runs on this Ray cluster (its dashboard, http://HEAD:8265; "
                                "default: RAY_ADDRESS when it is such a URL).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1),
              help="How many of the newest runs to show.")
def runs(job: str | None, as_json: bool, address: str | None, limit: int) -> None:
    """List the runs this machine started, and a cluster's runs with --address, newest first."""
    import json

    from llmbatch.cluster.jobs_api import planning_address
    from llmbatch.jobs.run_index import cluster_run, list_runs, newest_first, render_runs, runs_root

    found = [{**run, "where": "local"} for run in list_runs(job)]
    target = planning_address(address)
    places = [str(runs_root())]
    if target is not None:
        from llmbatch.jobs.remote import list_runs as list_cluster_runs

        where = strip_url_credentials(target)
        places.append(where)
        try:
            on_cluster = list_cluster_runs(target)
        except UserError as exc:
            if address:
                raise
            structlog.get_logger().warning("cluster_runs_not_listed", address=where, error=str(exc),
                                           detail="RAY_ADDRESS names this cluster; listing this machine's runs only")
            on_cluster = []
        found += [cluster_run(run, where) for run in on_cluster if job is None or run.get("job") == job]
    shown = newest_first(found)[:limit]
    if as_json:
        click.echo(json.dumps(shown, indent=2, default=str))
    elif not shown:
        click.echo(f"no runs{f' of job {job}' if job else ''} in {' or on '.join(places)}")
    else:
        click.echo(render_runs(shown))
        if len(found) > limit:
            hidden = len(found) - limit
            click.echo(f"({hidden} older run{'s' * (hidden != 1)} not shown: --limit N shows more)")


@main.command()
@click.argument("run_id")
@click.option("--address", help=ADDRESS_HELP)
def cancel(run_id: str, address: str | None) -> None:
    """Stop a running cluster run; it commits no manifest."""
    from llmbatch.jobs.remote import cancel as stop

    click.echo(f"run {run_id}: {stop(_address(address), run_id)}")


@main.command()
@click.argument("run")
@click.option("--rows", default=5, show_default=True, type=click.IntRange(0), help="Sample rows to print.")
@click.option("--full", is_flag=True, help="Print whole texts, not one cut line each.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and the sample rows as JSON.")
def results(run: str, rows: int, full: bool, as_json: bool) -> None:
    """Print a finished run's summary and a sample of its rows, each with the input's own prompt.

    RUN is a run id from `llmbatch runs`, `latest` (the newest run this machine started) or the run's folder,
    output.path/RUN_ID (local or s3://)."""
    import json

    from llmbatch.jobs.results import render_results, results_json
    from llmbatch.jobs.run_index import locate, unfinished

    run_uri = locate(run)
    try:
        shown = json.dumps(results_json(run_uri, rows), indent=2, default=str) if as_json \
            else render_results(run_uri, rows, full=full)
    except UserError:
        reason = unfinished(run)
        if reason is None:
            raise
        raise UserError(reason) from None
    click.echo(shown)


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


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--model", "models", multiple=True, required=True, metavar="SOURCE",
              help="A model to run the job on (repeatable): catalog name, local checkpoint directory, s3:// prefix "
                   "or hub id.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field for every model, e.g. --set input.limit=200 (repeatable).")
@click.option("--address", help=ADDRESS_HELP + " Every model's run is submitted at once; without one, they run "
                                               "one after another on an embedded local Ray.")
@click.option("--project-to", metavar="ACCELERATOR", help="Project each model to the full job on this accelerator "
              "(default: resources.accelerator_type, else H100).")
@click.option("--rows", type=click.IntRange(1), help="The full job's row count for the projection (default: the "
                                                     "whole input, input.limit removed).")
@click.option("--out", "out_dir", help="Directory for compare.md and compare.html (default: sweep-<job>-<UTC time>); "
              "one that holds an earlier report is refused.")
@click.option("--quality", help="Scorer to rank by (default: the first scorer every run has, else mean logprob).")
@click.option("--json", "as_json", is_flag=True, help="Print the runs, the report's paths and the projections as JSON.")
def sweep(job_file: str, models: tuple[str, ...], overrides: tuple[str, ...], address: str | None,
          project_to: str | None, rows: int | None, out_dir: str | None, quality: str | None, as_json: bool) -> None:
    """Run one job on each --model, compare the runs, and project each model to the full job.

    Each model runs a copy of the job with model.source replaced (run id <job>-<model>-<UTC time>-<random>).
    A model whose run fails is listed as failed and the others go on; the command then exits 1. The report
    (compare.md, compare.html) adds each model's plan at full size, from the rates its run measured when a
    profile on that accelerator exists."""
    import json

    from llmbatch.cluster.jobs_api import cluster_address
    from llmbatch.jobs.local_run import Display
    from llmbatch.jobs.spec import load_spec
    from llmbatch.jobs.sweep import run_sweep

    spec = latest_slot(load_spec(job_file, list(overrides)))
    settings = click.get_current_context().find_root().obj
    display = Display(settings["log_format"], "debug" if settings["debug"] else "info")
    result = run_sweep(spec, list(models), address=cluster_address(address), display=display, project_to=project_to,
                       rows=rows, out_dir=out_dir, quality=quality, echo=lambda text: click.echo(text, err=as_json),
                       log=structlog.get_logger())
    report = result.report
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(report.markdown.read_text(encoding="utf-8"))
        click.echo(f"wrote {report.markdown}" + (f" and {report.html}" if report.html else ""))
    if result.failed:
        names = ", ".join(outcome.model for outcome in result.failed)
        raise JobFailed(f"{len(result.failed)} of {len(result.outcomes)} model run(s) failed: {names}")


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


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-n", "--rows", "count", default=5, show_default=True, type=click.IntRange(0),
              help="Rows to show, from the start of the input.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set input.system_prompt='Be brief.' (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (texts exact, with token ids).")
def preview(job_file: str, count: int, overrides: tuple[str, ...], as_json: bool) -> None:
    """Show the first rows as the model will see them: the input's prompt, the text after the template, system
    prompt and chat template, and their token counts. Reads only the model's config and tokenizer; no Ray."""
    import json

    from llmbatch.jobs.preview import preview_job, render_preview
    from llmbatch.jobs.spec import load_spec

    spec = latest_slot(load_spec(job_file, list(overrides)))
    shown = preview_job(spec, count, log=structlog.get_logger())
    click.echo(json.dumps(shown.to_dict(), indent=2) if as_json else render_preview(shown))


@main.command()
@click.option("--input", "input_path", help="The input (jsonl, csv or parquet file, folder or glob) whose columns "
              "the job reads; without it, a placeholder prompts.jsonl.")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="model.source: a catalog name, local checkpoint directory, s3:// prefix or hub id.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Job file to write (default: <job name>.yaml in this folder).")
@click.option("--force", is_flag=True, help="Replace the job file if it exists.")
def init(input_path: str | None, model: str, out_file: str | None, force: bool) -> None:
    """Write a commented job file for an input, its prompt (or chat messages) column picked from the input."""
    from llmbatch.jobs.scaffold import write_job_file

    target, columns, name = write_job_file(out_file, input_path, model, force)
    if columns is None:
        picked = "placeholder input prompts.jsonl, prompt_column: prompt"
    elif columns.messages_column:
        picked = f"messages_column: {columns.messages_column}"
    else:
        picked = f"prompt_column: {columns.prompt_column}"
    click.echo(f"wrote {target} (job '{name}', model {model}, {picked})")
    click.echo(f"next: llmbatch preview {target}; llmbatch validate {target}; llmbatch submit {target}")


@main.command("spec")
@click.option("--json-schema", "json_schema", is_flag=True,
              help="Print the job file's JSON Schema (for editors: YAML language server, VS Code).")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="Write to this file instead.")
def spec_cmd(json_schema: bool, out_file: str | None) -> None:
    """Print every job-file field with its default and meaning (or, with --json-schema, the JSON Schema)."""
    if json_schema:
        import json

        from llmbatch.jobs.spec_schema import job_json_schema

        text = json.dumps(job_json_schema(), indent=2)
    else:
        from llmbatch.jobs.spec import spec_reference

        text = spec_reference()
    if out_file is None:
        click.echo(text)
        return
    from pathlib import Path

    try:
        Path(out_file).write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--out: cannot write {Path(out_file).absolute()}: {exc.strerror or exc}") from None
    click.echo(f"wrote {out_file}")


from llmbatch.jobs.schedule_cli import latest_slot, schedule, scheduler  # noqa: E402  (the groups register on main)

main.add_command(scheduler)
main.add_command(schedule)

if __name__ == "__main__":
    sys.exit(main())
