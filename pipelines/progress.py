"""Live run counters: stages report batches to a tiny actor, the driver reads it to show progress."""
from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self):
        self.rows = 0
        self.errors = 0
        self.generated_tokens = 0
        self.first_row_at: float | None = None

    def add(self, rows: int, errors: int, generated_tokens: int) -> None:
        if self.first_row_at is None:
            self.first_row_at = time.time()
        self.rows += rows
        self.errors += errors
        self.generated_tokens += generated_tokens

    def snapshot(self) -> dict:
        return {"rows": self.rows, "errors": self.errors, "generated_tokens": self.generated_tokens,
                "first_row_at": self.first_row_at}
