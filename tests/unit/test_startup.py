"""Start-up decisions and where a run's time went: in-process CPU engines, their threads, a KV cache sized to
the job, the manifest's timings, and the in-process engine's request handling (with a stand-in LLMEngine)."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from llmbatch.cluster.resources import (
    CONCURRENT_BATCHES, KV_HEADROOM, KV_SPARE_TOKENS, PROMPT_TOKENS_ALLOWANCE, cpu_kv_cache_bytes, engine_in_process,
    replica_threads,
)
from llmbatch.pipelines.infer import EngineSettings, engine_env
from llmbatch.pipelines.inprocess_engine import IN_PROCESS_ENV, InProcessEngine
from llmbatch.pipelines.timings import run_timings, startup_line
from llmbatch.run_manifest import Timings

GIB = 1 << 30


def test_cpu_replicas_run_vllm_in_process_and_gpu_replicas_do_not():
    assert engine_in_process("cpu", 1)
    assert not engine_in_process("gpu", 1)
    assert not engine_in_process("gpu", 4)


def test_cpu_replicas_share_the_nodes_cores_and_gpu_replicas_keep_rays_threads():
    assert replica_threads("cpu", 2, 1) == 2
    assert replica_threads("cpu", 8, 3) == 2
    assert replica_threads("cpu", 2, 4) == 1
    assert replica_threads("gpu", 64, 8) is None


def _plan(**overrides) -> EngineSettings:
    values = dict(model_path="/m", engine_kwargs={}, sampling_params={"max_tokens": 8}, replicas=(1, 1),
                  batch_size=4, bundle_per_replica={"CPU": 1.0})
    values.update(overrides)
    return EngineSettings(**values)


def test_engine_env_sets_in_process_mode_and_threads_before_vllm_is_imported():
    assert engine_env(_plan(in_process=True, threads=2)) == {**IN_PROCESS_ENV, "OMP_NUM_THREADS": "2"}
    assert engine_env(_plan(in_process=False, threads=None)) == {}


def _with_headroom(tokens: int) -> int:
    return int(tokens * KV_HEADROOM + KV_SPARE_TOKENS)


def test_kv_cache_holds_the_rows_in_flight_at_prompt_allowance_plus_max_tokens():
    per_token = 46080  # SmolLM2-135M in float32
    size = cpu_kv_cache_bytes(per_token, 2048, max_tokens=64, rows=12, batch_size=16, memory_share_bytes=7 * GIB)
    assert size == _with_headroom(max(12 * (64 + PROMPT_TOKENS_ALLOWANCE), 2048)) * per_token
    # never more rows than a replica holds at once
    big = cpu_kv_cache_bytes(per_token, 2048, max_tokens=64, rows=10**6, batch_size=4, memory_share_bytes=7 * GIB)
    assert big == _with_headroom(4 * CONCURRENT_BATCHES * (64 + PROMPT_TOKENS_ALLOWANCE)) * per_token


def test_kv_cache_always_fits_one_longest_sequence_and_keeps_the_share_when_it_would_not_be_smaller():
    assert cpu_kv_cache_bytes(1000, 4096, max_tokens=1, rows=1, batch_size=1,
                              memory_share_bytes=GIB) == _with_headroom(4096) * 1000
    assert cpu_kv_cache_bytes(46080, 32768, max_tokens=4096, rows=10**6, batch_size=64,
                              memory_share_bytes=GIB) is None


def test_run_timings_split_a_run_into_phases():
    marks = {"process": 100.0, "started": 101.5, "started_ray": 102.0, "ray_ready": 105.0, "pre_pass_done": 106.0,
             "dataset_started": 106.5, "dataset_done": 131.0, "judges_done": None, "commit_done": 131.5}
    replicas = [{"engine_ready_at": 121.0, "first_batch_at": 121.2, "last_batch_at": 130.0},
                {"engine_ready_at": 123.0, "first_batch_at": 123.5, "last_batch_at": 130.5}]
    timings = run_timings(marks, replicas)
    assert timings == {"launch": 1.5, "prepare": 0.5, "ray_start": 3.0, "pre_pass": 1.0, "engine_start": 14.5,
                       "first_row": 19.7, "generation": 9.5, "write": 0.5, "judges": None, "commit": 0.5}
    line = startup_line(Timings.model_validate(timings))
    assert line == "19.7 s to the first rows (Ray 3.0, pre-pass 1.0, engines 14.5), generation 9.5 s"


def test_a_run_that_started_no_engine_has_no_engine_phases():
    marks = {"process": 1.0, "started": 2.0, "started_ray": 2.5, "ray_ready": 4.0, "pre_pass_done": 5.0,
             "commit_done": 5.5}
    timings = run_timings(marks, [])
    assert timings["engine_start"] is None and timings["generation"] is None and timings["first_row"] is None
    assert timings["commit"] == 0.5
    assert startup_line(Timings.model_validate(timings)) is None


class StandInEngine:
    """LLMEngine's add_request / step / has_unfinished_requests: each request finishes after `steps` steps."""

    def __init__(self, steps: int = 2, refuse: str | None = None, fail_at_step: int | None = None):
        self.steps, self.refuse, self.fail_at_step = steps, refuse, fail_at_step
        self.pending: dict[str, int] = {}
        self.stepped = 0
        self.thread: threading.Thread | None = None
        self.engine_core = SimpleNamespace(shutdown=lambda: None)

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.thread = threading.current_thread()
        if request_id == self.refuse:
            raise ValueError(f"prompt of {request_id} is too long")
        self.pending[request_id] = self.steps

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        self.stepped += 1
        if self.fail_at_step is not None and self.stepped >= self.fail_at_step:
            raise RuntimeError("worker died")
        finished = []
        for request_id in list(self.pending):
            self.pending[request_id] -= 1
            if self.pending[request_id] == 0:
                del self.pending[request_id]
                finished.append(SimpleNamespace(request_id=request_id, finished=True, text=f"out-{request_id}"))
        return finished


