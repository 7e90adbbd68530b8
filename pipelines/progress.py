"""Live run counters: stages report batches to a small actor; the driver reads it to show progress,
and it exports Ray metrics (tagged with run_id) for the dashboard."""
from __future__ import annotations

import time

import ray


def progress_actor_name(run_id: str) -> str:
    return f"llmbatch-progress-{run_id}"


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self, run_id: str):
        from ray.util.metrics import Counter, Gauge

        tags = {"run_id": run_id}
        self.rows = 0
        self.errors = 0
        self.generated_tokens = 0
        self.first_row_at: float | None = None
        self.replicas: dict[str, dict] = {}
        self._rows_metric = Counter("llmbatch_rows_done", "Output rows written", tag_keys=("run_id",))
        self._errors_metric = Counter("llmbatch_rows_failed", "Output rows with an error", tag_keys=("run_id",))
        self._tokens_metric = Counter("llmbatch_output_tokens", "Generated tokens", tag_keys=("run_id",))
        self._rate_metric = Gauge("llmbatch_output_tokens_per_second", "Generated tokens per second since the "
                                  "first row", tag_keys=("run_id",))
        for metric in (self._rows_metric, self._errors_metric, self._tokens_metric, self._rate_metric):
            metric.set_default_tags(tags)

    def add(self, rows: int, errors: int, generated_tokens: int) -> None:
        now = time.time()
        if self.first_row_at is None:
            self.first_row_at = now
        self.rows += rows
        self.errors += errors
        self.generated_tokens += generated_tokens
        if rows:
            self._rows_metric.inc(rows)
        if errors:
            self._errors_metric.inc(errors)
        if generated_tokens:
            self._tokens_metric.inc(generated_tokens)
        self._rate_metric.set(self.generated_tokens / max(1e-6, now - self.first_row_at))

    def replica_started(self, replica: str, node: str, constructing_at: float | None = None,
                        ready_at: float | None = None) -> None:
        """A replica's engine is ready: it began building it at `constructing_at` (its process and imports
        came before) and could take rows from `ready_at`."""
        entry = self._replica(replica)
        entry["node_id"] = node
        entry["engine_constructing_at"] = constructing_at
        entry["engine_ready_at"] = ready_at

    def replica_batch(self, replica: str, rows: int, generated_tokens: int, started_at: float,
                      ended_at: float) -> None:
        entry = self._replica(replica)
        entry["rows"] += rows
        entry["generated_tokens"] += generated_tokens
        entry["first_batch_at"] = min(entry["first_batch_at"] or started_at, started_at)
        entry["last_batch_at"] = max(entry["last_batch_at"] or ended_at, ended_at)

    def _replica(self, replica: str) -> dict:
        return self.replicas.setdefault(replica, {"replica": replica, "node_id": None, "rows": 0,
                                                  "generated_tokens": 0, "engine_constructing_at": None,
                                                  "engine_ready_at": None, "first_batch_at": None,
                                                  "last_batch_at": None})

    def snapshot(self) -> dict:
        replicas = []
        for entry in self.replicas.values():
            span = (entry["last_batch_at"] or 0) - (entry["first_batch_at"] or 0)
            replicas.append({**entry, "output_tokens_per_second": round(entry["generated_tokens"] / span, 3)
                             if span > 0 else None})
        return {"rows": self.rows, "errors": self.errors, "generated_tokens": self.generated_tokens,
                "first_row_at": self.first_row_at, "replicas": replicas}
