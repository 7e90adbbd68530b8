"""The scorers' settings: one typed spec per kind, with the output columns each adds, the input columns it
reads, the checks it needs before an engine starts, and (row-by-row kinds) the function that scores a row.

jobs/spec.py puts them into the job spec; the judge's spec gains its model and replicas there, since those
are the job's engine settings. The same spec objects travel to the Ray stages that score.
"""
from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Literal, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmbatch import env_refs
from llmbatch.errors import name_problem
from llmbatch.pipelines import scorers
from llmbatch.pipelines.scorers import JUDGE_TEXT_SUFFIX, RowScorer, score_column


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


NORMALIZATIONS = ("strip", "lowercase", "whitespace", "punctuation", "articles")
Normalization = Literal["strip", "lowercase", "whitespace", "punctuation", "articles"]
SCORER_NAME = r"^[a-z][a-z0-9_]*$"
SCORER_NAME_RULE = "use lowercase letters, digits and '_', starting with a letter"
FUNCTION_REFERENCE = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class _ScorerSpec(_Section):
    name: str = Field(..., pattern=SCORER_NAME,
                      description="Adds the column score_<name>; lowercase letters, digits and '_'.")

    boolean: ClassVar[bool] = True       # the score column holds booleans (else float64)
    needs_engine: ClassVar[bool] = False  # scored in an engine pass of its own (judges), not row by row

    @field_validator("name", mode="before")
    @classmethod
    def _name_rule(cls, value: Any) -> Any:
        problem = name_problem(value, "a-z0-9_", "a-z", "_", SCORER_NAME_RULE) if isinstance(value, str) else None
        if problem:
            raise ValueError(problem)
        return value

    @property
    def column(self) -> str:
        return score_column(self.name)

    @property
    def is_boolean(self) -> bool:
        return self.boolean

    def output_fields(self) -> list[pa.Field]:
        """The output columns this scorer adds."""
        return [pa.field(self.column, pa.bool_() if self.is_boolean else pa.float64())]

    def input_columns(self) -> list[str]:
        """Input columns this scorer reads, so that the input can be checked for them."""
        column = getattr(self, "reference_column", None)
        return [column] if column else []

    def problems(self, where: str, known_columns: set[str]) -> list[str]:
        """What would make this scorer fail on every row, found before an engine starts."""
        return []

    def build(self, columns: dict[str, str]) -> RowScorer:
        """The function output row -> score (raises ScoreError). `columns` maps input names to output names."""
        raise TypeError(f"a {self.kind} scorer is not scored row by row")


class ExactMatchScorer(_ScorerSpec):
    kind: Literal["exact_match"] = Field(..., description="True when the output equals the reference.")
    reference_column: str = Field(..., min_length=1, description="Input column holding the expected answer.")
    normalize: list[Normalization] = Field(
        default_factory=lambda: ["strip"],
        description="Applied to both sides first: strip, lowercase, whitespace, punctuation, articles.")

    def build(self, columns: dict[str, str]) -> RowScorer:
        return scorers.exact_match(self.reference_column, list(self.normalize), columns)


class ContainsScorer(_ScorerSpec):
    kind: Literal["contains"] = Field(..., description="True when the output contains the reference or text.")
    reference_column: Optional[str] = Field(None, min_length=1, description="Input column holding the text to find.")
    text: Optional[str] = Field(None, min_length=1, description="A fixed text to find (instead of a column).")
    normalize: list[Normalization] = Field(
        default_factory=lambda: ["strip"],
        description="Applied to both sides first: strip, lowercase, whitespace, punctuation, articles.")

    @model_validator(mode="after")
    def _one_needle(self) -> "ContainsScorer":
        if (self.reference_column is None) == (self.text is None):
            raise ValueError("give exactly one of reference_column or text")
        return self

    def build(self, columns: dict[str, str]) -> RowScorer:
        return scorers.contains(self.reference_column, self.text, list(self.normalize), columns)