async def _generate(engine: InProcessEngine, request_id: str):
    async for output in engine.generate(request_id, {"prompt_token_ids": [1, 2]}, SimpleNamespace(output_kind=None)):
        return output


def _run_all(engine: InProcessEngine, ids: list[str]):
    async def main():
        return await asyncio.gather(*(_generate(engine, i) for i in ids), return_exceptions=True)
    return asyncio.run(main())


def test_in_process_engine_answers_every_request_from_one_stepping_thread():
    stand_in = StandInEngine()
    engine = InProcessEngine(lambda: stand_in)
    try:
        outputs = _run_all(engine, [f"r{i}" for i in range(20)])
        assert [o.text for o in outputs] == [f"out-r{i}" for i in range(20)]
        assert stand_in.thread is not threading.current_thread()
        assert stand_in.stepped < 20  # requests were batched into shared steps
    finally:
        engine.shutdown()


def test_a_refused_request_fails_alone():
    engine = InProcessEngine(lambda: StandInEngine(refuse="bad"))
    try:
        good, bad, other = _run_all(engine, ["good", "bad", "other"])
        assert good.text == "out-good" and other.text == "out-other"
        assert isinstance(bad, ValueError) and "too long" in str(bad)
    finally:
        engine.shutdown()


def test_a_failed_step_is_fatal_for_waiting_and_later_requests():
    from vllm.v1.engine.exceptions import EngineDeadError

    engine = InProcessEngine(lambda: StandInEngine(fail_at_step=1))
    first = _run_all(engine, ["a", "b"])
    assert all(isinstance(e, EngineDeadError) and "worker died" in str(e) for e in first)
    later = _run_all(engine, ["c"])
    assert isinstance(later[0], EngineDeadError)


def test_an_engine_that_cannot_be_built_fails_the_constructor():
    def broken():
        raise RuntimeError("not enough memory for the KV cache")

    with pytest.raises(RuntimeError, match="KV cache"):
        InProcessEngine(broken)
