"""Configured scorers: each adds a `score_<name>` column to every output row.

A scorer that cannot score a row leaves its score null and says why in the row's `error`
(prefixed `score_<name>:`), keeping the generation; rows that already failed are not scored.
"""
from __future__ import annotations

import importlib
import json
import math
import numbers
import re
import string
from typing import Any, Callable

import pyarrow as pa

SCORE_PREFIX = "score_"
JUDGE_TEXT_SUFFIX = "_raw"
BOOLEAN_KINDS = {"exact_match", "contains", "regex", "json_valid", "json_schema"}
ENGINE_KINDS = {"judge"}  # scored in a pass of their own, with an engine


class ScoreError(ValueError):
    """This scorer cannot score this row; the message goes into the row's `error`."""


def score_column(name: str) -> str:
    return SCORE_PREFIX + name


def output_fields(kind: str, name: str, returns: str | None = None) -> list[pa.Field]:
    """The output columns one scorer adds: its score, and a judge's raw answer."""
    boolean = kind in BOOLEAN_KINDS or (kind == "python" and returns == "boolean")
    fields = [pa.field(score_column(name), pa.bool_() if boolean else pa.float64())]
    if kind == "judge":
        fields.append(pa.field(score_column(name) + JUDGE_TEXT_SUFFIX, pa.string()))
    return fields


def score_fields(scorers: list[dict[str, Any]]) -> list[pa.Field]:
    """The output columns the scorers add, in spec order."""
    return [f for s in scorers for f in output_fields(s["kind"], s["name"], s.get("returns"))]


def reference_columns(scorers: list[dict[str, Any]]) -> list[str]:
    """Input columns the scorers read, so the input pre-pass can check they exist."""
    return [s["reference_column"] for s in scorers if s.get("reference_column")]


def normalize(text: str, steps: list[str]) -> str:
    if "lowercase" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if "articles" in steps:
        text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.IGNORECASE)
    if "whitespace" in steps:
        text = " ".join(text.split())
    if "strip" in steps:
        text = text.strip()
    return text


def strip_code_fence(text: str) -> str:
    match = re.fullmatch(r"\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```\s*", text, flags=re.DOTALL)
    return match.group(1) if match else text


def _reference(row: dict[str, Any], column: str, columns: dict[str, str]) -> str:
    value = row.get(columns.get(column, column))
    if value is None:
        raise ScoreError(f"reference column '{column}' is null")
    return value if isinstance(value, str) else str(value)


def build_scorer(scorer: dict[str, Any], columns: dict[str, str]) -> Callable[[dict[str, Any]], Any]:
    """A function output row -> score (raises ScoreError). `columns` maps input names to output names."""
    kind = scorer["kind"]
    if kind == "exact_match":
        steps = scorer["normalize"]
        return lambda row: normalize(row["generated_text"], steps) == normalize(
            _reference(row, scorer["reference_column"], columns), steps)
    if kind == "contains":
        steps = scorer["normalize"]
        if scorer.get("text") is not None:
            needle = normalize(scorer["text"], steps)
            return lambda row: needle in normalize(row["generated_text"], steps)
        return lambda row: normalize(_reference(row, scorer["reference_column"], columns), steps) in normalize(
            row["generated_text"], steps)
    if kind == "regex":
        pattern = re.compile(scorer["pattern"], re.IGNORECASE if scorer["ignore_case"] else 0)
        match = pattern.fullmatch if scorer["full_match"] else pattern.search
        return lambda row: match(row["generated_text"]) is not None
    if kind in ("json_valid", "json_schema"):
        return _json_scorer(scorer)
    if kind == "chrf":
        from sacrebleu.metrics import CHRF

        metric = CHRF()
        return lambda row: float(metric.sentence_score(
            row["generated_text"], [_reference(row, scorer["reference_column"], columns)]).score)
    if kind == "python":
        return _python_scorer(scorer)
    raise ValueError(f"scorer kind {kind} is not scored row by row")


def _json_scorer(scorer: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    validator = None
    if scorer["kind"] == "json_schema":
        import jsonschema

        schema = scorer["schema"]
        validator = jsonschema.validators.validator_for(schema)(schema)

    def score(row: dict[str, Any]) -> bool:
        text = row["generated_text"]
        if scorer["strip_code_fence"]:
            text = strip_code_fence(text)
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return validator is None or validator.is_valid(value)

    return score


def load_function(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"python scorer {path}: cannot import {module_name} ({exc})") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ImportError(f"python scorer {path}: {module_name} has no function {attr}")
    return function


def _python_scorer(scorer: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    function = load_function(scorer["function"])
    options = dict(scorer.get("options") or {})
    boolean = scorer["returns"] == "boolean"

    def score(row: dict[str, Any]) -> Any:
        try:
            value = function(dict(row), **options)
        except Exception as exc:
            raise ScoreError(f"{scorer['function']} raised {type(exc).__name__}: {exc}") from None
        if value is None:
            return None
        if boolean:
            if type(value).__name__ not in ("bool", "bool_"):  # Python's or numpy's
                raise ScoreError(f"{scorer['function']} returned {type(value).__name__}, expected bool")
            return bool(value)
        if type(value).__name__ in ("bool", "bool_") or not isinstance(value, numbers.Real) \
                or not math.isfinite(float(value)):
            raise ScoreError(f"{scorer['function']} returned {value!r}, expected a finite number")
        return float(value)

    return score


def check_scorers(scorers: list[dict[str, Any]], output_columns: list[str], input_columns: list[str]) -> list[str]:
    """Problems found before any engine starts: python scorers that do not import, rubrics naming no column."""
    from llmbatch.pipelines.render import template_fields

    problems = []
    known = set(output_columns) | set(input_columns)
    for number, scorer in enumerate(scorers):
        where = f"scoring.{number}"
        if scorer["kind"] == "python":
            try:
                load_function(scorer["function"])
            except ImportError as exc:
                problems.append(f"{where}.function: {exc} (the module must be importable where the job runs, "
                                "e.g. through PYTHONPATH or an installed package)")
        if scorer["kind"] == "judge":
            missing = [f for f in template_fields(scorer["rubric"]) if f not in known]
            if missing:
                problems.append(f"{where}.rubric: no column {', '.join(repr(m) for m in missing)}; "
                                f"the rubric can use {', '.join(sorted(known))}")
    return problems


def add_error(row: dict[str, Any], message: str) -> None:
    row["error"] = f"{row['error']}; {message}" if row.get("error") else message


class ScoreStage:
    """Ray Data stage (actor): builds the row scorers once, then scores each batch of output rows."""

    def __init__(self, scorers: list[dict[str, Any]], columns: dict[str, str]):
        self.scorers = [(s["name"], build_scorer(s, columns)) for s in scorers if s["kind"] not in ENGINE_KINDS]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            score_row(row, self.scorers)
        return pa.Table.from_pylist(rows)


def score_row(row: dict[str, Any], scorers: list[tuple[str, Callable[[dict[str, Any]], Any]]]) -> None:
    generated = row.get("generated_text") is not None
    for name, scorer in scorers:
        column = score_column(name)
        row[column] = None
        if not generated:
            continue
        try:
            row[column] = scorer(row)
        except ScoreError as exc:
            add_error(row, f"{column}: {exc}")
        except Exception as exc:  # a scorer library choking on odd output is still one row's problem
            add_error(row, f"{column}: {type(exc).__name__}: {exc}")
