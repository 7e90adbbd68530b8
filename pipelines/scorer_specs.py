"""The scorers' settings: one typed spec per kind, with the output columns each adds.

jobs/spec.py puts them into the job spec; the judge's spec gains its model and replicas there, since those
are the job's engine settings.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmbatch.pipelines.scorers import output_fields


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


NORMALIZATIONS = ("strip", "lowercase", "whitespace", "punctuation", "articles")
Normalization = Literal["strip", "lowercase", "whitespace", "punctuation", "articles"]
SCORER_NAME = r"^[a-z][a-z0-9_]*$"


class _ScorerSpec(_Section):
    name: str = Field(..., pattern=SCORER_NAME,
                      description="Adds the column score_<name>; lowercase letters, digits and '_'.")

    def output_fields(self) -> list[pa.Field]:
        """The output columns this scorer adds."""
        return output_fields(self.kind, self.name, getattr(self, "returns", None))


class ExactMatchScorer(_ScorerSpec):
    kind: Literal["exact_match"] = Field(..., description="True when the output equals the reference.")
    reference_column: str = Field(..., min_length=1, description="Input column holding the expected answer.")
    normalize: list[Normalization] = Field(
        default_factory=lambda: ["strip"],
        description="Applied to both sides first: strip, lowercase, whitespace, punctuation, articles.")


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


class JsonValidScorer(_ScorerSpec):
    kind: Literal["json_valid"] = Field(..., description="True when the output parses as JSON.")
    strip_code_fence: bool = Field(True, description="Accept output wrapped in a ```json ... ``` fence.")


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
        return value


class ChrfScorer(_ScorerSpec):
    kind: Literal["chrf"] = Field(..., description="chrF (sacrebleu) of the output against a reference, 0-100.")
    reference_column: str = Field(..., min_length=1, description="Input column holding the reference text.")


class JudgeScorerBase(_ScorerSpec):
    kind: Literal["judge"] = Field(..., description="A model grades each output on a numeric scale (second pass).")
    rubric: str = Field(..., min_length=1,
                        description="Format string over the output row: {prompt}, {generated_text} and input columns.")
    scale: list[int] = Field(default_factory=lambda: [1, 5], description="[lowest, highest] whole-number score.")
    system_prompt: Optional[str] = Field(None, description="System message for the judge.")

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
    function: str = Field(..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                          description="package.module:function; called as function(row, **options).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the function.")
    returns: Literal["number", "boolean"] = Field("number", description="Column type of the score.")
