"""Intrinsic scores of a generation, computed from what the engine returned."""
from __future__ import annotations

import math
from typing import Any, Sequence


def cumulative_logprob(generated_tokens: Sequence[int] | None, logprobs: Sequence[Any] | None) -> float | None:
    """Sum of each generated token's own logprob (vLLM returns {token_id: {logprob, rank, ...}} per step)."""
    if not generated_tokens or not logprobs or len(logprobs) != len(generated_tokens):
        return None
    total = 0.0
    for token, step in zip(generated_tokens, logprobs):
        if not step:
            return None
        entry = step.get(int(token)) if isinstance(step, dict) else None
        if entry is None:
            entry = step.get(str(int(token))) if isinstance(step, dict) else None
        if entry is None:
            return None
        value = entry["logprob"] if isinstance(entry, dict) else float(entry)
        if value is None or math.isnan(value):
            return None
        total += max(float(value), -1e9)  # -inf (masked token) would poison sums
    return total


def mean_logprob(cumulative: float | None, num_generated: int | None) -> float | None:
    if cumulative is None or not num_generated:
        return None
    return cumulative / num_generated


def finish_reason(num_input: int, num_generated: int, max_tokens: int, max_model_len: int | None) -> str:
    """`length` when the generation hit max_tokens or the context limit, else `stop` (EOS or a stop string)."""
    if num_generated >= max_tokens:
        return "length"
    if max_model_len is not None and num_input + num_generated >= max_model_len:
        return "length"
    return "stop"
