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
import signal
import string
import threading
from typing import Any, Callable

import pyarrow as pa

from llmbatch.pipelines.columns import StageColumns

SCORE_PREFIX = "score_"
JUDGE_TEXT_SUFFIX = "_raw"


class ScoreError(ValueError):
    """This scorer cannot score this row; the message goes into the row's `error`."""


def score_column(name: str) -> str:
    return SCORE_PREFIX + name


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


RowScorer = Callable[[dict[str, Any]], Any]


def exact_match(reference_column: str, steps: list[str], columns: dict[str, str]) -> RowScorer:
    return lambda row: normalize(row["generated_text"], steps) == normalize(
        _reference(row, reference_column, columns), steps)


def contains(reference_column: str | None, text: str | None, steps: list[str], columns: dict[str, str]) -> RowScorer:
    if text is not None:
        needle = normalize(text, steps)
        return lambda row: needle in normalize(row["generated_text"], steps)
    return lambda row: normalize(_reference(row, reference_column, columns), steps) in normalize(
        row["generated_text"], steps)


REGEX_TIMEOUT_SECONDS = 1.0


def regex(pattern: str, full_match: bool, ignore_case: bool) -> RowScorer:
    """The `regex` module's engine (the `re` syntax, and a time limit: a pattern that backtracks without end
    on one output costs that row its score, not the job)."""
    import regex as regex_engine

    compiled = regex_engine.compile(pattern, regex_engine.IGNORECASE if ignore_case else 0)
    match = compiled.fullmatch if full_match else compiled.search

    def score(row: dict[str, Any]) -> bool:
        try:
            return match(row["generated_text"], timeout=REGEX_TIMEOUT_SECONDS) is not None
        except TimeoutError:
            raise ScoreError(f"the pattern took longer than {REGEX_TIMEOUT_SECONDS:g} s on this output") from None

    return score


def json_parses(strip_fence: bool, schema: dict[str, Any] | None = None) -> RowScorer:
    """True when the output parses as JSON (and, given a schema, matches it)."""
    validator = None
    if schema is not None:
        import jsonschema

        validator = jsonschema.validators.validator_for(schema)(schema)

    def score(row: dict[str, Any]) -> bool:
        text = row["generated_text"]
        if strip_fence:
            text = strip_code_fence(text)
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return validator is None or validator.is_valid(value)

    return score


def chrf(reference_column: str, columns: dict[str, str]) -> RowScorer:
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return lambda row: float(metric.sentence_score(
        row["generated_text"], [_reference(row, reference_column, columns)]).score)


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


class _TimedOut(BaseException):
    """Raised into a python scorer that ran past its time (a BaseException, so its own `except Exception`
    does not swallow it)."""


def call_with_timeout(function, seconds: float, *args, **kwargs):
    """function(*args, **kwargs), stopped after `seconds` (TimeoutError). On the main thread a timer signal
    interrupts it; elsewhere it runs on a thread of its own that is left behind when it overruns."""
    if threading.current_thread() is threading.main_thread():
        def interrupt(signum, frame):
            raise _TimedOut()

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return function(*args, **kwargs)
        except _TimedOut:
            raise TimeoutError() from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="llmbatch-python-scorer")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def python_function(path: str, options: dict[str, Any], boolean: bool, timeout_seconds: float = 10.0) -> RowScorer:
    """The user's function(row, **options), its answer checked against the declared type; a call that runs
    past `timeout_seconds` is stopped and costs that row its score."""
    function = load_function(path)
    options = dict(options)

    def score(row: dict[str, Any]) -> Any:
        try:
            value = call_with_timeout(function, timeout_seconds, dict(row), **options)
        except TimeoutError:
            raise ScoreError(f"{path} took longer than {timeout_seconds:g} s (timeout_seconds)") from None
        except Exception as exc:
            raise ScoreError(f"{path} raised {type(exc).__name__}: {exc}") from None
        if value is None:
            return None
        if boolean:
            if type(value).__name__ not in ("bool", "bool_"):  # Python's or numpy's
                raise ScoreError(f"{path} returned {type(value).__name__}, expected bool")
            return bool(value)
        if type(value).__name__ in ("bool", "bool_") or not isinstance(value, numbers.Real) \
                or not math.isfinite(float(value)):
            raise ScoreError(f"{path} returned {value!r}, expected a finite number")
        return float(value)

    return score


def failing(message: str) -> RowScorer:
    """A scorer that cannot score (its settings are not there where it runs): each row gets the message."""
    def score(row: dict[str, Any]) -> Any:
        raise ScoreError(message)

    return score


def add_error(row: dict[str, Any], message: str) -> None:
    row["error"] = f"{row['error']}; {message}" if row.get("error") else message


class ScoreStage:
    """Ray Data stage (actor): builds the row scorers once, then scores each batch of output rows.

    `scorers`: the row-by-row scorer specs (pipelines/scorer_specs.py), each building its own function."""

    def __init__(self, scorers: list, columns: dict[str, str]):
        self.scorers = [(s.name, s.build(columns)) for s in scorers]

    @staticmethod
    def columns_for(scorers: list) -> StageColumns:
        return StageColumns("score", needs=("generated_text", "error"), adds=tuple(s.column for s in scorers))

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
