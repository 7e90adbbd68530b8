"""The row contract: every column a row carries between the stages, and every marker, in one place.

A row's path (pipeline.py): read -> render -> cache lookup -> engine -> output -> scorers -> judges -> write.
Columns whose name starts with `_` never reach the output parquet; the rest are the output schema's
(DESIGN.md, schema.py).

| column              | added by                  | read by                       |
|---------------------|---------------------------|-------------------------------|
| ID_COLUMN           | read                      | every stage, resume, cache    |
| INPUT_COLUMN        | read (the input's fields) | render, output, judges        |
| ROW_ERROR_COLUMN    | read, render, cache       | engine (passes the row by)    |
| PROMPT_COLUMN       | render (chat messages/text) | engine                      |
| TOKENS_COLUMN       | render (prompt token ids) | engine, output                |
| CHOICES_COLUMN      | render (task: score)      | engine, output                |
| RENDERED_PROMPT     | engine (the exact text)   | output                        |
| HIT_COLUMN          | cache lookup              | engine (passes hits by), output |
| INFERENCE_ERROR     | engine (ray.data.llm's)   | output                        |
| CHOICE_RESULTS_COLUMN | engine (task: score)    | output                        |
| TOKEN_LOGPROBS_COLUMN | seq2seq engine          | output                        |
| JUDGED_ROW          | judge render              | judge output                  |
| CACHED_COLUMN       | output (jobs with a cache) | the user                     |

ray.data.llm's engine stage skips every row whose INFERENCE_ERROR is set and copies the value through; two
markers use that to carry rows past the engine without generating for them:
- HIT_MARKER: the row's result came from the result cache (HIT_COLUMN holds it); output clears the error.
- JUDGE_SKIPPED: the row failed before its judge; the judge's score stays empty and the first error stays.

Each stage declares what it reads and adds as a StageColumns next to its code; pipeline.py checks the chain
of declarations (check_chain) whenever it composes a pass, and the stages that check a batch use theirs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

ID_COLUMN = "id"
INPUT_COLUMN = "_input"
ROW_ERROR_COLUMN = "_row_error"
PROMPT_COLUMN = "prompt"
TOKENS_COLUMN = "tokenized_prompt"
CHOICES_COLUMN = "_choices"                 # task: score - [{text, tokens}] completions to score
RENDERED_PROMPT = "_rendered_prompt"
HIT_COLUMN = "_cached_result"               # a hit's result columns as JSON; null for a miss
INFERENCE_ERROR = "__inference_error__"     # ray.data.llm's per-row error column
CHOICE_RESULTS_COLUMN = "_choice_results"   # task: score - [{logprob, num_tokens}] per completion
TOKEN_LOGPROBS_COLUMN = "token_logprobs"    # seq2seq engine: each generated token's own logprob
JUDGED_ROW = "_judged_row"                  # the output row being judged, carried through the engine
CACHED_COLUMN = "cached"                    # output: the row's result came from the cache

# What the engine stages (vLLM's and the seq2seq one) add for every row, whatever the task.
ENGINE_RESULT_COLUMNS = ("generated_text", "num_input_tokens", "num_generated_tokens")

HIT_MARKER = "__cached__"
JUDGE_SKIPPED = "not judged"

# A row whose id repeats an earlier row's gets this error, followed by where it sits in the input.
DUPLICATE_ID_ERROR = "duplicate id "


@dataclass(frozen=True)
class StageColumns:
    """The columns one stage reads from a row and those it adds. A stage that builds a new row (`keeps`
    False) passes on only what it adds."""
    stage: str
    needs: tuple[str, ...] = ()
    adds: tuple[str, ...] = ()
    keeps: bool = True

    def check(self, names: Iterable[str]) -> None:
        """Refuse a batch that lacks a column this stage needs."""
        present = set(names)
        missing = [c for c in self.needs if c not in present]
        if missing:
            raise KeyError(f"{self.stage}: missing input column(s) {missing}")


def check_chain(stages: list[StageColumns]) -> None:
    """Each stage finds what it needs among the columns the stages before it added, so a pass composed in the
    wrong order, or a stage that stopped adding a column a later one reads, fails when it is built."""
    present: set[str] = set()
    for stage in stages:
        missing = [c for c in stage.needs if c not in present]
        if missing:
            raise RuntimeError(f"the {stage.stage} stage needs column(s) {', '.join(missing)}, which no stage "
                               f"before it adds (they add: {', '.join(sorted(present)) or 'nothing'})")
        present = (present if stage.keeps else set()) | set(stage.adds)


# Row keys are 128-bit hashes: among n keys the chance that any two collide is about n^2 / 2^129 (the birthday
# bound), 1.5e-21 at a billion rows, so a resume never takes one row for another in practice.
KEY_BYTES = 16
KEY_DTYPE = np.dtype(f"V{KEY_BYTES}")
NO_KEY = bytes(KEY_BYTES)


def stable_hash(text: str) -> bytes:
    """A 128-bit hash that is the same in every process and run."""
    return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()


def key_array(keys: Iterable[bytes]) -> np.ndarray:
    return np.array(list(keys), dtype=KEY_DTYPE)


def row_key(row_id: str, error: str | None) -> str:
    """What a row is known by across attempts: its id, or for a repeated id its error (which names its place)."""
    return error if error and error.startswith(DUPLICATE_ID_ERROR) else row_id


def row_key_hashes(ids: list[str], errors: list[str | None]) -> np.ndarray:
    return key_array([stable_hash(row_key(i, e)) for i, e in zip(ids, errors)])


def is_done(hashes: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Which of `hashes` are in the sorted array `done`."""
    if not len(done):
        return np.zeros(len(hashes), dtype=bool)
    at = np.searchsorted(done, hashes).clip(max=len(done) - 1)
    return done[at] == hashes
