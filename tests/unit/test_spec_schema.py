"""`llmbatch spec --json-schema` for editors, and click's shell completion of the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml
from click.testing import CliRunner

from llmbatch.jobs.cli import main

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def schema_from_cli() -> dict:
    result = CliRunner().invoke(main, ["spec", "--json-schema"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_schema_is_json_schema_with_the_sections_and_their_descriptions():
    schema = schema_from_cli()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "llmbatch job file"
    assert {"model", "input", "sampling", "output"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    assert "lowercase" in schema["properties"]["name"]["description"]
    jsonschema.Draft202012Validator.check_schema(schema)


def test_the_shipped_job_files_match_the_schema_and_typos_do_not():
    validator = jsonschema.Draft202012Validator(schema_from_cli())
    for job in [JOBS / "quickstart.yaml", *sorted((JOBS / "examples").glob("*.yaml"))]:
        assert list(validator.iter_errors(yaml.safe_load(job.read_text()))) == [], job
    raw = yaml.safe_load((JOBS / "quickstart.yaml").read_text())
    raw["sampling"]["max_token"] = 5
    assert [e.validator for e in validator.iter_errors(raw)] == ["additionalProperties"]


def test_out_writes_the_schema_to_a_file(tmp_path):
    out = tmp_path / "job.schema.json"
    result = CliRunner().invoke(main, ["spec", "--json-schema", "--out", str(out)])
    assert result.exit_code == 0 and f"wrote {out}" in result.stdout
    assert json.loads(out.read_text()) == schema_from_cli()


def test_spec_without_flags_is_the_field_reference():
    result = CliRunner().invoke(main, ["spec"])
    assert result.exit_code == 0 and "max_tokens: 256" in result.stdout


def test_bash_completion_offers_the_new_commands():
    result = CliRunner().invoke(main, [], prog_name="llmbatch",
                                env={"_LLMBATCH_COMPLETE": "bash_complete", "COMP_WORDS": "llmbatch pre",
                                     "COMP_CWORD": "1"})
    assert result.exit_code == 0
    assert "plain,preview" in result.stdout.splitlines()
