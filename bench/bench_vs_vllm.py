"""`make bench`: the same prompts through plain vLLM (LLM.chat in one process) and through `llmbatch submit`.

Prints wall seconds and output tokens/s of each, and llmbatch's ratio to plain vLLM, measured in this run.
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
    args = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    llm = LLM(model=args["model"], dtype="float32", max_model_len=2048, gpu_memory_utilization=0.5,
              enforce_eager=True, enable_prefix_caching=True)
    t1 = time.perf_counter()
    prompts = [json.loads(l)["prompt"] for l in open(args["data"], encoding="utf-8")]
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(max_tokens=args["max_tokens"], temperature=0.0), use_tqdm=False)
    t2 = time.perf_counter()
    print("BENCH_RESULT " + json.dumps({"wall": t2 - t0, "generate": t2 - t1,
                      "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "rows": len(outs)}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    subprocess.run([CLI, "models", "prepare", "smollm2-135m-instruct"], check=True, capture_output=True)
    from cluster.model_store import resolve_local

    model_path = str(resolve_local("smollm2-135m-instruct"))
    work = Path(tempfile.mkdtemp(prefix="llmbatch-bench-"))
    data = work / "prompts.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(args.prompts):
            f.write(json.dumps({"prompt": ASKS[i % len(ASKS)].format(s=SUBJECTS[(i // len(ASKS)) % len(SUBJECTS)])}) + "\n")

    print(f"bench: {args.prompts} chat prompts x max {args.max_tokens} tokens, greedy, smollm2-135m-instruct, float32 CPU",
          flush=True)
    script = work / "plain_vllm.py"
    script.write_text(PLAIN_VLLM)
    proc = subprocess.run([sys.executable, str(script), json.dumps(
        {"model": model_path, "data": str(data), "max_tokens": args.max_tokens})],
        capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        sys.exit(f"plain vLLM failed:\n{proc.stderr[-4000:]}")
    plain = json.loads(next(line for line in proc.stdout.splitlines()
                            if line.startswith("BENCH_RESULT ")).split(" ", 1)[1])

    job = work / "job.yaml"
    job.write_text(json.dumps({
        "name": "bench", "model": {"source": "smollm2-135m-instruct"},
        "input": {"path": str(data)}, "sampling": {"max_tokens": args.max_tokens, "temperature": 0.0},
        "output": {"path": str(work / "out")}, "resources": {"replicas": 1, "batch_size": 32},
    }))
    t0 = time.perf_counter()
    proc = subprocess.run([CLI, "submit", str(job), "--run-id", "bench"], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"llmbatch failed:\n{proc.stderr[-4000:]}")
    manifest = json.loads((work / "out" / "bench" / "_manifest.json").read_text())
    ours = {"wall": wall, "tokens": manifest["tokens"]["generated"], "rows": manifest["rows"]["ok"]}

    rows = [
        ("plain vLLM, LLM.chat (incl. engine start)", plain["wall"], plain["tokens"]),
        ("plain vLLM, generation only", plain["generate"], plain["tokens"]),
        ("llmbatch submit (CLI, Ray, engine start, write)", ours["wall"], ours["tokens"]),
    ]
    print(f"\n{'path':<50} {'wall s':>8} {'out tokens':>11} {'out tok/s':>10}")
    for name, seconds, tokens in rows:
        print(f"{name:<50} {seconds:>8.1f} {tokens:>11} {tokens / seconds:>10.1f}")
    ratio_wall = ours["wall"] / plain["wall"]
    ratio_tps = (ours["tokens"] / ours["wall"]) / (plain["tokens"] / plain["wall"])
    print(f"\nllmbatch / plain vLLM end to end: wall x{ratio_wall:.2f}, output tok/s x{ratio_tps:.2f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"{_memory_gib():.0f} GiB RAM")


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    main()
