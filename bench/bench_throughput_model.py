"""The planner's throughput model against published offline throughputs (bench/published_throughput.yaml).

Arithmetic only: for each published point, build the model's facts from its config and ask
`llmbatch.cluster.throughput_model.predict_offline` for the total output tokens/s of that many devices at those
mean lengths; no GPU, Ray or vLLM is involved.

    python bench/bench_throughput_model.py             # a plain table
    python bench/bench_throughput_model.py --markdown  # the same, as markdown for BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
POINTS = REPO / "bench" / "published_throughput.yaml"
REQUIRED = ("name", "source_url", "source_title", "engine", "model", "accelerator", "gpus", "dtype",
            "mean_input_tokens", "mean_output_tokens", "measured_output_tokens_per_s", "confirmed")
# The dtypes a point may name (passed to predict_offline as written) -> the names of
# llmbatch.cluster.model_facts.DTYPE_BYTES.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "fp8"}
VLLM_LIKE = {"vLLM"}          # engines the model is meant to predict (target: within +-35%)
TARGET = 0.35

# predict_offline(facts, device, gpus, dtype, input_tokens, output_tokens) -> total output tokens/s
Predictor = Callable[[Any, Any, int, str, int, int], float]


@dataclass(frozen=True)
class Row:
    name: str
    engine: str
    accelerator: str
    gpus: int
    dtype: str
    input_tokens: int
    output_tokens: int
    published: float
    predicted: float | None    # None: the model refused the point (the reason in `refused`)
    confirmed: bool
    refused: str = ""

    @property
    def error(self) -> float | None:
        """(predicted - published) / published: negative when the model predicts slower than measured."""
        return None if self.predicted is None else (self.predicted - self.published) / self.published

    @property
    def vllm_like(self) -> bool:
        return self.engine in VLLM_LIKE


def load_points(path: Path = POINTS) -> list[dict]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path}: expected a non-empty 'points' list")
    for i, point in enumerate(points):
        missing = [key for key in REQUIRED if key not in point]
        if missing:
            raise ValueError(f"{path}: point {i} ({point.get('name', '?')}) lacks {', '.join(missing)}")
        if point["dtype"] not in DTYPES:
            raise ValueError(f"{path}: point {point['name']}: dtype {point['dtype']!r} is not one of "
                             f"{', '.join(DTYPES)}")
    return points


def facts_of(point: dict):
    from llmbatch.cluster.model_facts import facts_from_config

    return facts_from_config(point["model"])


def default_predictor() -> Predictor:
    try:
        from llmbatch.cluster.throughput_model import predict_offline
    except ImportError as exc:
        sys.exit(f"the planner's throughput model is not importable yet ({exc}); "
                 "expected llmbatch.cluster.throughput_model.predict_offline")
    return predict_offline


def predict(points: list[dict], predictor: Predictor) -> list[Row]:
    """One row a point; a point the model refuses (a UserError, e.g. the model does not fit) gets no prediction
    and says why."""
    from llmbatch.cluster.accelerators import accelerator
    from llmbatch.errors import UserError

    rows = []
    for point in points:
        predicted, refused = None, ""
        try:
            predicted = float(predictor(facts_of(point), accelerator(point["accelerator"]), int(point["gpus"]),
                                        point["dtype"], int(point["mean_input_tokens"]),
                                        int(point["mean_output_tokens"])))
        except UserError as exc:
            refused = str(exc)
        rows.append(Row(point["name"], point["engine"], point["accelerator"], int(point["gpus"]), point["dtype"],
                        int(point["mean_input_tokens"]), int(point["mean_output_tokens"]),
                        float(point["measured_output_tokens_per_s"]), predicted, bool(point["confirmed"]), refused))
    return rows


def _cells(row: Row) -> list[str]:
    mark = "" if row.confirmed else " (unconfirmed)"
    return [row.name + mark, row.engine, f"{row.gpus}x {row.accelerator}", row.dtype,
            f"{row.input_tokens}/{row.output_tokens}", f"{row.published:,.0f}",
            "refused" if row.predicted is None else f"{row.predicted:,.0f}",
            "-" if row.error is None else f"{row.error:+.0%}"]


HEADER = ["point", "engine", "devices", "dtype", "in/out", "published tok/s", "predicted tok/s", "error"]
RIGHT = {4, 5, 6, 7}


def summary(rows: list[Row]) -> list[str]:
    lines = [f"refused: {r.name}: {r.refused}" for r in rows if r.predicted is None]
    rows = [r for r in rows if r.predicted is not None]
    vllm = [r for r in rows if r.vllm_like]
    if vllm:
        inside = sum(abs(r.error) <= TARGET for r in vllm)
        lines.append(f"vLLM-like points: {inside} of {len(vllm)} within +-{TARGET:.0%}; median error "
                     f"{statistics.median(r.error for r in vllm):+.0%}")
    others = [r for r in rows if not r.vllm_like]
    if others:
        ratios = sorted(r.published / r.predicted for r in others if r.predicted > 0)
        if ratios:
            lines.append(f"other engines (TensorRT-LLM): published / predicted x{ratios[0]:.2f} to "
                         f"x{ratios[-1]:.2f}, median x{statistics.median(ratios):.2f}")
    return lines


def render_table(rows: list[Row]) -> str:
    table = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = ["  ".join(cell.rjust(w) if i in RIGHT else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           .rstrip() for line in table]
    return "\n".join(out + [""] + summary(rows))


def render_markdown(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |",
           "|" + "|".join("---:" if i in RIGHT else "---" for i in range(len(HEADER))) + "|"]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out + [""] + summary(rows))


def main(argv: list[str] | None = None, predictor: Predictor | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (for BENCHMARKS.md)")
    parser.add_argument("--points", type=Path, default=POINTS, help="the published points (YAML)")
    args = parser.parse_args(argv)
    rows = predict(load_points(args.points), predictor or default_predictor())
    print(render_markdown(rows) if args.markdown else render_table(rows))


if __name__ == "__main__":
    main()
