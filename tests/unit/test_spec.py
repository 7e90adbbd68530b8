"""Job spec v1: loading, validation messages, --set overrides, the reference text."""
from __future__ import annotations

import textwrap

import pytest
import yaml

from llmbatch.errors import SpecError, UserError
from llmbatch.jobs.spec import (
    JobSpec,
    apply_override,
    format_validation_errors,
    load_spec,
    parse_yaml,
    spec_reference,
    validate_spec,
)

MINIMAL = """\
name: demo-1
model:
  source: smollm2-135m-instruct
input:
  path: data/prompts.jsonl
output:
  path: out/demo
"""


def minimal_raw() -> dict:
    return yaml.safe_load(MINIMAL)


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def spec_error_lines(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, source="job.yaml")
    return info.value.lines


# ---- loading a valid spec ------------------------------------------------------------------------

def test_minimal_spec_loads_with_documented_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert isinstance(spec, JobSpec)
    assert spec.name == "demo-1"
    assert spec.model.source == "smollm2-135m-instruct"
    assert spec.sampling.max_tokens == 256
    assert spec.sampling.temperature == 0.0
    assert spec.sampling.stop == []
    assert spec.resources.replicas == 1
    assert spec.resources.batch_size == 32
    assert spec.resources.accelerator == "auto"
    assert spec.input.prompt_column == "prompt"
    assert spec.input.format == "auto"
    assert spec.input.id_column is None
    assert spec.input.limit is None
    assert spec.model.engine.dtype == "auto"
    assert spec.model.engine.max_model_len is None
    assert spec.model.engine.tensor_parallel_size == 1
    assert spec.output.path == str(tmp_path / "out" / "demo")  # relative to the job file's folder


def test_shipped_quickstart_job_file_is_valid():
    from pathlib import Path

    import llmbatch.jobs as jobs

    spec = load_spec(Path(jobs.__file__).parent / "quickstart.yaml")
    assert spec.name == "quickstart"
    assert spec.sampling.max_tokens == 64


def test_load_spec_missing_file_is_a_spec_error_naming_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert info.value.lines == [f"{missing}: no such job file"]


