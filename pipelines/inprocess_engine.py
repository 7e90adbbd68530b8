"""vLLM's engine core and model worker inside the replica's own process, stepped by one thread.

ray.data.llm's engine is vLLM's AsyncLLM, which always starts the engine core in a second process (and on
vLLM's CPU build, the model worker in a third), each importing vLLM again before the model loads. The
in-process engine (vLLM's LLMEngine without multiprocessing) loads the model in the replica's process and
answers AsyncLLM's `generate` calls, so ray.data.llm's request handling, row errors and fatal-engine
restart work unchanged.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import queue
import threading
from copy import copy
from typing import Any, AsyncIterator, Callable

# Set in the replica's environment before vLLM is imported: vLLM then keeps its engine core and worker in
# this process (LLMEngine's InprocClient, the `uni` executor on CPU).
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


class InProcessEngine:
    """AsyncLLM's `generate` and `shutdown` over a synchronous LLMEngine that one thread owns and steps.

    Requests reach the thread through a queue; each caller awaits its request's final output. When a step
    fails, every waiting request and every later one gets vLLM's EngineDeadError, which ray.data.llm treats
    as fatal: the replica exits and Ray Data starts a new one and retries its batches.
    """

    def __init__(self, build_engine: Callable[[], Any]):
        """`build_engine` makes the LLMEngine; it runs in the stepping thread (see _run)."""
        self._engine = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._dead: BaseException | None = None
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build_engine, built), name="vllm-in-process-engine",
                                        daemon=True)
        self._thread.start()
        built.wait()
        if self._dead is not None:
            raise self._dead

    async def generate(self, request_id: str, prompt: Any, sampling_params, lora_request=None,
                       **_: Any) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        if self._dead is not None:
            raise _engine_dead(self._dead)
        params = copy(sampling_params)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put((request_id, prompt, params, lora_request, loop, future))
        self._wake.set()
        if self._dead is not None:  # the engine died after the check above: nobody will admit this request
            self._fail_inbox(_engine_dead(self._dead))
        yield await future

    async def do_log_stats(self) -> None:
        """Engine statistics are not logged (ray.data.llm calls this after each batch)."""

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        engine_core = getattr(self._engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def _run(self, build_engine: Callable[[], Any], built: threading.Event) -> None:
        # The engine is built in the thread that steps it: torch's OpenMP thread team belongs to the thread
        # that loaded the model, and stepping from another thread ran ~20% slower here.
        try:
            self._engine = build_engine()
        except BaseException as exc:
            self._dead = exc
            return
        finally:
            built.set()
        while not self._stopping:
            self._wake.clear()
            self._admit()
            if not self._engine.has_unfinished_requests():
                self._wake.wait()
                continue
            try:
                outputs = self._engine.step()
            except BaseException as exc:  # the engine is unusable from here on
                self._dead = exc
                self._fail_all(exc)
                return
            for output in outputs:
                if output.finished:
                    waiter = self._waiting.pop(output.request_id, None)
                    if waiter is not None:
                        _settle(waiter, result=output)

    def _admit(self) -> None:
        while True:
            try:
                request_id, prompt, params, lora_request, loop, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._engine.add_request(request_id, prompt, params, lora_request=lora_request)
            except Exception as exc:  # this request alone is refused (too long, bad parameters)
                _settle((loop, future), error=exc)
                continue
            self._waiting[request_id] = (loop, future)

    def _fail_all(self, exc: BaseException) -> None:
        error = _engine_dead(exc)
        for waiter in self._waiting.values():
            _settle(waiter, error=error)
        self._waiting.clear()
        self._fail_inbox(error)

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                *_, loop, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            _settle((loop, future), error=error)


def llm_engine(vllm_config):
    """vLLM's LLMEngine with its engine core and worker in this process."""
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    _eager_logprob_ranks()
    return LLMEngine(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config), log_stats=False,
                     multiprocess_mode=False)


def _eager_logprob_ranks() -> None:
    """vLLM counts each sampled token's logprob rank with a torch.compile'd function. Every job asks for
    logprobs (the output's cumulative_logprob and mean_logprob), so every new engine compiled it again at its
    first batches: 2-3 s of each start on this CPU, for a count that runs as fast uncompiled."""
    from vllm.v1.sample import sampler

    compiled = sampler.batched_count_greater_than
    sampler.batched_count_greater_than = getattr(compiled, "_torchdynamo_orig_callable", None) \
        or getattr(compiled, "__wrapped__", compiled)


def _engine_dead(cause: BaseException) -> Exception:
    from vllm.v1.engine.exceptions import EngineDeadError

    error = EngineDeadError(f"the in-process vLLM engine failed: {type(cause).__name__}: {cause}")
    error.__cause__ = cause
    return error


def _settle(waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future], *, result: Any = None,
            error: BaseException | None = None) -> None:
    loop, future = waiter

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
        pass


def in_process_wrapper_class():
    """ray.data.llm's engine wrapper (request preparation, output rows, LoRA) over an InProcessEngine."""
    from llmbatch.pipelines.ray_llm_seam import vLLMEngineWrapper, vLLMTaskType

    class InProcessEngineWrapper(vLLMEngineWrapper):
        def __init__(self, idx_in_batch_column: str, max_pending_requests: int | None = None,
                     dynamic_lora_loading_path: str | None = None, **kwargs: Any):
            import vllm
            from vllm.usage.usage_lib import UsageContext

            self.request_id = 0
            self.idx_in_batch_column = idx_in_batch_column
            self.task_type = kwargs.pop("task_type", vLLMTaskType.GENERATE)
            if self.task_type != vLLMTaskType.GENERATE:
                raise ValueError(f"the in-process engine generates only, not {self.task_type}")
            self.model = kwargs.pop("model")
            self.model_source = kwargs.pop("model_source")
            kwargs["model"] = self.model_source
            kwargs["runner"] = "generate"
            kwargs.pop("log_engine_metrics", None)
            self.dynamic_lora_loading_path = dynamic_lora_loading_path
            self.lora_lock = asyncio.Lock()
            self.lora_name_to_request = {}
            # Offline batch defaults (vLLM's LLM class), not a server's: more sequences and batched tokens
            self._vllm_config = vllm.AsyncEngineArgs(**kwargs).create_engine_config(UsageContext.LLM_CLASS)
            self.engine = InProcessEngine(functools.partial(llm_engine, self._vllm_config))
            capacity = self._vllm_config.scheduler_config.max_num_seqs
            self.max_pending_requests = (math.ceil(capacity * 1.1) if max_pending_requests is None
                                         else max_pending_requests)
            self.semaphore = (asyncio.Semaphore(self.max_pending_requests) if self.max_pending_requests > 0
                              else contextlib.nullcontext())

    return InProcessEngineWrapper

