"""Accelerators the planner knows: memory and a default hourly price (override with --price)."""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    hourly_usd: float      # list price per device-hour on demand; a default, not a quote
    memory_utilization: float = 0.9

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.memory_utilization


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in [
    Accelerator("CPU", 24 * GIB, 0.10, 0.5),   # per 2-core, 24 GiB machine; memory is RAM
    Accelerator("L4", 24 * GIB, 0.80),
    Accelerator("A10G", 24 * GIB, 1.01),
    Accelerator("A100-40GB", 40 * GIB, 3.67),
    Accelerator("A100-80GB", 80 * GIB, 4.10),
    Accelerator("H100-80GB", 80 * GIB, 6.98),
]}


def accelerator(name: str) -> Accelerator:
    key = next((k for k in ACCELERATORS if k.lower() == name.lower()), None)
    if key is None:
        from llmbatch.errors import UserError

        raise UserError(f"unknown accelerator '{name}'; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]
