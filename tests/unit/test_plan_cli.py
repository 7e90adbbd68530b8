"""`llmbatch plan`: exit 1 with its reasons when the job cannot run as written, --explain, accelerator names,
price files, several accelerators side by side, the throughput model and its calibration when no profile exists,
a checkpoint of config.json alone, and no model built on the way."""
from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from llmbatch.cluster import model_store
from llmbatch.cluster.accelerators import ACCELERATORS, accelerator, load_prices, price_of
from llmbatch.errors import UserError
from llmbatch.jobs import plan as plan_module
from llmbatch.jobs.cli import main
from llmbatch.jobs.plan import TokenEstimate, plan_job
from llmbatch.jobs.plan import count_input_tokens as COUNT_INPUT_TOKENS
from llmbatch.jobs.spec import validate_spec

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "torch_dtype": "float16", "hidden_act": "silu", "tie_word_embeddings": False}
ROWS, INPUT_TOKENS = 20_000, 1_000_000   # about 2000 s of work on one A10G


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMBATCH_PROFILE_STORE", str(tmp_path / "profiles"))
    for name in ("LLMBATCH_PRICES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # the input's prompts are not tokenized: the fake checkpoint has no tokenizer
    monkeypatch.setattr(plan_module, "count_input_tokens",
                        lambda job: TokenEstimate(ROWS, INPUT_TOKENS, f"counted every row ({ROWS})"))


@pytest.fixture
def job_file(tmp_path):
    """A job on a Llama-2-7B-shaped checkpoint (config and an empty weight file) that fits one A10G at 2048
    tokens and needs two at 4096."""
    model = tmp_path / "llama-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    (model / "model.safetensors").write_bytes(b"")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{n}"}) + "\n" for n in range(3)))

    def write(**resources):
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({
            "name": "planned", "model": {"source": str(model), "engine": {"max_model_len": 2048}},
            "input": {"path": str(prompts)}, "output": {"path": str(tmp_path / "out")},
            "sampling": {"max_tokens": 256}, "resources": {"accelerator": "gpu", **resources}}))
        return str(path)
    return write


def plan(*args):
    return CliRunner().invoke(main, ["plan", *args])


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def problems(result) -> list[str]:
    """The reasons listed under `error: job failed: ...`."""
    return [line[2:] for line in result.stderr.splitlines() if line.startswith("  ")]


