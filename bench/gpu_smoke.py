"""A smoke check for a machine with NVIDIA GPUs and the CUDA build of vLLM, run by hand (it needs GPUs, so
`make test` cannot run it):

    python bench/gpu_smoke.py --model Qwen/Qwen2.5-1.5B-Instruct [--prompts 2000] [--out /tmp/llmbatch-smoke]

It checks, in order, and prints PASS or FAIL for each:
 1. the engine's scheduler limits are vLLM's offline ones for this GPU (manifest's `engine` section);
 2. the engine ran bf16/fp16 (not float32) with CUDA graphs (no enforce_eager), and vLLM fitted the model's
    context to memory (no max_model_len in the job: -1 in the manifest, vLLM's "Auto-fit max_model_len" line);
 3. llmbatch's output tokens/s against `vllm bench throughput` on the same prompts' shape, same box;
 4. GPU memory returns to where it was once a run has ended;
 5. with 2 or more GPUs: a TP=2 job with a judge pass on the same model finishes (the first pass's placement
    groups are released; STRICT_PACK keeps each replica's two GPUs on one node), and no placement group is
    left afterwards.
Exit status: the number of failed checks.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).with_name("llmbatch"))
failures = 0


def check(name: str, ok: bool, detail: str) -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def gpus() -> list[tuple[str, int]]:
    """(name, MiB used) of each GPU."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [(name.strip(), int(used)) for name, used in (line.rsplit(",", 1) for line in out.strip().splitlines())]


def device_label(name: str) -> str | None:
    """Ray's accelerator label for an nvidia-smi product name, as Ray derives it: the model word after the brand,
    without a '-SKU' suffix ('NVIDIA H100 80GB HBM3' -> H100, 'NVIDIA A100-SXM4-80GB' -> A100)."""
    found = re.match(r"\w+\s+([A-Z0-9]+)", name)
    return found.group(1) if found else None


def write_job(folder: Path, model: str, prompts: int, input_words: int, max_tokens: int, **extra) -> Path:
    data = folder / "prompts.jsonl"
    if not data.exists():
        filler = " ".join(["the river runs past the old mill and on to the sea"] * (input_words // 12 + 1))
        data.write_text("".join(json.dumps({"id": i, "prompt": f"{i}: {filler} Summarize this."}) + "\n"
                                for i in range(prompts)), encoding="utf-8")
    import yaml

    job = {"name": "gpu-smoke", "model": {"source": model, **extra.pop("model", {})},
           "input": {"path": str(data), "id_column": "id"},
           "sampling": {"max_tokens": max_tokens, "temperature": 0.0},
           "output": {"path": str(folder / "out")}, **extra}
    path = folder / f"job-{len(list(folder.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def submit(job: Path, run_id: str, log: Path) -> tuple[int, dict | None, str]:
    with open(log, "w") as sink:
        code = subprocess.run([CLI, "submit", str(job), "--run-id", run_id, "--show-worker-logs"],
                              stdout=sink, stderr=subprocess.STDOUT).returncode
    manifest_path = job.parent / "out" / run_id / "_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    return code, manifest, log.read_text(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a hub id or local checkpoint that fits one GPU")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--input-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="/tmp/llmbatch-gpu-smoke")
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)

    from llmbatch.cluster.accelerators import device_for_label
    from llmbatch.cluster.engine_limits import offline_defaults

    devices = gpus()
    name, baseline = devices[0]
    label = device_label(name)
    expected = offline_defaults(device_for_label(label))
    if label == "A100" and "80GB" in name.upper():  # Ray's label covers both cards; the limits are the same
        print("A100 80 GB: Ray labels it A100, which llmbatch plans as the 40 GB card", flush=True)
    print(f"GPUs: {len(devices)} x {name} (Ray label {label}); expected limits {expected}", flush=True)

    job = write_job(folder, args.model, args.prompts, args.input_words, args.max_tokens,
                    resources={"accelerator": "gpu", "accelerator_type": label} if label else {"accelerator": "gpu"})
    code, manifest, log = submit(job, f"tp1-{int(time.time())}", folder / "tp1.log")
    check("run", code == 0 and manifest is not None, f"exit {code}; log {folder / 'tp1.log'}")
    if manifest is None:
        sys.exit(failures)
    engine = manifest["engine"]
    check("scheduler limits", (engine.get("max_num_seqs"), engine.get("max_num_batched_tokens")) == expected,
          f"engine ran max_num_seqs={engine.get('max_num_seqs')}, "
          f"max_num_batched_tokens={engine.get('max_num_batched_tokens')}")
    captured = re.search(r"[Cc]apturing CUDA graph|Graph capturing finished", log) is not None
    check("dtype and CUDA graphs", engine.get("dtype") != "float32" and not engine.get("enforce_eager") and captured,
          f"dtype {engine.get('dtype')}, enforce_eager {engine.get('enforce_eager')}, graph capture logged: {captured}")
    fitted = re.search(r"Auto-fit max_model_len: [^\n]*", log)
    check("max_model_len fitted to memory", engine.get("max_model_len") == -1 and fitted is not None,
          f"manifest max_model_len {engine.get('max_model_len')}; vLLM: {fitted.group(0) if fitted else 'no auto-fit line'}")
    ours = manifest.get("output_tokens_per_second") or 0.0

    bench = subprocess.run(["vllm", "bench", "throughput", "--model", args.model, "--num-prompts", str(args.prompts),
                            "--input-len", str(manifest["tokens"]["input"] // max(1, manifest["rows"]["ok"])),
                            "--output-len", str(args.max_tokens), "--max-num-seqs", str(expected[0]),
                            "--max-num-batched-tokens", str(expected[1])], capture_output=True, text=True)
    found = re.search(r"([\d.]+) output tokens/s", bench.stdout + bench.stderr)
    theirs = float(found.group(1)) if found else 0.0
    check("throughput vs vllm bench throughput", bool(found) and ours >= 0.8 * theirs,
          f"llmbatch {ours:.0f} output tok/s (generation only), vllm bench {theirs:.0f}: "
          f"x{ours / theirs if theirs else 0:.2f} (target >= 0.8)")

    time.sleep(5)  # the run's processes have exited; the driver frees its GPU memory on exit
    after = gpus()[0][1]
    check("GPU memory released", after <= baseline + 512, f"{after} MiB used after the run, {baseline} before")

    if len(devices) >= 2:
        judge = [{"name": "judged", "kind": "judge", "rubric": "Is the answer a summary? {generated_text}",
                  "scale": [1, 5]}]
        job = write_job(folder, args.model, min(args.prompts, 200), args.input_words, args.max_tokens,
                        model={"engine": {"tensor_parallel_size": 2}}, scoring=judge,
                        resources={"accelerator": "gpu"})
        code, manifest, log = submit(job, f"tp2-{int(time.time())}", folder / "tp2.log")
        check("TP=2 with a judge pass", code == 0 and manifest is not None and "judge_pass_started" in log,
              f"exit {code}; placement groups released: {log.count('placement_groups_released')} time(s); "
              f"log {folder / 'tp2.log'}")
        after = gpus()
        check("GPU memory released after TP=2", all(used <= baseline + 512 for _, used in after),
              f"{[used for _, used in after]} MiB used")
    else:
        print("SKIP  TP=2 with a judge pass: one GPU on this machine", flush=True)
    sys.exit(failures)


if __name__ == "__main__":
    main()