class RegexScorer(_ScorerSpec):
    kind: Literal["regex"] = Field(..., description="True when the pattern matches the output.")
    pattern: str = Field(..., min_length=1, description="Python regular expression.")
    full_match: bool = Field(False, description="The whole output must match (else: found anywhere).")
    ignore_case: bool = Field(False, description="Match regardless of case.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value

    def build(self, columns: dict[str, str]) -> RowScorer:
        return scorers.regex(self.pattern, self.full_match, self.ignore_case)


class JsonValidScorer(_ScorerSpec):
    kind: Literal["json_valid"] = Field(..., description="True when the output parses as JSON.")
    strip_code_fence: bool = Field(True, description="Accept output wrapped in a ```json ... ``` fence.")

    def build(self, columns: dict[str, str]) -> RowScorer:
        return scorers.json_parses(self.strip_code_fence)


class JsonSchemaScorer(_ScorerSpec):
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True, serialize_by_alias=True)

    kind: Literal["json_schema"] = Field(..., description="True when the output parses and matches the schema.")
    schema_: dict[str, Any] = Field(..., alias="schema", description="JSON Schema the parsed output must match.")
    strip_code_fence: bool = Field(True, description="Accept output wrapped in a ```json ... ``` fence.")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict) -> dict:
        import jsonschema

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema ({exc.message})") from None
        remote = _remote_refs(value)
        if remote:
            raise ValueError(f"$ref {remote[0]!r} points outside the schema; only references within it "
                             "('#/...') are followed, so that scoring never fetches from the network")
        return value

    def build(self, columns: dict[str, str]) -> RowScorer:
        return scorers.json_parses(self.strip_code_fence, self.schema_)


def _remote_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) and not node["$ref"].startswith("#") else []
        return own + [ref for value in node.values() for ref in _remote_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _remote_refs(value)]
    return []


class ChrfScorer(_ScorerSpec):
    kind: Literal["chrf"] = Field(..., description="chrF (sacrebleu) of the output against a reference, 0-100.")
    reference_column: str = Field(..., min_length=1, description="Input column holding the reference text.")

    boolean: ClassVar[bool] = False

    def build(self, columns: dict[str, str]) -> RowScorer:
        return scorers.chrf(self.reference_column, columns)


class JudgeScorerBase(_ScorerSpec):
    kind: Literal["judge"] = Field(..., description="A model grades each output on a numeric scale (second pass).")
    rubric: str = Field(..., min_length=1,
                        description="Format string over the output row: {prompt}, {generated_text} and input columns.")
    scale: list[int] = Field(default_factory=lambda: [1, 5], description="[lowest, highest] whole-number score.")
    system_prompt: Optional[str] = Field(None, description="System message for the judge.")

    boolean: ClassVar[bool] = False
    needs_engine: ClassVar[bool] = True

    def output_fields(self) -> list[pa.Field]:
        return super().output_fields() + [pa.field(self.column + JUDGE_TEXT_SUFFIX, pa.string())]

    def problems(self, where: str, known_columns: set[str]) -> list[str]:
        from llmbatch.pipelines.render import template_fields

        missing = [f for f in template_fields(self.rubric) if f not in known_columns]
        if not missing:
            return []
        return [f"{where}.rubric: no column {', '.join(repr(m) for m in missing)}; "
                f"the rubric can use {', '.join(sorted(known_columns))}"]

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: list[int]) -> list[int]:
        if len(value) != 2 or not value[0] < value[1] or value[1] - value[0] > 100:
            raise ValueError("must be [lowest, highest] with lowest < highest and at most 100 steps")
        return value

    @field_validator("rubric")
    @classmethod
    def _rubric_fields(cls, value: str) -> str:
        from llmbatch.pipelines.render import template_fields

        template_fields(value)
        return value


