"""The shape of `_manifest.json`, a committed run's record of itself (schema_version 1).

A field with a default is one that manifests of earlier llmbatch versions lack: the default says what such a
run had (no cache, no judges) or that it was not recorded (None). Keys this version does not know are kept.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)


class Versions(_Section):
    llmbatch: str | None
    ray: str | None
    vllm: str | None


class ModelInfo(_Section):
    source: str
    path: str
    fingerprint: str


class Engine(_Section):
    """The replicas' engine settings; vLLM arguments set only on some runs (max_model_len, enforce_eager,
    trust_remote_code, kv_cache_memory_bytes) are kept as extra keys, absent when not set."""
    accelerator: str
    replicas: int | list[int]
    dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool


class InputFile(_Section):
    path: str
    size: int
    rows: int | None


class Input(_Section):
    files: list[InputFile]


class Output(_Section):
    path: str
    files: list[str]


class Rows(_Section):
    in_: int = Field(alias="in")
    out: int
    ok: int
    error: int
    duplicate_ids: int | None = None


class ErrorKind(_Section):
    kind: str
    rows: int


class ErrorRows(_Section):
    path: str
    rows: int
    kinds: list[ErrorKind]


class Resumed(_Section):
    rows_skipped: int
    parts_kept: int
    parts_removed: list[str]
    automatic: bool = False


class CacheUsed(_Section):
    path: str
    used: Literal[True]
    namespace: str
    hits: int
    hit_rate: float
    entries_written: int


class CacheNotUsed(_Section):
    path: str
    used: Literal[False]
    reason: str


Cache = Annotated[Union[CacheUsed, CacheNotUsed], Field(discriminator="used")]


class Tokens(_Section):
    input: int
    generated: int


class Timings(_Section):
    """Seconds per phase of the run (see pipelines.timings.run_timings); None for a phase that did not happen."""
    launch: float | None
    prepare: float | None
    ray_start: float | None
    pre_pass: float | None
    engine_start: float | None
    first_row: float | None
    generation: float | None
    write: float | None
    judges: float | None
    commit: float | None


class JudgePass(_Section):
    wall_seconds: float
    replicas: int
    devices: int | None = None
    model: str


class Cost(_Section):
    usd: float
    generation_usd: float | None = None
    judges_usd: float | None = None
    devices: int
    device: str
    hourly_usd_per_device: float


class Manifest(_Section):
    schema_version: int = 1
    run_id: str
    job: str
    status: str
    problems: list[str]
    started_at: str
    finished_at: str
    spec: dict[str, Any]
    versions: Versions
    model: ModelInfo
    engine: Engine
    replicas: list[dict[str, Any]] = Field(default_factory=list)
    input: Input
    output: Output
    rows: Rows
    errors: ErrorRows | None = None
    resumed: Resumed | None = None
    cache: Cache | None = None
    tokens: Tokens
    wall_seconds: float
    startup_seconds: float | None = None
    timings: Timings | None = None
    plan: dict[str, Any] | None = None
    judges: dict[str, JudgePass] = Field(default_factory=dict)
    generation_seconds: float | None = None
    output_tokens_per_second: float | None
    cost: Cost | None = None
    summary: str | None = None

    @property
    def measured_seconds(self) -> float:
        """The generation's own seconds (judge passes excluded); the wall time for runs that predate the split."""
        return self.generation_seconds if self.generation_seconds is not None else self.wall_seconds
