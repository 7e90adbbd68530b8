"""A team's own scorer, imported by path (`row_scorers:words_per_answer`) inside the Ray stage."""
from __future__ import annotations


def words_per_answer(row: dict, cap: int = 1000) -> float:
    if row.get("qid") == "math-2plus2":
        raise ValueError("this scorer refuses arithmetic")
    return float(min(cap, len(row["generated_text"].split())))