class PythonScorer(_ScorerSpec):
    kind: Literal["python"] = Field(..., description="Your own function, called once per row inside the Ray stage.")
    function: str = Field(..., pattern=FUNCTION_REFERENCE,
                          description="package.module:function; called as function(row, **options).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function. A text value may hold "
        "${ENV_VAR} references (API keys, tokens): the run stores the reference and reads the variable where the "
        "scorer runs.")
    returns: Literal["number", "boolean"] = Field("number", description="Column type of the score.")
    timeout_seconds: float = Field(10.0, gt=0, le=3600, description="A call that runs longer is stopped; the row "
                                                                    "gets an error instead of a score.")

    @field_validator("function", mode="before")
    @classmethod
    def _function_form(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.fullmatch(FUNCTION_REFERENCE, value):
            raise ValueError(function_form_problem(value))
        return value

    @field_validator("options")
    @classmethod
    def _no_written_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        written = env_refs.literal_secrets(value)
        if written:
            raise ValueError(f"{', '.join(written)}: a secret written into the job file would be stored with the "
                             "run (_attempt.json, _manifest.json); write \"${ENV_VAR}\" instead and set that "
                             "variable where the job runs")
        return value

    @property
    def is_boolean(self) -> bool:
        return self.returns == "boolean"

    def problems(self, where: str, known_columns: set[str]) -> list[str]:
        lines = [f"{where}.options.{path}: ${{{name}}} is not set; set it where the job runs (on a cluster, in "
                 "every node's environment)" for path, name in env_refs.references(self.options)
                 if name not in os.environ]
        try:
            scorers.load_function(self.function)
        except ImportError as exc:
            lines.append(f"{where}.function: {exc} (the module must be importable where the job runs, "
                         "e.g. through PYTHONPATH or an installed package)")
        return lines

    def build(self, columns: dict[str, str]) -> RowScorer:
        try:
            options = env_refs.resolve(self.options)
        except env_refs.MissingVariable as exc:
            return scorers.failing(f"options: ${{{exc.name}}} is not set where the scorer runs")
        return scorers.python_function(self.function, options, self.is_boolean, self.timeout_seconds)


def function_form_problem(value: str) -> str:
    """Why `value` is not a module:function reference, with one that would be."""
    if ":" not in value:
        module, _, function = value.rpartition(".")
        if module and function:
            example = f"{module}:{function}"
        else:
            example = f"{value}:score_row" if value.isidentifier() else "my_scorers:score_row"
        return f"{value!r} needs the form module:function (the ':' is missing), e.g. {example}"
    return (f"{value!r} is not module:function: a dotted module path, one ':', then the function's name "
            "(letters, digits and '_'), e.g. json:loads")


ROW_SCORERS = (ExactMatchScorer, ContainsScorer, RegexScorer, JsonValidScorer, JsonSchemaScorer, ChrfScorer,
               PythonScorer)
KINDS: dict[str, type[_ScorerSpec]] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls for cls in (*ROW_SCORERS, JudgeScorerBase)}


def score_fields(specs: list[_ScorerSpec]) -> list[pa.Field]:
    """The output columns the scorers add, in spec order."""
    return [field for spec in specs for field in spec.output_fields()]


def scorer_problems(specs: list[_ScorerSpec], output_columns: list[str], input_columns: list[str]) -> list[str]:
    """Problems found before any engine starts: python scorers that do not import, rubrics naming no column."""
    known = set(output_columns) | set(input_columns)
    return [line for number, spec in enumerate(specs) for line in spec.problems(f"scoring.{number}", known)]


def read_scorers(recorded: list[dict[str, Any]]) -> list[_ScorerSpec]:
    """Scorer specs as a manifest recorded them; fields of the job's engine settings (a judge's model) dropped."""
    specs = []
    for entry in recorded:
        cls = KINDS[entry["kind"]]
        specs.append(cls.model_validate({k: v for k, v in entry.items()
                                         if k in cls.model_fields or k == "schema"}))
    return specs
