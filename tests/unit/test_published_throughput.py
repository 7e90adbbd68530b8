"""The published throughput points (bench/published_throughput.yaml) and the script that sets the planner's
throughput model against them (bench/bench_throughput_model.py), run here with a stand-in predictor."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from llmbatch.cluster.accelerators import Accelerator, accelerator
from llmbatch.cluster.model_facts import DTYPE_BYTES, ModelFacts, facts_from_config

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_throughput_model", REPO / "bench" / "bench_throughput_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _bench()
POINTS = bench.load_points()


def test_the_points_load_and_are_enough_and_named_once():
    assert 6 <= len(POINTS) <= 12
    names = [p["name"] for p in POINTS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p["name"])
def test_every_point_has_a_source_a_known_device_and_sane_figures(point):
    assert point["source_url"].startswith("https://") and point["source_title"].strip()
    assert accelerator(point["accelerator"]).name == point["accelerator"]    # the planner's own spelling
    assert isinstance(point["gpus"], int) and point["gpus"] >= 1
    assert point["dtype"] in bench.DTYPES and bench.DTYPES[point["dtype"]] in DTYPE_BYTES
    assert point["mean_input_tokens"] > 0 and point["mean_output_tokens"] > 0
    assert point["measured_output_tokens_per_s"] > 0
    assert isinstance(point["confirmed"], bool) and isinstance(point.get("lengths_confirmed", True), bool)
    assert point["engine"] in ("vLLM", "TensorRT-LLM")


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p["name"])
def test_every_config_builds_model_facts_of_the_expected_size(point):
    facts = facts_from_config(point["model"])
    assert isinstance(facts, ModelFacts)
    billions = facts.parameters / 1e9
    expected = {32000: 69.0, 128256: 70.6} if facts.layers == 80 else {128256: 8.0}
    assert billions == pytest.approx(expected[facts.vocab_size], rel=0.03)
    # the weights fit the devices named, in the precision run (a sanity check on gpus and dtype)
    device = accelerator(point["accelerator"])
    assert facts.weight_bytes(bench.DTYPES[point["dtype"]]) < point["gpus"] * device.usable_bytes


def test_mlperf_llama2_points_agree_with_the_dataset_and_the_mlperf_token_count():
    llama2 = [p for p in POINTS if p["name"].startswith("mlperf-") and "llama2-70b" in p["name"]]
    assert len(llama2) >= 4
    for p in llama2:
        assert p["mean_input_tokens"] == 222 and 285 <= p["mean_output_tokens"] <= 295
        assert p["gpus"] == 8 and p["dtype"] == "fp8" and p["engine"] == "TensorRT-LLM"


def _stand_in(calls):
    def predict_offline(facts, device, gpus, dtype, input_tokens, output_tokens):
        calls.append((facts, device, gpus, dtype, input_tokens, output_tokens))
        # decode-bound toy: 30% of the devices' memory bandwidth-ish budget, by weight bytes
        return 2e12 * gpus / facts.weight_bytes(bench.DTYPES[dtype]) * 64
    return predict_offline


def test_the_predictor_gets_the_planners_types_and_every_point_a_row():
    calls = []
    rows = bench.predict(POINTS, _stand_in(calls))
    assert len(rows) == len(calls) == len(POINTS)
    facts, device, gpus, dtype, input_tokens, output_tokens = calls[0]
    assert isinstance(facts, ModelFacts) and isinstance(device, Accelerator)
    assert isinstance(gpus, int) and isinstance(input_tokens, int) and isinstance(output_tokens, int)
    assert dtype in bench.DTYPES                  # bf16 | fp8, as predict_offline takes them
    for row, point in zip(rows, POINTS):
        assert row.published == point["measured_output_tokens_per_s"]
        assert row.error == pytest.approx((row.predicted - row.published) / row.published)


def test_the_table_and_the_markdown_show_every_point_and_the_summary():
    rows = bench.predict(POINTS, lambda facts, device, gpus, dtype, i, o: 1000.0 * gpus)
    plain = bench.render_table(rows)
    markdown = bench.render_markdown(rows)
    for row in rows:
        assert row.name in plain and row.name in markdown
    lines = markdown.splitlines()
    assert lines[0].startswith("| point | engine |") and lines[1].startswith("|---|")
    assert sum(line.startswith("| ") for line in lines) == len(rows) + 1
    assert "vLLM-like points:" in markdown and "TensorRT-LLM" in markdown.splitlines()[-1]


def test_errors_are_signed_against_the_published_figure():
    point = dict(POINTS[0], measured_output_tokens_per_s=1000.0)
    (row,) = bench.predict([point], lambda *args: 1200.0)
    assert row.error == pytest.approx(0.2)
    assert "+20%" in bench.render_markdown([row])
    (row,) = bench.predict([point], lambda *args: 500.0)
    assert "-50%" in bench.render_table([row])


def test_a_point_the_model_refuses_gets_no_prediction_and_says_why():
    from llmbatch.errors import UserError

    def refuse(*args):
        raise UserError("does not fit 1 x L4")

    (row,) = bench.predict(POINTS[:1], refuse)
    assert row.predicted is None and row.error is None and row.refused == "does not fit 1 x L4"
    text = bench.render_markdown([row])
    assert "refused" in text and "does not fit 1 x L4" in text


def test_main_prints_markdown_with_an_injected_predictor(capsys):
    bench.main(["--markdown"], predictor=lambda *args: 1.0)
    out = capsys.readouterr().out
    assert out.startswith("| point |") and "mlperf-v4.1-llama2-70b-8xH100" in out


def test_a_point_missing_a_field_is_refused(tmp_path):
    broken = tmp_path / "points.yaml"
    broken.write_text("points:\n  - name: x\n    engine: vLLM\n")
    with pytest.raises(ValueError, match="lacks source_url"):
        bench.load_points(broken)
