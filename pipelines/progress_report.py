"""A pass's progress counter summed up for people: rows done, speed, each engine replica's state.

The same summary makes the `progress` log lines and the live view; a cluster run's submitter reads it back
from those lines (`PassProgress.from_event`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

STARTING, READY, GENERATING = "starting", "ready", "generating"


@dataclass(frozen=True)
class ReplicaState:
    replica: str
    node: str
    state: str                      # starting | ready | generating
    rows: int = 0
    output_tok_s: float | None = None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> "ReplicaState":
        """One replica's entry of a progress counter's snapshot."""
        state = GENERATING if entry.get("first_batch_at") else READY if entry.get("engine_ready_at") else STARTING
        return cls(replica=str(entry.get("replica") or "?")[:8], node=str(entry.get("node_id") or "?")[:8],
                   state=state, rows=int(entry.get("rows") or 0), output_tok_s=entry.get("output_tokens_per_second"))


@dataclass(frozen=True)
class PassProgress:
    rows_total: int
    rows_done: int = 0          # written, or finished by the engines when more (see summarize)
    rows_written: int = 0
    rows_error: int = 0
    output_tok_s: float | None = None
    generating_s: float | None = None   # since the first batch began
    replicas_ready: int = 0
    replicas_seen: int = 0
    replicas: tuple[ReplicaState, ...] = ()

    @property
    def percent(self) -> float:
        return round(100 * self.rows_done / max(1, self.rows_total), 1)

    def seconds_left(self) -> float | None:
        """At the rate rows were finished since the first batch began; None before the first or after the last."""
        if not self.generating_s or not self.rows_done or self.rows_done >= self.rows_total:
            return None
        return max(0.0, (self.rows_total - self.rows_done) * self.generating_s / self.rows_done)

    def finished(self, rows_ok: int, rows_error: int) -> "PassProgress":
        return replace(self, rows_done=rows_ok + rows_error, rows_written=rows_ok + rows_error, rows_error=rows_error)

    def log_fields(self, replicas_shown: int = 0) -> dict[str, Any]:
        """The fields of a `progress` log line; with `replicas_shown`, the first replicas' states too."""
        fields: dict[str, Any] = {"rows_done": self.rows_done, "rows_written": self.rows_written,
                                  "rows_total": self.rows_total, "percent": self.percent,
                                  "rows_error": self.rows_error, "replicas_ready": self.replicas_ready,
                                  "output_tok_s": self.output_tok_s}
        if replicas_shown:
            fields.update(generating_s=self.generating_s, replicas_seen=self.replicas_seen,
                          replicas=[asdict(r) for r in self.replicas[:replicas_shown]])
        return fields

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> "PassProgress":
        """A `progress` log event read back (fields it lacks take their defaults)."""
        def number(key: str, default=0):
            value = event.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

        replicas = tuple(ReplicaState(replica=str(r.get("replica") or "?"), node=str(r.get("node") or "?"),
                                      state=str(r.get("state") or STARTING), rows=int(r.get("rows") or 0),
                                      output_tok_s=r.get("output_tok_s"))
                         for r in event.get("replicas") or [] if isinstance(r, dict))
        return cls(rows_total=int(number("rows_total")), rows_done=int(number("rows_done")),
                   rows_written=int(number("rows_written")), rows_error=int(number("rows_error")),
                   output_tok_s=number("output_tok_s", None), generating_s=number("generating_s", None),
                   replicas_ready=int(number("replicas_ready")),
                   replicas_seen=int(number("replicas_seen", len(replicas))), replicas=replicas)


def summarize(snapshot: dict[str, Any], total: int, now: float) -> PassProgress:
    """A ProgressCounter snapshot at `now`. Rows count as done when an engine replica finishes their batch: they
    reach the last step, where they are counted as written, only once the engine has finished its whole read
    task, so on a large input the written count lags far behind."""
    entries = snapshot.get("replicas") or []
    generated = sum(int(e.get("rows") or 0) for e in entries)
    tokens = max(int(snapshot.get("generated_tokens") or 0), sum(int(e.get("generated_tokens") or 0) for e in entries))
    first = min((e["first_batch_at"] for e in entries if e.get("first_batch_at")),
                default=snapshot.get("first_row_at"))
    busy = max(1e-6, now - first) if first else None
    return PassProgress(
        rows_total=total, rows_done=max(int(snapshot.get("rows") or 0), generated),
        rows_written=int(snapshot.get("rows") or 0), rows_error=int(snapshot.get("errors") or 0),
        output_tok_s=round(tokens / busy, 1) if busy else None, generating_s=round(busy, 1) if busy else None,
        replicas_ready=sum(1 for e in entries if e.get("engine_ready_at")), replicas_seen=len(entries),
        replicas=tuple(ReplicaState.of(e) for e in entries))
