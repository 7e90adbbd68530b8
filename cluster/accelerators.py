"""Accelerators the planner knows (cluster/accelerator_facts.yaml): memory, datasheet throughput figures and a
default hourly price. A plan's prices come from a price file when one is given (`llmbatch plan --prices FILE`, or
the file `LLMBATCH_PRICES` names), else these defaults."""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmbatch.errors import UserError

GIB = 2**30
PRICES_ENV = "LLMBATCH_PRICES"
DEFAULT_PRICE_SOURCE = "default list price"


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int
    hourly_usd: float      # list price per device-hour on demand; a default, not a quote
    memory_utilization: float = 0.9
    memory_bandwidth_gb_per_s: float = 0.0
    tflops: dict[str, float] = field(default_factory=dict, hash=False)   # dense peak by data type (fp8, bf16, ...)
    interconnect: str = "none"                 # how a node's devices reach each other for tensor parallelism
    interconnect_gb_per_s: float = 0.0         # per device, both directions together
    sources: tuple[str, ...] = ()              # where the figures come from

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.memory_utilization


FACTS_FILE = Path(__file__).with_name("accelerator_facts.yaml")
_FACT_KEYS = {"name", "description", "memory", "memory_utilization", "memory_bandwidth_gb_per_s", "tflops",
              "interconnect", "interconnect_gb_per_s", "hourly_usd", "sources"}
_MEMORY_UNITS = {"GiB": GIB, "GB": 10**9}


def _memory_bytes(text: str, where: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GiB|GB)\s*", str(text))
    if not match:
        raise ValueError(f"{where}: memory '{text}' is not a size such as 24 GiB or 141 GB")
    return round(float(match[1]) * _MEMORY_UNITS[match[2]])


def _accelerator_from_facts(entry: dict) -> Accelerator:
    where = f"{FACTS_FILE.name}: {entry.get('name', '?')}"
    unknown = set(entry) - _FACT_KEYS
    missing = _FACT_KEYS - set(entry) - {"description", "memory_utilization"}
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    return Accelerator(
        name=entry["name"], memory_bytes=_memory_bytes(entry["memory"], where), hourly_usd=float(entry["hourly_usd"]),
        memory_utilization=float(entry.get("memory_utilization", 0.9)),
        memory_bandwidth_gb_per_s=float(entry["memory_bandwidth_gb_per_s"]),
        tflops={str(k): float(v) for k, v in entry["tflops"].items()}, interconnect=str(entry["interconnect"]),
        interconnect_gb_per_s=float(entry["interconnect_gb_per_s"]), sources=tuple(entry["sources"] or ()))


def _load_accelerators() -> dict[str, Accelerator]:
    import yaml

    entries = yaml.safe_load(FACTS_FILE.read_text(encoding="utf-8"))["accelerators"]
    return {a.name: a for a in map(_accelerator_from_facts, entries)}


ACCELERATORS: dict[str, Accelerator] = _load_accelerators()

# Ray's accelerator_type labels (what `accelerator_type:X` node resources say) -> the planner's device. Ray labels
# every A100 node `A100` (the first word of the product name), whatever its memory: it is planned as the 40 GB
# card, the smaller, so that a plan never counts on memory the node may not have (--accelerator A100-80GB plans
# for the other).
RAY_LABELS: dict[str, str] = {
    "L4": "L4", "A10G": "A10G", "L40S": "L40S", "A100": "A100-40GB", "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB", "H100": "H100-80GB", "H200": "H200-141GB", "B200": "B200-180GB",
}

# `resources.accelerator: gpu | cpu` as the planner prices them: a job that names no GPU type gets this one.
GENERIC: dict[str, str] = {"gpu": "A10G", "cpu": "CPU"}


def _folded(name: str) -> str:
    """A name without case, separators or the B of GB: H100-80GB, h100_80gb and H100-80G fold alike."""
    folded = re.sub(r"[^a-z0-9]", "", name.lower())
    return folded[:-1] if re.search(r"\dgb$", folded) else folded


def _device_names() -> dict[str, str]:
    """Every name the planner takes, folded, -> the device it names."""
    names = {_folded(label): device for label, device in RAY_LABELS.items()}
    names.update((_folded(name), name) for name in ACCELERATORS)
    names.update((_folded(word), device) for word, device in GENERIC.items())
    return names


def accelerator_names() -> str:
    """The names `accelerator()` takes, for help texts and errors."""
    generic = ", ".join(f"{word} (= {device})" for word, device in GENERIC.items())
    labels = [label for label in RAY_LABELS if label not in ACCELERATORS]
    return f"{', '.join(ACCELERATORS)}; {generic}; Ray's labels {', '.join(labels)}"


def accelerator(name: str) -> Accelerator:
    """The device a planner name (H100-80GB), a Ray accelerator_type label (H100) or the word gpu or cpu
    names, case and separators aside (h100-80gb, A100-80G)."""
    names = _device_names()
    found = names.get(_folded(name))
    if found is not None:
        return ACCELERATORS[found]
    spelled = {_folded(n): n for n in [*RAY_LABELS, *GENERIC, *ACCELERATORS]}
    close = [spelled[f] for f in difflib.get_close_matches(_folded(name), list(spelled), n=3, cutoff=0.6)]
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"unknown accelerator '{name}'; {guess}known: {accelerator_names()}")


def device_for_label(label: str | None) -> Accelerator | None:
    """The device behind a Ray accelerator_type label, None when the label is unknown."""
    key = next((v for k, v in RAY_LABELS.items() if label and k.lower() == label.lower()), None)
    return ACCELERATORS[key] if key else None


@dataclass(frozen=True)
class Price:
    usd_per_hour: float    # per device
    source: str            # DEFAULT_PRICE_SOURCE, or the price file it came from


def price_file(given: str | None) -> str | None:
    """The price file in force: the one given (--prices), else the one LLMBATCH_PRICES names."""
    return given or os.environ.get(PRICES_ENV) or None


def load_prices(path: str) -> dict[str, float]:
    """A price file (YAML or JSON): accelerator name or alias -> USD per device-hour, by the device's name."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"price file {path}: cannot read it ({exc})") from None
    as_json = path.endswith(".json")
    try:
        raw = json.loads(text) if as_json else _parse_yaml(text)
    except ValueError as exc:
        raise UserError(f"price file {path}: not valid {'JSON' if as_json else 'YAML'} ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"price file {path}: expected a mapping of accelerator name to USD per device-hour, "
                        "e.g. 'H100: 2.49'")
    prices: dict[str, float] = {}
    keys: dict[str, str] = {}
    for key, value in raw.items():
        try:
            device = accelerator(str(key))
        except UserError as exc:
            raise UserError(f"price file {path}: key '{key}': {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"price file {path}: key '{key}': {value!r} is not a price (USD per device-hour, "
                            "a number of at least 0)")
        if device.name in keys:
            raise UserError(f"price file {path}: key '{key}': {device.name} is priced already, by key "
                            f"'{keys[device.name]}'")
        keys[device.name] = str(key)
        prices[device.name] = float(value)
    return prices


def _parse_yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from None


def price_of(device: Accelerator, prices_path: str | None = None) -> Price:
    """The device's price per device-hour: from the price file in force when it lists the device, else the
    default list price."""
    path = price_file(prices_path)
    if path is None:
        return Price(device.hourly_usd, DEFAULT_PRICE_SOURCE)
    prices = load_prices(path)
    if device.name not in prices:
        return Price(device.hourly_usd, f"{DEFAULT_PRICE_SOURCE}; {path} does not list {device.name}")
    return Price(prices[device.name], path)
