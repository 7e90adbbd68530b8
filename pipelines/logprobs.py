"""Logprob arithmetic over what the engine returned: cumulative and mean logprob, perplexity, finish reasons."""
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


def perplexity(mean: float | None) -> float | None:
    if mean is None:
        return None
    try:
        return math.exp(-mean)
    except OverflowError:
        return math.inf


def top_logprobs(logprobs: Sequence[Any] | None, k: int) -> list[list[dict[str, Any]]] | None:
    """The K most likely {token, logprob} at each generated position, most likely first."""
    if not logprobs:
        return None
    positions = []
    for step in logprobs:
        entries = [e for e in (step or {}).values() if isinstance(e, dict) and e.get("logprob") is not None]
        entries.sort(key=lambda e: (e.get("rank") or 10**9, -e["logprob"]))
        positions.append([{"token": e.get("decoded_token"), "logprob": max(float(e["logprob"]), -1e9)}
                          for e in entries[:k]])
    return positions


def completion_logprob(prompt_logprobs: Sequence[Any] | None, token_ids: Sequence[int],
                       completion_tokens: int) -> float | None:
    """Sum of the logprobs of the last `completion_tokens` prompt tokens, each given everything before it."""
    if not prompt_logprobs or completion_tokens <= 0 or len(prompt_logprobs) != len(token_ids):
        return None
    total = 0.0
    for token, step in zip(token_ids[-completion_tokens:], prompt_logprobs[-completion_tokens:]):
        entry = (step or {}).get(int(token))
        if entry is None:
            entry = (step or {}).get(str(int(token)))
        if entry is None:
            return None
        value = entry["logprob"] if isinstance(entry, dict) else float(entry)
        total += max(float(value), -1e9)
    return total


def finish_reason(num_input: int, num_generated: int, max_tokens: int, max_model_len: int | None) -> str:
    """`length` when the generation hit max_tokens or the context limit, else `stop` (EOS or a stop string)."""
    if num_generated >= max_tokens:
        return "length"
    if max_model_len is not None and num_input + num_generated >= max_model_len:
        return "length"
    return "stop"
