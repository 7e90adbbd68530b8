"""`make bench`: the same chat prompts through plain vLLM, a bare ray.data.llm processor and `llmbatch submit`,
measured in the same run, at two sizes: a start-up-dominated job (the quickstart's size) and a steady-state one.

Each path runs in its own process and is timed as a whole from outside (interpreter start to exit). Plain vLLM
runs twice: with vLLM's default multiprocess engine and in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Every
path asks for the sampled token's logprob, which llmbatch's output rows carry (cumulative_logprob); plain
vLLM without it is printed for reference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("llmbatch"))
SUBJECTS = ["the moon", "rivers", "bread", "volcanoes", "bees", "trains", "chess", "the ocean",
            "glass", "clouds", "libraries", "bicycles", "tea", "mountains", "owls", "maps"]
ASKS = ["Explain {s} to a child.", "Give three facts about {s}.", "Write a haiku about {s}.",
        "Why do people care about {s}?", "Describe {s} in two sentences.", "What is surprising about {s}?",
        "List two questions a scientist might ask about {s}.", "Tell a very short story about {s}."]

PLAIN_VLLM = r'''
import json, sys, time
if __name__ == "__main__":
    t0 = time.perf_counter()
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    t1 = time.perf_counter()
    llm = LLM(model=args["model"], dtype="float32", max_model_len=2048, gpu_memory_utilization=0.5,
              enforce_eager=True, enable_prefix_caching=True)
    t2 = time.perf_counter()
    prompts = [json.loads(l)["prompt"] for l in open(args["data"], encoding="utf-8")]
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(max_tokens=args["max_tokens"], temperature=0.0, logprobs=args["logprobs"]),
                    use_tqdm=False)
    t3 = time.perf_counter()
    print("BENCH_RESULT " + json.dumps({"import": t1 - t0, "construct": t2 - t1, "generate": t3 - t2,
                      "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "rows": len(outs)}))
'''

RAY_DATA_LLM = r'''
import json, os, sys, time
if __name__ == "__main__":
    t0 = time.perf_counter()
    args = json.loads(sys.argv[1])
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    t1 = time.perf_counter()
    config = vLLMEngineProcessorConfig(
        model_source=args["model"],
        engine_kwargs={"dtype": "float32", "max_model_len": 2048, "gpu_memory_utilization": 0.5,
                       "enforce_eager": True, "enable_prefix_caching": True},
        batch_size=32, concurrency=1, placement_group_config={"bundle_per_worker": {"CPU": 1}},
        # at a whole CPU each, the chat-template, tokenize and detokenize actors would leave the engine none
        chat_template_stage={"enabled": True, "num_cpus": 0.25},
        tokenize_stage={"enabled": True, "num_cpus": 0.25},
        detokenize_stage={"enabled": True, "num_cpus": 0.25},
        log_engine_metrics=False)
    max_tokens = args["max_tokens"]
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": [{"role": "user", "content": row["prompt"]}],
                                "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0}},
        postprocess=lambda row: {"tokens": row["num_generated_tokens"]},
        preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25})
    # the read asks for a whole CPU by default, which the engine's and the stages' requests leave no room for
    rows = processor(ray.data.read_json(args["data"], ray_remote_args={"num_cpus": 0.25})).take_all()
    t2 = time.perf_counter()
    print("BENCH_RESULT " + json.dumps({"ray_start": t1 - t0, "run": t2 - t1,
                      "tokens": sum(int(r["tokens"]) for r in rows), "rows": len(rows)}))
'''


def _timed(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{proc.stderr[-4000:]}")
    return wall, proc.stdout


def _result(stdout: str) -> dict:
    return json.loads(next(l for l in stdout.splitlines() if l.startswith("BENCH_RESULT ")).split(" ", 1)[1])


def run_size(work: Path, model_path: str, prompts: int, max_tokens: int) -> dict[str, dict]:
    data = work / f"prompts-{prompts}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(prompts):
            subject = SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)]
            f.write(json.dumps({"prompt": ASKS[i % len(ASKS)].format(s=subject)}) + "\n")
    results: dict[str, dict] = {}
    args = {"model": model_path, "data": str(data), "max_tokens": max_tokens}
    plain = work / "plain_vllm.py"
    plain.write_text(PLAIN_VLLM)
    for name, env, logprobs in (("vllm_default", {}, 0), ("vllm_in_process", {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, 0),
                                ("vllm_in_process_no_logprobs", {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, None)):
        wall, out = _timed([sys.executable, str(plain), json.dumps({**args, "logprobs": logprobs})], env, cwd=work)
        results[name] = {"wall": wall, **_result(out)}
        print(f"  {name}: {wall:.1f} s", flush=True)
    bare = work / "ray_data_llm.py"
    bare.write_text(RAY_DATA_LLM)
    wall, out = _timed([sys.executable, str(bare), json.dumps(args)], cwd=work)
    results["ray_data_llm"] = {"wall": wall, **_result(out)}
    print(f"  ray_data_llm: {wall:.1f} s", flush=True)

    job = work / f"job-{prompts}.yaml"
    job.write_text(json.dumps({
        "name": "bench", "model": {"source": "smollm2-135m-instruct"},
        "input": {"path": str(data)}, "sampling": {"max_tokens": max_tokens, "temperature": 0.0},
        "output": {"path": str(work / "out")}, "resources": {"replicas": 1, "batch_size": 32},
    }))
    run_id = f"bench-{prompts}"
    wall, _ = _timed([CLI, "submit", str(job), "--run-id", run_id], cwd=REPO)
    manifest = json.loads((work / "out" / run_id / "_manifest.json").read_text())
    results["llmbatch"] = {"wall": wall, "tokens": manifest["tokens"]["generated"], "rows": manifest["rows"]["ok"],
                           "timings": manifest["timings"]}
    print(f"  llmbatch: {wall:.1f} s", flush=True)
    return results


def report(prompts: int, r: dict[str, dict]) -> None:
    ours = r["llmbatch"]
    t = ours["timings"]
    print(f"\n{prompts} prompts: where the time went (s)")
    print(f"{'path':<36} {'start (import/Ray)':>18} {'engine start':>12} {'generation':>10} {'end to end':>10} "
          f"{'gen tok/s':>9}")
    for name in ("vllm_default", "vllm_in_process", "vllm_in_process_no_logprobs"):
        p = r[name]
        print(f"{'plain vLLM ' + name[5:]:<36} {p['import']:>18.1f} {p['construct']:>12.1f} {p['generate']:>10.1f} "
              f"{p['wall']:>10.1f} {p['tokens'] / p['generate']:>9.1f}")
    b = r["ray_data_llm"]
    print(f"{'bare ray.data.llm':<36} {b['ray_start']:>18.1f} {'-':>12} {b['run']:>10.1f} {b['wall']:>10.1f} "
          f"{'-':>9}")
    before_engine = (t["launch"] or 0) + (t["prepare"] or 0) + (t["ray_start"] or 0) + (t["pre_pass"] or 0)
    print(f"{'llmbatch submit':<36} {before_engine:>18.1f} {t['engine_start']:>12.1f} {t['generation']:>10.1f} "
          f"{ours['wall']:>10.1f} {ours['tokens'] / t['generation']:>9.1f}")
    print("  llmbatch phases: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if v is not None))
    gen = (ours["tokens"] / t["generation"]) / (r["vllm_in_process"]["tokens"] / r["vllm_in_process"]["generate"])
    print(f"  end to end: llmbatch / plain vLLM default x{ours['wall'] / r['vllm_default']['wall']:.2f}, "
          f"/ plain vLLM in-process x{ours['wall'] / r['vllm_in_process']['wall']:.2f}, "
          f"/ bare ray.data.llm x{ours['wall'] / b['wall']:.2f}")
    print(f"  generation tok/s: llmbatch / plain vLLM in-process x{gen:.2f} (same logprobs); "
          f"/ in-process without logprobs x{(ours['tokens'] / t['generation']) / (r['vllm_in_process_no_logprobs']['tokens'] / r['vllm_in_process_no_logprobs']['generate']):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="12,128", help="comma-separated prompt counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    subprocess.run([CLI, "models", "prepare", "smollm2-135m-instruct"], check=True, capture_output=True)
    from llmbatch.cluster.model_store import resolve_local

    model_path = str(resolve_local("smollm2-135m-instruct"))
    work = Path(tempfile.mkdtemp(prefix="llmbatch-bench-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"bench: chat prompts x max {args.max_tokens} tokens, greedy, smollm2-135m-instruct, float32 CPU; "
          f"sizes {sizes}", flush=True)
    results = {}
    for prompts in sizes:
        print(f"{prompts} prompts:", flush=True)
        results[prompts] = run_size(work, model_path, prompts, args.max_tokens)
    for prompts, r in results.items():
        report(prompts, r)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nraw figures: {work / 'results.json'}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"{_memory_gib():.0f} GiB RAM")


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    main()