def test_a_plan_that_meets_its_targets_exits_0(job_file):
    result = plan(job_file(replicas="auto", deadline="2h"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("plan for ") and "on A10G" in result.stdout
    assert "at $1.01 per device-hour: default list price" in result.stdout
    assert errors(result) == []


def test_a_missed_deadline_prints_the_plan_then_the_reason_and_exits_1(job_file):
    result = plan(job_file(replicas="auto", deadline="10m", max_replicas=2), "--json")
    assert result.exit_code == 1
    planned = json.loads(result.stdout)
    assert planned["replicas"] == 2 and planned["wall_seconds"] > 600
    assert len(planned["problems"]) == 1
    assert re.fullmatch(rf"resources\.deadline 10m is missed: 2 replica\(s\) finish in about "
                        rf"{planned['wall_seconds']:.0f} s; it needs (\d+) replicas; raise resources\.max_replicas "
                        rf"to \1", planned["problems"][0])
    assert problems(result)[0] == planned["problems"][0]
    assert errors(result) == ["error: job failed: the job cannot run as written, or misses its deadline or budget"]


def test_submit_dry_run_exits_1_with_the_same_reasons_and_runs_nothing(job_file, tmp_path):
    result = CliRunner().invoke(main, ["submit", job_file(replicas="auto", deadline="10m", max_replicas=2),
                                       "--dry-run"])
    assert result.exit_code == 1
    assert result.stdout.startswith("plan for ")
    assert problems(result)[0].startswith("resources.deadline 10m is missed: 2 replica(s) finish in about ")
    assert not (tmp_path / "out").exists()


def test_a_deadline_shorter_than_start_up_says_so(job_file):
    result = plan(job_file(replicas="auto", deadline="1m"))
    assert result.exit_code == 1
    assert "replicas           " in result.stdout
    assert re.match(r"resources\.deadline 1m is missed: \d+ replica\(s\) finish in about \d+ s; "
                    r"start-up alone takes \d+ s$", problems(result)[0])


def test_a_budget_below_the_cheapest_run_exits_1(job_file):
    result = plan(job_file(replicas="auto", budget=0.01))
    assert result.exit_code == 1
    assert "replicas           1" in result.stdout
    assert problems(result)[0].startswith("resources.budget $0.01 is below the cheapest run: $")
    assert problems(result)[0].endswith("with 1 replica(s) at $1.01 per device-hour")


def test_a_tensor_parallelism_below_what_the_model_needs_exits_1(job_file, tmp_path):
    path = job_file(replicas=1)
    result = plan(path, "--set", "model.engine.max_model_len=4096")
    assert result.exit_code == 1
    assert "per replica        2 x A10G" in result.stdout
    assert problems(result)[0] == (f"model.engine.tensor_parallel_size: 1 x A10G per replica cannot hold "
                                 f"{tmp_path / 'llama-7b'}; it needs 2 ({_fit_of(result.stdout)}); set "
                                 "model.engine.tensor_parallel_size: 2")
    fixed = plan(path, "--set", "model.engine.max_model_len=4096", "--set", "model.engine.tensor_parallel_size=2")
    assert fixed.exit_code == 0, fixed.output


def _fit_of(text: str) -> str:
    return re.search(r"per replica +2 x A10G +\((.*)\)$", text, re.M).group(1)


def test_the_cluster_problems_block_the_plan(job_file):
    from llmbatch.jobs.plan import fit_to_cluster

    path = job_file(replicas=4)
    spec = validate_spec(yaml.safe_load(open(path)))
    planned = plan_job(spec)
    assert planned.problems == []
    one_gpu = fit_to_cluster(planned, spec, "http://head:8265", [{"CPU": 8.0, "GPU": 1.0}])
    assert one_gpu.problems == ["resources.replicas needs at least 4, more than the cluster at http://head:8265 "
                                "holds at once (1); the run would be refused"]
    no_gpu = fit_to_cluster(planned, spec, "http://head:8265", [{"CPU": 8.0}])
    assert no_gpu.problems[0].startswith("the cluster at http://head:8265 cannot hold one replica (1 x A10G")


def test_a_cluster_that_caps_the_replicas_can_make_the_deadline_missed(job_file):
    from llmbatch.jobs.plan import fit_to_cluster

    spec = validate_spec(yaml.safe_load(open(job_file(replicas="auto", deadline="15m"))))
    planned = plan_job(spec)
    assert planned.problems == [] and planned.replicas > 1
    capped = fit_to_cluster(planned, spec, "http://head:8265", [{"CPU": 8.0, "GPU": 1.0}])
    assert capped.replicas == 1 and "capped at 1, what the cluster at http://head:8265" in capped.replicas_reason
    assert capped.problems == [f"resources.deadline 15m is missed: 1 replica(s) finish in about "
                               f"{capped.wall_seconds:.0f} s; the cluster at http://head:8265 holds 1 at once"]


def test_explain_prints_the_arithmetic(job_file):
    result = plan(job_file(replicas="auto", deadline="2h"), "--explain")
    assert result.exit_code == 0, result.output
    text = result.stdout
    explained = text[text.index("how the plan was worked out"):]
    work = float(re.search(r"= ([\d.]+) s of work", explained).group(1))
    startup = float(re.search(r"([\d.]+) s start-up", explained).group(1))
    replicas = int(re.search(r"^  replicas +(\d+)$", text, re.M).group(1))
    assert f"tokens in          {INPUT_TOKENS}  (counted every row ({ROWS}))" in explained
    assert f"tokens out         {ROWS * 256} = {ROWS} rows x 256: sampling.max_tokens" in explained
    assert "rates              throughput model (no profile " in explained
    assert f"replica-seconds    input / prefill + output / decode = {INPUT_TOKENS} / " in explained
    assert f" + {ROWS * 256} / " in explained
    assert f"wall               start-up + work / replicas = {startup:g} + {work:g} / {replicas} = " in explained
    assert f"cost               wall x replicas x devices x $/h = " in explained
    assert f"x {replicas} x 1 x $1.01 = $" in explained and "(price: default list price)" in explained
    assert (f"replicas           {replicas}: resources.deadline 2h: ceil(work / (deadline - start-up)) = "
            f"ceil({work:g} / (7200 - {startup:g})) = {replicas}") in explained


def test_explain_with_a_profile_shows_prefill_and_decode(job_file, monkeypatch):
    from llmbatch.cluster import profiles

    measured = profiles.Rates(output_tokens_per_second=900.0, input_tokens_per_second=3000.0,
                              requests_per_second=4.0, startup_seconds=120.0, mean_input_tokens=50.0,
                              mean_output_tokens=200.0, measurements=2, prefill_tokens_per_second=10_000.0)
    monkeypatch.setattr(profiles, "load", lambda key: {"key": key})
    monkeypatch.setattr(profiles, "rates", lambda stored: measured)
    monkeypatch.setattr(profiles, "prediction_errors", lambda stored: [])
    result = plan(job_file(replicas=2), "--explain")
    assert result.exit_code == 0, result.output
    decode = round(measured.decode_tokens_per_second, 2)
    work = INPUT_TOKENS / 10_000 + ROWS * 200 / measured.decode_tokens_per_second
    assert f"tokens out         {ROWS * 200} = {ROWS} rows x 200: the profile's mean output length" in result.stdout
    assert f"prefill 10000.0 tok/s, decode {decode} tok/s per replica, start-up 120 s" in result.stdout
    assert (f"replica-seconds    input / prefill + output / decode = {INPUT_TOKENS} / 10000.0 + {ROWS * 200} / "
            f"{decode} = {work:.2f}".rstrip("0").rstrip(".") + " s of work") in result.stdout
    assert "replicas           2: resources.replicas: 2" in result.stdout


def test_explain_says_when_an_hour_of_work_per_replica_chose_the_count(job_file):
    result = plan(job_file(replicas="auto"), "--explain")
    assert "about an hour of work per replica (no deadline or budget): ceil(" in result.stdout


@pytest.mark.parametrize("name, device", [("gpu", "A10G"), ("cpu", "CPU"), ("H100", "H100-80GB"),
                                          ("h100-80gb", "H100-80GB"), ("A100-80G", "A100-80GB"),
                                          ("a100", "A100-40GB"), ("l40s", "L40S"), ("H200", "H200-141GB")])
def test_accelerator_names_and_aliases(name, device):
    assert accelerator(name).name == device


def test_an_unknown_accelerator_gets_a_did_you_mean_and_the_list(job_file):
    result = plan(job_file(replicas=1), "--accelerator", "H1000")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --accelerator: unknown accelerator 'H1000'; did you mean H100")
    for name in ACCELERATORS:
        assert name in result.stderr
    with pytest.raises(UserError, match="did you mean A100-80GB"):
        accelerator("A100-80")


def test_plan_on_named_accelerators(job_file):
    path = job_file(replicas=1)
    assert "plan for" in plan(path, "--accelerator", "gpu").stdout
    assert " on A10G" in plan(path, "--accelerator", "gpu").stdout.splitlines()[0]
    on_h100 = plan(path, "--accelerator", "H100")
    assert on_h100.exit_code == 0 and on_h100.stdout.splitlines()[0].endswith(" on H100-80GB")
    assert "at $6.98 per device-hour" in on_h100.stdout
    pinned = plan(job_file(replicas=1, accelerator_type="h100-80gb"))
    assert pinned.stdout.splitlines()[0].endswith(" on H100-80GB")


def test_the_accelerator_help_lists_every_device():
    text = CliRunner().invoke(main, ["plan", "--help"]).stdout
    flat = " ".join(text.split())
    for name in ("H200-141GB", "B200-180GB", "L40S", "A100-80GB", "gpu (= A10G)"):
        assert name in flat


def test_a_price_file_changes_the_cost_and_says_where_the_price_came_from(job_file, tmp_path, monkeypatch):
    path = job_file(replicas=2)
    listed = json.loads(plan(path, "--json").stdout)
    prices = tmp_path / "prices.yaml"
    prices.write_text("a10g: 0.505\nH100: 2.49\n")
    cheaper = plan(path, "--prices", str(prices), "--json")
    assert cheaper.exit_code == 0, cheaper.output
    repriced = json.loads(cheaper.stdout)
    assert repriced["hourly_usd"] == 0.505 and repriced["price_source"] == str(prices)
    assert repriced["cost_usd"] == pytest.approx(listed["cost_usd"] / 2, rel=1e-3)
    assert f"at $0.51 per device-hour: {prices}" in plan(path, "--prices", str(prices)).stdout
    as_json = tmp_path / "prices.json"
    as_json.write_text(json.dumps({"H100-80GB": 2.0}))
    monkeypatch.setenv("LLMBATCH_PRICES", str(as_json))
    assert price_of(ACCELERATORS["H100-80GB"]).usd_per_hour == 2.0
    from_env = json.loads(plan(path, "--json", "--accelerator", "H100").stdout)
    assert from_env["hourly_usd"] == 2.0 and from_env["price_source"] == str(as_json)
    unlisted = price_of(ACCELERATORS["L4"])
    assert unlisted.usd_per_hour == ACCELERATORS["L4"].hourly_usd and "does not list L4" in unlisted.source


@pytest.mark.parametrize("text, message", [
    ("H1000: 2.0\n", "key 'H1000': unknown accelerator 'H1000'; did you mean H100"),
    ("H100: cheap\n", "key 'H100': 'cheap' is not a price"),
    ("H100: -1\n", "key 'H100': -1 is not a price"),
    ("- H100\n", "expected a mapping of accelerator name to USD per device-hour"),
    ("H100: [1\n", "not valid YAML"),
    ("H100: 2\nh100-80gb: 3\n", "key 'h100-80gb': H100-80GB is priced already, by key 'H100'"),
])
def test_a_bad_price_file_exits_2_naming_the_file_and_key(job_file, tmp_path, text, message):
    prices = tmp_path / "prices.yaml"
    prices.write_text(text)
    result = plan(job_file(replicas=1), "--prices", str(prices))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: price file {prices}: {message}")
    assert result.stdout == ""
    with pytest.raises(UserError):
        load_prices(str(prices))


def test_a_missing_price_file_exits_2(job_file, tmp_path):
    result = plan(job_file(replicas=1), "--prices", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and f"error: price file {tmp_path / 'nope.yaml'}: cannot read it" in result.stderr


def test_planning_an_unprepared_catalog_model_refuses_and_builds_nothing(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setattr(model_store, "resolve_local", _never)
    monkeypatch.setattr(model_store, "locate_catalog_gguf", lambda entry: tmp_path / "model.gguf")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "c", "model": {"source": "smollm2-135m-instruct"},
                                   "input": {"path": str(prompts)}, "output": {"path": str(tmp_path / "out")}}))
    result = plan(str(job))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["error: model.source: smollm2-135m-instruct is not prepared on this "
                                          "machine; run: llmbatch models prepare smollm2-135m-instruct"]
    assert not home.exists() and not (tmp_path / "out").exists()


def _never(*args, **kwargs):
    raise AssertionError("plan must not prepare or copy a model")


def test_plan_on_several_accelerators_side_by_side_marks_the_cheapest(job_file):
    path = job_file(replicas="auto", deadline="2h")
    result = plan(path, "--accelerators", "L4,H100,cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = [line for line in lines if re.match(r"^[* ] (L4|H100-80GB|CPU) ", line)]
    assert [row[2:].split()[0] for row in rows] == ["L4", "H100-80GB", "CPU"]
    assert sum(row.startswith("* ") for row in rows) == 1
    assert rows[2].split()[1:] == ["does", "not", "fit"]
    assert "* the cheapest that meets the deadline" in lines
    listed = json.loads(plan(path, "--accelerators", "L4,H100,cpu", "--json").stdout)
    assert [entry["accelerator"] for entry in listed] == ["L4", "H100-80GB", "CPU"]
    assert listed[2]["fits"] is False and "does not fit 1 x CPU: weights " in listed[2]["reason"]
    fitting = listed[:2]
    assert [entry["cheapest"] for entry in fitting].count(True) == 1
    cheapest = min(fitting, key=lambda entry: entry["cost_usd"])
    assert cheapest["cheapest"] and cheapest["meets_deadline"] is True
    assert f"{cheapest['accelerator']:<11}" in next(row for row in rows if row.startswith("* "))
    for entry in fitting:
        assert entry["usd_per_million_output_tokens"] == pytest.approx(
            entry["cost_usd"] / entry["output_tokens"] * 1e6, rel=1e-3)
    both = plan(path, "--accelerator", "L4", "--accelerators", "H100")
    assert both.exit_code == 2 and "give --accelerator or --accelerators, not both" in both.stderr


def test_without_a_profile_the_plan_says_it_used_the_throughput_model(job_file):
    planned = json.loads(plan(job_file(replicas=1), "--accelerator", "H100", "--json").stdout)
    assert planned["profile"]["used"] is False and planned["profile"]["model"]["calibration"] is None
    note = planned["notes"][0]
    assert note.startswith("no profile: rates from the throughput model for H100-80GB (bandwidth-bound decode of ")
    assert note.endswith("; uncalibrated); run `llmbatch profile " + planned["model"] + "` for a measured plan")
    on_l4 = json.loads(plan(job_file(replicas=1), "--accelerator", "L4", "--json").stdout)
    assert on_l4["work_seconds"] > 3 * planned["work_seconds"]


def test_a_profile_on_another_device_calibrates_the_plan(job_file, tmp_path):
    from llmbatch.cluster import profiles

    path = job_file(replicas=1)
    model = tmp_path / "llama-7b"
    before = json.loads(plan(path, "--accelerator", "H100", "--json").stdout)
    engine = {"dtype": "auto", "max_model_len": 2048, "tensor_parallel_size": 1, "enable_prefix_caching": True}
    identity = {"model_source": str(model), "model_fingerprint": model_store.fingerprint_of(str(model), model),
                "accelerator": "L4", "engine": engine}
    profiles.record("on-l4", identity, {"rows": 100, "replica_busy_seconds": 50.0, "input_tokens": 5000,
                                        "output_tokens": 25_600, "startup_seconds": 100.0})
    after = json.loads(plan(path, "--accelerator", "H100", "--json").stdout)
    assert after["profile"]["model"]["calibration"] == "a profile on L4 (on-l4)"
    assert "calibrated from a profile on L4 (on-l4) (decode x" in after["notes"][0]
    assert after["work_seconds"] != pytest.approx(before["work_seconds"], rel=0.01)


def test_a_checkpoint_of_config_json_alone_plans_with_tokens_estimated_from_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "count_input_tokens", COUNT_INPUT_TOKENS)
    model = tmp_path / "config-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "x" * 40}) + "\n" for _ in range(3)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "config-only", "model": {"source": str(model), "engine": {"max_model_len": 2048}},
        "input": {"path": str(prompts)}, "output": {"path": str(tmp_path / "out")}, "sampling": {"max_tokens": 64},
        "resources": {"accelerator": "gpu", "replicas": 1}}))
    result = plan(str(job), "--json")
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["input_tokens"] == 30   # 3 prompts of 40 characters, about 4 a token
    assert planned["input_tokens_method"] == ("counted every row (3); tokens estimated from the prompts' characters, "
                                              "about 4 a token, as the checkpoint has no tokenizer")
    assert planned["notes"][0].startswith("no profile: rates from the throughput model for A10G")