def test_spec_error_is_a_user_error_with_exit_code_2_and_source_in_message(tmp_path):
    path = write(tmp_path, MINIMAL.replace("name: demo-1", "name: BAD"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert isinstance(info.value, UserError)
    assert info.value.exit_code == 2
    assert info.value.source == str(path)
    assert str(info.value) == f"{path}: invalid job spec"


# ---- validation messages -------------------------------------------------------------------------

def test_bad_value_error_names_its_yaml_path():
    raw = minimal_raw()
    raw["sampling"] = {"max_tokens": 0}
    assert spec_error_lines(raw) == ["sampling.max_tokens: must be greater than 0"]


def test_wrong_type_error_says_must_be():
    raw = minimal_raw()
    raw["resources"] = {"accelerator": "tpu"}
    lines = spec_error_lines(raw)
    assert len(lines) == 1
    assert lines[0].startswith("resources.accelerator: must be ")
    assert "'gpu'" in lines[0]


def test_unknown_key_suggests_close_match_for_model_engin():
    raw = minimal_raw()
    raw["model"]["engin"] = {"dtype": "auto"}
    assert spec_error_lines(raw) == ["model.engin: unknown key (did you mean 'engine'?)"]


def test_unknown_key_suggests_close_match_for_input_prompt_colum():
    raw = minimal_raw()
    raw["input"]["prompt_colum"] = "question"
    assert spec_error_lines(raw) == ["input.prompt_colum: unknown key (did you mean 'prompt_column'?)"]


def test_unknown_nested_key_in_engine_suggests_engine_field():
    raw = minimal_raw()
    raw["model"]["engine"] = {"max_modl_len": 10}
    assert spec_error_lines(raw) == ["model.engine.max_modl_len: unknown key (did you mean 'max_model_len'?)"]


def test_unknown_key_with_no_close_match_lists_known_keys():
    raw = minimal_raw()
    raw["input"]["zzzqqq"] = 1
    (line,) = spec_error_lines(raw)
    assert line.startswith("input.zzzqqq: unknown key (known keys: ")
    for key in ("path", "format", "id_column", "prompt_column", "messages_column", "template",
                "system_prompt", "limit"):
        assert key in line


def test_unknown_top_level_key_lists_sections():
    raw = minimal_raw()
    raw["xyzzy"] = True
    assert spec_error_lines(raw) == [
        "xyzzy: unknown key (known keys: name, task, model, input, sampling, scoring, output, cache, resources, "
        "schedule)"
    ]


def test_missing_required_fields_say_required():
    lines = spec_error_lines({"name": "x"})
    assert lines == ["model: required", "input: required", "output: required"]


def test_missing_nested_required_field_names_full_path():
    raw = minimal_raw()
    del raw["input"]["path"]
    assert spec_error_lines(raw) == ["input.path: required"]


NAME_RULE = "use lowercase letters, digits and '-', starting with a letter or digit"


@pytest.mark.parametrize("bad, problem, suggestion", [
    ("Demo", "'Demo' has 'D'", "demo"),
    ("my job", "'my job' has ' ' (space)", "my-job"),
    ("-lead", "'-lead' starts with '-'", "lead"),
    ("under_score", "'under_score' has '_'", "under-score"),
    ("ünïcode", "'ünïcode' has 'ü', 'ï'", "unicode"),
])
def test_bad_job_name_names_the_characters_and_what_is_allowed(bad, problem, suggestion):
    raw = minimal_raw()
    raw["name"] = bad
    assert spec_error_lines(raw) == [f"name: {problem}; {NAME_RULE} (did you mean '{suggestion}'?)"]


@pytest.mark.parametrize("good", ["a", "0", "nightly-2026", "x-y-z"])
def test_good_job_names_are_accepted(good):
    raw = minimal_raw()
    raw["name"] = good
    assert validate_spec(raw).name == good


def test_job_name_with_trailing_newline_is_rejected():
    raw = minimal_raw()
    raw["name"] = "demo\n"
    (line,) = spec_error_lines(raw)
    assert line.startswith("name: ")


def test_template_and_messages_column_together_is_an_error():
    raw = minimal_raw()
    raw["input"].update(template="Q: {question}", messages_column="messages")
    (line,) = spec_error_lines(raw)
    assert line.startswith("input: ")
    assert "template and messages_column exclude each other" in line


def test_several_errors_are_all_reported_one_line_each(tmp_path):
    path = write(tmp_path, """\
        name: Bad_Name
        model:
          source: m
          engin: {}
        input:
          path: x
          prompt_colum: q
        sampling:
          max_tokens: -1
          top_p: 2
        output: {}
        resources:
          replicas: 0
        """)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = info.value.lines
    assert lines == [
        f"name: 'Bad_Name' has 'B', '_', 'N'; {NAME_RULE} (did you mean 'bad-name'?)",
        "model.engin: unknown key (did you mean 'engine'?)",
        "input.prompt_colum: unknown key (did you mean 'prompt_column'?)",
        "sampling.max_tokens: must be greater than 0",
        "sampling.top_p: must be less than or equal to 1",
        "output.path: required",
        "resources.replicas: must be at least 1",
    ]
    assert all("\n" not in line for line in lines)


def test_format_validation_errors_dedups_and_keeps_order():
    from pydantic import ValidationError

    try:
        JobSpec.model_validate({"name": "x", "sampling": {"max_tokens": 0}})
    except ValidationError as exc:
        lines = format_validation_errors(exc)
    else:  # pragma: no cover - the spec is invalid
        pytest.fail("expected a ValidationError")
    assert lines == ["model: required", "input: required",
                     "sampling.max_tokens: must be greater than 0", "output: required"]
    assert len(lines) == len(set(lines))


def test_section_given_as_scalar_says_what_it_must_be():
    raw = minimal_raw()
    raw["model"] = "smollm2"
    (line,) = spec_error_lines(raw)
    assert line.startswith("model: must be a valid dictionary")


# ---- messages that say what is wrong and what is allowed ---------------------------------------

def with_scorer(**scorer) -> dict:
    return {**minimal_raw(), "scoring": [scorer]}


def test_scorer_name_names_the_characters_and_what_is_allowed():
    lines = spec_error_lines(with_scorer(name="Exact Match", kind="exact_match", reference_column="answer"))
    assert lines == ["scoring.0.name: 'Exact Match' has 'E', ' ' (space), 'M'; use lowercase letters, digits and "
                     "'_', starting with a letter (did you mean 'exact_match'?)"]


def test_scorer_name_starting_with_a_digit_says_so():
    (line,) = spec_error_lines(with_scorer(name="1st", kind="regex", pattern="x"))
    assert line == "scoring.0.name: '1st' starts with '1'; use lowercase letters, digits and '_', starting with a letter"


@pytest.mark.parametrize("value", ["", None])
def test_empty_input_path_says_empty_and_what_it_holds(value):
    raw = minimal_raw()
    raw["input"]["path"] = value
    assert spec_error_lines(raw) == ["input.path: must not be empty (File, directory, glob or prefix; local or s3://)"]


def test_empty_field_with_a_default_says_how_to_get_the_default():
    raw = minimal_raw()
    raw["sampling"] = {"max_tokens": None}
    assert spec_error_lines(raw) == [
        "sampling.max_tokens: must not be empty (Most tokens generated per row); leave the key out for the default, 256"]


def test_empty_section_says_empty():
    raw = minimal_raw()
    raw["model"] = None
    assert spec_error_lines(raw) == ["model: must not be empty (Which model and how to run it)"]


def test_unknown_scorer_kind_suggests_the_close_one_and_lists_the_kinds():
    (line,) = spec_error_lines(with_scorer(name="em", kind="exact-match", reference_column="answer"))
    assert line == ("scoring.0.kind: 'exact-match' is not a scorer kind (did you mean 'exact_match'?); the kinds are "
                    "exact_match, contains, regex, json_valid, json_schema, chrf, judge, python")


def test_scorer_without_kind_says_required_and_lists_the_kinds():
    (line,) = spec_error_lines(with_scorer(name="em"))
    assert line.startswith("scoring.0.kind: required; the kinds are exact_match, contains, regex")


def test_python_function_without_colon_asks_for_module_colon_function():
    (line,) = spec_error_lines(with_scorer(name="p", kind="python", function="json.loads"))
    assert line == "scoring.0.function: 'json.loads' needs the form module:function (the ':' is missing), e.g. json:loads"


def test_python_function_with_other_characters_explains_the_form():
    (line,) = spec_error_lines(with_scorer(name="p", kind="python", function="json:loads()"))
    assert line.startswith("scoring.0.function: 'json:loads()' is not module:function: ")
    assert line.endswith("e.g. json:loads")


def test_unknown_key_in_an_optional_section_lists_its_keys():
    raw = minimal_raw()
    raw["cache"] = {"path": "cache", "zzzqqq": 1}
    assert spec_error_lines(raw) == ["cache.zzzqqq: unknown key (known keys: path)"]


# ---- YAML parsing --------------------------------------------------------------------------------

def test_malformed_yaml_reports_file_line_and_column(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  source: [a, b\ninput: {}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (line,) = info.value.lines
    assert line.startswith(f"{path}:4:")
    assert "not valid YAML" in line


def test_parse_yaml_error_position_is_one_based():
    with pytest.raises(SpecError) as info:
        parse_yaml("a: b: c\n", "f.yaml")
    assert info.value.lines == ["f.yaml:1:5: not valid YAML (mapping values are not allowed here)"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_job_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.lines == [f"{path}: the job file is empty"]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_is_an_error(text):
    with pytest.raises(SpecError) as info:
        parse_yaml(text, "f.yaml")
    (line,) = info.value.lines
    assert line.startswith("f.yaml: the job file must be a mapping")


def test_parse_yaml_returns_the_mapping():
    assert parse_yaml("a: 1\nb: [x]\n", "f.yaml") == {"a": 1, "b": ["x"]}


# ---- --set overrides -----------------------------------------------------------------------------

def test_override_value_is_parsed_as_yaml_int():
    raw = minimal_raw()
    apply_override(raw, "sampling.max_tokens=64")
    assert raw["sampling"] == {"max_tokens": 64}
    assert isinstance(raw["sampling"]["max_tokens"], int)


def test_override_value_is_parsed_as_yaml_list():
    raw = minimal_raw()
    apply_override(raw, "sampling.stop=[a, b]")
    assert raw["sampling"]["stop"] == ["a", "b"]


def test_override_replaces_an_existing_value_and_keeps_siblings():
    raw = minimal_raw()
    apply_override(raw, "input.path=other.jsonl")
    assert raw["input"] == {"path": "other.jsonl"}
    apply_override(raw, "model.source=./ckpt")
    assert raw["model"]["source"] == "./ckpt"


def test_override_creates_missing_sections():
    raw = minimal_raw()
    apply_override(raw, "model.engine.dtype=bfloat16")
    assert raw["model"]["engine"] == {"dtype": "bfloat16"}
    assert raw["model"]["source"] == "smollm2-135m-instruct"


def test_override_with_empty_value_sets_empty_string():
    raw = {}
    apply_override(raw, "input.system_prompt=")
    assert raw == {"input": {"system_prompt": ""}}


def test_override_with_unparseable_yaml_keeps_the_raw_text():
    raw = {}
    apply_override(raw, "input.template=Q: {q}: [")
    assert raw["input"]["template"] == "Q: {q}: ["


def test_override_through_a_scalar_is_rejected():
    raw = {"a": 5}
    with pytest.raises(SpecError) as info:
        apply_override(raw, "a.b=1")
    assert info.value.lines == ["--set a.b=1: a is not a section"]
    assert raw == {"a": 5}


def test_override_through_nested_scalar_names_the_scalar_path():
    raw = minimal_raw()
    with pytest.raises(SpecError) as info:
        apply_override(raw, "model.source.x=1")
    assert info.value.lines == ["--set model.source.x=1: model.source is not a section"]


@pytest.mark.parametrize("item", ["sampling.max_tokens", "=5", "a..b=1", ".a=1", "a.=1"])
def test_malformed_override_items_are_rejected(item):
    with pytest.raises(SpecError) as info:
        apply_override({}, item)
    assert info.value.lines == [f"--set {item}: expected key.path=value"]


def test_load_spec_applies_overrides_then_validates(tmp_path):
    path = write(tmp_path, MINIMAL)
    spec = load_spec(path, ["sampling.max_tokens=64", "sampling.stop=[a, b]", "resources.replicas=3"])
    assert spec.sampling.max_tokens == 64
    assert spec.sampling.stop == ["a", "b"]
    assert spec.resources.replicas == 3


def test_load_spec_reports_invalid_override_values_by_path(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["sampling.max_tokens=0"])
    assert info.value.lines == ["sampling.max_tokens: must be greater than 0"]


# ---- reference text ------------------------------------------------------------------------------

def test_spec_reference_lists_every_field_with_default_and_description():
    text = spec_reference()
    lines = text.splitlines()
    assert lines[0].startswith("name: (required)")
    assert "# Job name: lowercase letters, digits and '-'." in lines[0]
    assert any(line.startswith("  prompt_column: prompt ") for line in lines)
    assert any(line.startswith("  max_tokens: 256 ") for line in lines)
    assert any(line.startswith("  replicas: 1 ") for line in lines)
    assert any(line.startswith("    dtype: auto ") for line in lines)
    assert any(line.startswith("  stop: [] ") for line in lines)
    # one line per field and per section
    def count(model):
        from typing import get_args

        from pydantic import BaseModel

        from llmbatch.jobs.spec import CacheSpec, ScheduleSpec
        n = 0
        for field in model.model_fields.values():
            n += 1
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                n += count(field.annotation)
            elif CacheSpec in get_args(field.annotation):  # Optional[CacheSpec]
                n += count(CacheSpec)
            elif ScheduleSpec in get_args(field.annotation):
                n += count(ScheduleSpec)
        return n
    from llmbatch.jobs.spec import SCORER_KINDS

    assert any(line.startswith("  path: (required)") and "result cache" in line for line in lines)
    assert len(lines) == count(JobSpec) + sum(len(kind.model_fields) for kind in SCORER_KINDS.values())
    assert any(line.startswith("  - kind: judge ") for line in lines)


def test_spec_reference_parses_as_yaml_with_the_real_defaults():
    """The reference is YAML-like: every default must read back as its value (comments separated by space)."""
    ref = yaml.safe_load(spec_reference())
    defaults = JobSpec.model_validate(minimal_raw()).model_dump()
    assert ref["sampling"] == defaults["sampling"]
    assert ref["resources"] == defaults["resources"]
    assert ref["model"]["engine"] == defaults["model"]["engine"]
    assert ref["name"] == "(required)"


def test_each_scorer_spec_names_the_output_columns_it_adds():
    from llmbatch.pipelines.scorer_specs import score_fields

    spec = validate_spec({**minimal_raw(), "scoring": [
        {"name": "exact", "kind": "exact_match", "reference_column": "answer"},
        {"name": "mine", "kind": "python", "function": "m:f", "returns": "boolean"},
        {"name": "helpful", "kind": "judge", "rubric": "Rate {generated_text}"}]})
    typed = [(f.name, str(f.type)) for scorer in spec.scoring for f in scorer.output_fields()]
    assert typed == [("score_exact", "bool"), ("score_mine", "bool"), ("score_helpful", "double"),
                     ("score_helpful_raw", "string")]
    assert typed == [(f.name, str(f.type)) for f in score_fields(list(spec.scoring))]


def test_a_key_given_twice_is_an_error_naming_its_path_and_lines(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: twice\nmodel: {source: m}\ninput: {path: in.jsonl}\noutput: {path: out}\n"
                   "sampling:\n  max_tokens: 64\nsampling:\n  temperature: 0.5\n"
                   "scoring:\n  - {name: a, kind: regex, pattern: x, pattern: y}\n")
    with pytest.raises(SpecError) as error:
        load_spec(job)
    assert error.value.lines == [
        "sampling: given twice (lines 5 and 7); the second would replace the first: keep one",
        "scoring.0.pattern: given twice (lines 10 and 10); the second would replace the first: keep one"]


def test_global_options_may_follow_the_command():
    from llmbatch.jobs.cli import global_options_first

    assert global_options_first(["submit", "job.yaml", "--debug", "--log-format", "json", "--set", "a=1"]) == [
        "--debug", "--log-format", "json", "submit", "job.yaml", "--set", "a=1"]
    assert global_options_first(["--log-format=json", "plan", "j.yaml", "--", "--debug"]) == [
        "--log-format=json", "plan", "j.yaml", "--", "--debug"]
