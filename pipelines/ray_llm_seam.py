"""The seam to ray.data.llm's private internals: the one module that imports from `ray.llm._internal`.

llmbatch's engine stage subclasses ray.data.llm's engine stage UDF and engine wrapper, replaces both
constructors for the in-process engine, rewrites the built stage's fields and reads the engine's output rows.
None of that is public API, so nothing but the pinned Ray version (pyproject.toml) keeps it working. Importing
this module checks that every private piece is still there with the shape relied upon, and otherwise fails with
one error that names the installed Ray version and every piece that moved, before any engine starts.

Importing it imports ray.data.llm's engine stage, and with it vLLM and torch (seconds of CPU): import it lazily.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable

import ray

RAY_VERSION_WRITTEN_AGAINST = "2.60.0"

ENGINE_STAGE_MODULE = "ray.llm._internal.batch.stages.vllm_engine_stage"
STAGE_BASE_MODULE = "ray.llm._internal.batch.stages.base"

# The processor registers each stage under its class name (Processor.get_stage_by_name).
ENGINE_STAGE_NAME = "vLLMEngineStage"


@dataclass(frozen=True)
class PrivateClass:
    """A private ray.llm class and the parts of it llmbatch relies on."""

    module: str
    name: str
    attributes: tuple[str, ...] = ()        # overridden, called or read by llmbatch
    fields: tuple[str, ...] = ()            # pydantic fields llmbatch reads or writes
    init_parameters: tuple[str, ...] = ()   # constructor parameters llmbatch passes or takes by name
    # Every attribute the constructor sets, where llmbatch's in-process set-up replaces that constructor and
    # must set them all: the rest of the class reads them.
    init_sets: frozenset[str] | None = None


RELIED_UPON = (
    PrivateClass(STAGE_BASE_MODULE, "StatefulStageUDF", init_parameters=("data_column", "expected_input_keys")),
    PrivateClass(ENGINE_STAGE_MODULE, "vLLMEngineStageUDF",
                 attributes=("udf", "normalize_engine_kwargs", "IDX_IN_BATCH_COLUMN"),
                 init_parameters=("data_column", "expected_input_keys", "batch_size", "max_concurrent_batches",
                                  "model", "engine_kwargs", "task_type", "max_pending_requests",
                                  "dynamic_lora_loading_path", "should_continue_on_error"),
                 init_sets=frozenset({"model", "should_continue_on_error", "task_type", "engine_kwargs", "llm",
                                      "max_pending_requests"})),
    PrivateClass(ENGINE_STAGE_MODULE, "vLLMEngineWrapper", attributes=("generate_async", "shutdown"),
                 init_sets=frozenset({"request_id", "idx_in_batch_column", "task_type", "model", "model_source",
                                      "dynamic_lora_loading_path", "lora_lock", "lora_name_to_request",
                                      "_vllm_config", "engine", "max_pending_requests", "semaphore"})),
    PrivateClass(ENGINE_STAGE_MODULE, "vLLMTaskType", attributes=("GENERATE",)),
    PrivateClass(ENGINE_STAGE_MODULE, ENGINE_STAGE_NAME, fields=("fn", "fn_constructor_kwargs", "map_batches_kwargs")),
    # The engine's output row: the columns the score path and the output stage read
    PrivateClass(ENGINE_STAGE_MODULE, "vLLMOutputData",
                 fields=("generated_text", "generated_tokens", "num_input_tokens", "num_generated_tokens",
                         "logprobs", "prompt_logprobs")),
)


class RayLlmSeamError(ImportError):
    """The installed Ray no longer has the private ray.llm pieces llmbatch relies on."""


def attributes_set_in(function: Callable) -> set[str]:
    """The names of every `self.<name> = ...` in `function`'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}


def _class_problems(relied: PrivateClass, cls: type) -> list[str]:
    where = f"{relied.module}.{relied.name}"
    problems = [f"{where}.{name}" for name in relied.attributes if not hasattr(cls, name)]
    model_fields = getattr(cls, "model_fields", {})
    problems += [f"{where}.{name} (pydantic field)" for name in relied.fields if name not in model_fields]
    if relied.init_parameters:
        parameters = inspect.signature(cls.__init__).parameters
        problems += [f"{where}.__init__ parameter {name!r}" for name in relied.init_parameters
                     if name not in parameters]
    if relied.init_sets is not None:
        try:
            unset = attributes_set_in(cls.__init__) - relied.init_sets
        except (OSError, TypeError) as exc:
            problems.append(f"{where}.__init__ source, to compare the attributes it sets ({exc})")
        else:
            if unset:
                problems.append(f"{where}.__init__ sets attributes the in-process set-up does not: "
                                + ", ".join(sorted(unset)))
    return problems


def seam_problems() -> list[str]:
    """Every private piece that is missing or has changed shape in the installed Ray; empty when none."""
    problems, found = [], {}
    for relied in RELIED_UPON:
        try:
            module = importlib.import_module(relied.module)
        except ImportError as exc:
            problems.append(f"module {relied.module} ({type(exc).__name__}: {exc})")
            continue
        cls = getattr(module, relied.name, None)
        if not isinstance(cls, type):
            problems.append(f"{relied.module}.{relied.name}")
            continue
        found[relied.name] = cls
        problems += _class_problems(relied, cls)
    udf, base = found.get("vLLMEngineStageUDF"), found.get("StatefulStageUDF")
    # The in-process set-up calls StatefulStageUDF.__init__ in place of vLLMEngineStageUDF's
    if udf is not None and base is not None and not issubclass(udf, base):
        problems.append(f"{ENGINE_STAGE_MODULE}.vLLMEngineStageUDF as a subclass of StatefulStageUDF")
    return list(dict.fromkeys(problems))  # a module that fails to import is named once, not once per class


def check_seam() -> None:
    """Raise RayLlmSeamError naming every private piece that moved, if any did."""
    problems = seam_problems()
    if problems:
        raise RayLlmSeamError(
            f"llmbatch was written against Ray {RAY_VERSION_WRITTEN_AGAINST}; the installed Ray "
            f"{ray.__version__} lacks these private ray.llm pieces it relies on (missing or changed):\n"
            + "".join(f"  - {problem}\n" for problem in problems)
            + f"Install ray=={RAY_VERSION_WRITTEN_AGAINST} (the pin in pyproject.toml) or adapt "
            "pipelines/ray_llm_seam.py and its users to this Ray.")


check_seam()

# Imported only after the check, so that a moved piece fails with its message rather than a bare ImportError.
from ray.llm._internal.batch.stages.base import StatefulStageUDF  # noqa: E402
from ray.llm._internal.batch.stages.vllm_engine_stage import (  # noqa: E402
    vLLMEngineStageUDF, vLLMEngineWrapper, vLLMTaskType,
)

__all__ = ["ENGINE_STAGE_NAME", "RAY_VERSION_WRITTEN_AGAINST", "RayLlmSeamError", "StatefulStageUDF",
           "attributes_set_in", "check_seam", "seam_problems", "vLLMEngineStageUDF", "vLLMEngineWrapper",
           "vLLMTaskType"]