def test_a_released_size_name_plans_from_its_figures_and_leaves_nothing_behind(tmp_path):
    """model.source: Llama-2-70B (a size in cluster/families.yaml) plans without any checkpoint; submit and
    validate still refuse it, as it names no model they can run."""
    import tempfile
    from pathlib import Path

    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "q"}) + "\n")
    job = tmp_path / "size.yaml"
    job.write_text(yaml.safe_dump({"name": "sized", "model": {"source": "Llama-2-70B"},
                                   "input": {"path": str(prompts)}, "output": {"path": str(tmp_path / "out")},
                                   "resources": {"accelerator": "gpu"}}))
    scratch_before = set(Path(tempfile.gettempdir()).glob("llmbatch-size-*"))
    planned = json.loads(plan(str(job), "--accelerator", "H100", "--json").stdout)
    assert planned["model"] == "Llama-2-70B" and planned["tensor_parallel_size"] == 2   # 138 GB of bf16 weights
    assert set(Path(tempfile.gettempdir()).glob("llmbatch-size-*")) == scratch_before
    refused = CliRunner().invoke(main, ["validate", str(job)])
    assert refused.exit_code == 2 and "Llama-2-70B" in refused.stderr


def test_a_mixture_of_experts_size_name_is_refused_with_what_to_do(tmp_path):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "q"}) + "\n")
    job = tmp_path / "moe.yaml"
    job.write_text(yaml.safe_dump({"name": "moe", "model": {"source": "Mixtral-8x7B"},
                                   "input": {"path": str(prompts)}, "output": {"path": str(tmp_path / "out")}}))
    result = plan(str(job), "--accelerator", "H100")
    assert result.exit_code == 2 and "plan it from its config.json" in result.stderr
