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
    Accelerator("L40S", 48 * GIB, 1.86),
    Accelerator("A100-80GB", 80 * GIB, 4.10),
    Accelerator("H100-80GB", 80 * GIB, 6.98),
    Accelerator("H200-141GB", 141 * 10**9, 7.91),
    Accelerator("B200-180GB", 180 * 10**9, 14.24),
]}

# Ray's accelerator_type labels (what `accelerator_type:X` node resources say) -> the planner's device. Ray labels
# every A100 node `A100` (the first word of the product name), whatever its memory: it is planned as the 40 GB
# card, the smaller, so that a plan never counts on memory the node may not have (--accelerator A100-80GB plans
# for the other).
RAY_LABELS: dict[str, str] = {
    "L4": "L4", "A10G": "A10G", "L40S": "L40S", "A100": "A100-40GB", "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB", "H100": "H100-80GB", "H200": "H200-141GB", "B200": "B200-180GB",
}


def accelerator(name: str) -> Accelerator:
    """The device a planner name (H100-80GB) or a Ray accelerator_type label (H100) names, exactly."""
    key = next((k for k in ACCELERATORS if k.lower() == name.lower()), None)
    if key is None:
        key = next((v for k, v in RAY_LABELS.items() if k.lower() == name.lower()), None)
    if key is None:
        from llmbatch.errors import UserError

        raise UserError(f"unknown accelerator '{name}'; known: {', '.join(ACCELERATORS)} "
                        f"(or Ray's labels {', '.join(RAY_LABELS)})")
    return ACCELERATORS[key]


def device_for_label(label: str | None) -> Accelerator | None:
    """The device behind a Ray accelerator_type label, None when the label is unknown."""
    key = next((v for k, v in RAY_LABELS.items() if label and k.lower() == label.lower()), None)
    return ACCELERATORS[key] if key else None
