"""The `llmbatch` command line: a thin layer over jobs.run, jobs.spec and cluster.model_store."""
from __future__ import annotations

import os
import sys
import traceback

import click
import structlog

from jobs.errors import JobFailed, SpecError, UserError
from jobs.logs import configure_logging


class _Group(click.Group):
    """Prints user errors as plain lines (exit 2) and hides tracebacks unless --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            if isinstance(exc, SpecError) and exc.source:
                click.echo(f"error: {exc}", err=True)
            for line in exc.lines:
                click.echo(f"error: {line}" if not isinstance(exc, SpecError) else f"  {line}", err=True)
            ctx.exit(exc.exit_code)
        except JobFailed as exc:
            click.echo(f"error: job failed: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
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
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    configure_logging(log_format, "debug" if debug else "info")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set sampling.max_tokens=64 (repeatable).")
def validate(job_file: str, overrides: tuple[str, ...]) -> None:
    """Check a job file, its input and its model without starting Ray."""
    from jobs.run import validate_job
    from jobs.spec import load_spec

    spec = load_spec(job_file, list(overrides))
    problems = validate_job(spec)
    if problems:
        raise UserError(problems[0], lines=problems)
    click.echo(f"ok: {job_file} is valid (job '{spec.name}', model {spec.model.source}, input {spec.input.path})")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--run-id", help="Name of this run (default: <job>-<UTC time>-<random>); output goes under output.path/RUN_ID.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a job-file field, e.g. --set sampling.max_tokens=64 (repeatable).")
@click.option("--show-worker-logs", is_flag=True, help="Stream Ray worker and vLLM engine logs to the terminal.")
def submit(job_file: str, run_id: str | None, overrides: tuple[str, ...], show_worker_logs: bool) -> None:
    """Run a job and write parquet results plus a manifest."""
    from jobs.run import run_job
    from jobs.spec import load_spec
    from jobs.summary import render_summary

    spec = load_spec(job_file, list(overrides))
    result = run_job(spec, run_id, log=structlog.get_logger(), show_worker_logs=show_worker_logs)
    click.echo(render_summary(result.manifest))


@main.group()
def models() -> None:
    """Prepare and list models in the local model cache."""


@models.command("prepare")
@click.argument("name")
def models_prepare(name: str) -> None:
    """Build a catalog model's checkpoint into the cache (once)."""
    from cluster.model_store import prepare

    path = prepare(name, log=structlog.get_logger())
    click.echo(f"{name}: {path}")


@models.command("list")
def models_list() -> None:
    """Show the models in the cache, and catalog models not prepared yet."""
    from cluster.home import models_dir
    from cluster.model_catalog import CATALOG
    from cluster.model_store import list_cached

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


@main.command("spec")
def spec_cmd() -> None:
    """Print every job-file field with its default and meaning."""
    from jobs.spec import spec_reference

    click.echo(spec_reference())


if __name__ == "__main__":
    sys.exit(main())
