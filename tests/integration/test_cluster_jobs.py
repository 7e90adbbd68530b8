"""Jobs on a real two-node Ray cluster on 127.0.0.1 with token auth on: Jobs API submission, control verbs,
the dashboard's job list, GPU replicas spread over nodes, refusal before start, cancel, auth errors."""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import AWS_TEST_ENV
from support import CLI, DEMO_MODEL, free_port, read_output, run_cli, run_cli_in_terminal, screen_text, write_job

RAY = str(Path(CLI).with_name("ray"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_model):
    """A head and a second node, each declaring 2 CPUs and 1 logical GPU, token auth on, each with a model cache
    of its own (LLMBATCH_HOME; the demo model is in both) and the credentials of the test's S3 endpoint. The
    second node runs in a mount namespace of its own where `head_only` is an empty tmpfs: what the head keeps
    there, it does not see (mounting needs root, or sudo)."""
    from llmbatch.cluster.home import models_dir

    root = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    homes = {"head": root / "head-cache", "worker": root / "worker-cache"}
    for home in homes.values():
        shutil.copytree(models_dir() / demo_model, home / "models" / demo_model, copy_function=os.link)
    env = {**os.environ, **AWS_TEST_ENV, "HOME": str(root / "home"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "LLMBATCH_HOME": str(homes["head"]),
           "PATH": f"{Path(CLI).parent}:{os.environ['PATH']}"}
    (root / "home").mkdir()
    gcs, dashboard = free_port(), free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "1", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dashboard), "--include-dashboard", "true", *common],
                   env=env, check=True, capture_output=True, timeout=180)
    head_only = root / "head-only"
    head_only.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n", "--preserve-env"]
    worker = " ".join(shlex.quote(a) for a in [RAY, "start", "--address", f"127.0.0.1:{gcs}", *common])
    try:
        subprocess.run([*sudo, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o mode=1777 head-only {shlex.quote(str(head_only))} && exec {worker}"],
                       env={**env, "LLMBATCH_HOME": str(homes["worker"])}, check=True, capture_output=True,
                       timeout=180)
        client_env = {"HOME": env["HOME"], "RAY_AUTH_TOKEN": token, "LLMBATCH_HOME": env["LLMBATCH_HOME"]}
        yield {"address": f"http://127.0.0.1:{dashboard}", "token": token, "env": client_env,
               "head_only": head_only, "homes": homes}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _job(tmp_path: Path, rows: int, source: str = DEMO_MODEL, **resources) -> Path:
    """The nodes' GPUs are logical: vLLM's CPU build runs the replicas, where compiling the model (the GPU
    default) would take minutes, hence enforce_eager, and where a GPU's scheduler limits would make vLLM's
    start-up profiling pass thousands of tokens, hence small ones."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"n": i, "prompt": f"Count from {i} to {i + 3}."}) + "\n"
                            for i in range(rows)), encoding="utf-8")
    return write_job(tmp_path / "job.yaml", name="cluster-job", model={
        "source": source, "engine": {"dtype": "float32", "gpu_memory_utilization": 0.2, "enforce_eager": True,
                                     "max_num_seqs": 16, "max_num_batched_tokens": 2048}},
        input={"path": str(data)}, sampling={"max_tokens": 8}, output={"path": str(tmp_path / "out")},
        resources={"accelerator": "gpu", "batch_size": 2, **resources})


def _dashboard_jobs(address: str, token: str | None):
    request = urllib.request.Request(f"{address}/api/jobs/")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_submit_runs_on_the_cluster_with_gpu_replicas_on_both_nodes(cluster, tmp_path: Path, s3):
    """`submit --address --wait` runs the pipeline as a Ray job whose submission id is the run id;
    list/status/logs and the dashboard show it; two 1-GPU replicas land on the two nodes. The job's python
    scorer is a module only the submitter has (on its PYTHONPATH): it ships with the job. The model is an
    s3:// prefix: the driver copies its config and tokenizer only, and each node's engine copies the weights
    into that node's own cache."""
    from llmbatch.cluster.model_store import ModelRef, resolve_local, weights_complete

    s3.mkdir("models")
    local = resolve_local(DEMO_MODEL)
    for path in local.iterdir():
        if path.is_file() and not path.name.startswith("."):
            s3.put_file(str(path), f"models/smollm2/{path.name}")
    source = "s3://models/smollm2"
    address = cluster["address"]
    env = {**cluster["env"], "PYTHONPATH": str(Path(__file__).parent)}
    job = _job(tmp_path, rows=24, source=source, replicas=2)
    write_job(job, **{**yaml.safe_load(job.read_text()), "scoring": [
        {"name": "words", "kind": "python", "function": "row_scorers:words_per_answer"}]})
    code, received = run_cli_in_terminal("submit", str(job), "--address", address, "--run-id", "cl-run", "--wait",
                                         env=env)
    shown = screen_text(received)
    assert code == 0, shown[-4000:]
    for phase in ("waiting for the cluster to start the run", "starting engines",
                  "finished: succeeded"):
        assert phase in shown, (phase, shown[-4000:])
    assert "24/24 rows" in shown and "0 error(s)" in shown and f"{address}/#/jobs/cl-run" in shown
    assert f"llmbatch logs cl-run --address {address}" in shown
    for noise in ("pid=", "INFO ", "WARNING ", '{"'):   # Ray's and vLLM's lines, the raw events
        assert noise not in shown, (noise, shown[-4000:])
    assert shown.rfind("phase") < shown.find("run cl-run: succeeded") < shown.find("run cl-run: SUCCEEDED")

    rows, manifest = read_output(str(tmp_path / "out" / "cl-run"))
    assert len(rows) == 24 and {r.n for r in rows} == set(range(24)) and all(r.error is None for r in rows)
    assert all(r.score_words == len(r.generated_text.split()) for r in rows)
    replicas = manifest["replicas"]
    assert len(replicas) == 2 and len({r["node_id"] for r in replicas}) == 2
    for replica in replicas:   # the view showed each replica on its node, with its rows
        state = f"generating, {replica['rows']} rows" if replica["rows"] else "ready, 0 rows"
        assert f"{replica['replica'][:8]} on node {replica['node_id'][:8]}: {state}" in shown, shown[-4000:]
    assert sum(r["rows"] for r in replicas) == 24
    assert manifest["engine"]["accelerator"] == "gpu"
    assert (manifest["engine"]["max_num_seqs"], manifest["engine"]["max_num_batched_tokens"]) == (16, 2048)
    assert manifest["engine"]["max_model_len"] == -1     # no max_model_len: vLLM fits the context to memory
    assert manifest["model"]["fingerprint"].startswith("etag:")
    ref = ModelRef(source, "s3")
    driver_copy = cluster["homes"]["head"] / ref.config_dir.relative_to(ref.config_dir.parents[2])
    assert (driver_copy / "tokenizer.json").is_file() and not list(driver_copy.glob("*.safetensors"))
    for home in cluster["homes"].values():   # each node's engine replica fetched the weights into its own cache
        assert weights_complete(home / ref.cache_dir.relative_to(ref.cache_dir.parents[2]))

    listing = run_cli("list", "--address", address, env=env, check=True).stdout
    line = next(l for l in listing.splitlines() if l.startswith("cl-run "))
    assert "SUCCEEDED" in line and "24/0" in line and "cluster-job" in line
    status = run_cli("status", "cl-run", "--address", address, env=env, check=True).stdout
    assert "status:      SUCCEEDED" in status and "rows_ok:     24" in status
    logs = run_cli("logs", "cl-run", "--address", address, env=env, check=True).stdout
    assert "] run_finished" in logs and "cl-run" in logs and "run cl-run: succeeded" in logs
    assert "model_config_copy_started" in logs and "model_copy_started" not in logs

    jobs = _dashboard_jobs(address, cluster["token"])
    ours = [j for j in jobs if j.get("submission_id") == "cl-run"]
    assert ours and ours[0]["metadata"] == {"llmbatch": "1", "job": "cluster-job", "run_id": "cl-run",
                                            "model": source, "output": str(tmp_path / "out" / "cl-run")}
    with pytest.raises(urllib.error.HTTPError) as unauthorized:
        _dashboard_jobs(address, None)
    assert unauthorized.value.code == 401

    token = cluster["token"]
    assert token not in received + logs + json.dumps(manifest) + json.dumps(ours[0])


def test_a_replica_larger_than_any_node_is_refused_before_start(cluster, tmp_path: Path):
    address, env = cluster["address"], cluster["env"]
    job = _job(tmp_path, rows=4, replicas=1)
    proc = run_cli("submit", str(job), "--address", address, "--run-id", "too-big", "--wait",
                   "--set", "model.engine.tensor_parallel_size=2", env=env)
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]   # the driver's own exit code
    assert proc.stderr.startswith("error: model.engine.tensor_parallel_size: one replica needs 2 GPUs on a single "
                                  "node (tensor_parallel_size=2); the largest node has 1"), proc.stderr
    assert "run too-big: FAILED" in proc.stdout and "run_started" not in proc.stdout
    assert not (tmp_path / "out" / "too-big" / "_manifest.json").exists()


def test_a_local_path_one_node_does_not_see_is_refused_naming_the_node(cluster, tmp_path: Path):
    """Input kept where only the head sees it: the run stops before any engine starts, naming the node and the
    path, and writes no part."""
    address, env = cluster["address"], cluster["env"]
    job = _job(tmp_path, rows=4, replicas=1)
    hidden = cluster["head_only"] / "prompts.jsonl"
    hidden.write_bytes((tmp_path / "prompts.jsonl").read_bytes())
    write_job(job, **{**yaml.safe_load(job.read_text()), "input": {"path": str(hidden)}})
    proc = run_cli("submit", str(job), "--address", address, "--run-id", "unshared", "--wait", env=env)
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"does not see input.path: {hidden} (not there)" in proc.stderr, proc.stderr[-4000:]
    assert "use s3:// (or storage every node mounts at the same place)" in proc.stderr
    assert "run_started" not in proc.stdout and not list((tmp_path / "out").rglob("*.parquet"))


def test_cancel_stops_a_run_and_resume_on_the_cluster_finishes_it(cluster, tmp_path: Path):
    """A run cancelled once parts are written commits no manifest; a second submit of it while it runs is
    refused; `submit --resume --address` continues it as a new attempt that keeps the cancelled one's rows."""
    address, env = cluster["address"], cluster["env"]
    rows = 48
    job = _job(tmp_path, rows=rows, replicas=1)
    write_job(job, **{**yaml.safe_load(job.read_text()),
                      "output": {"path": str(tmp_path / "out"), "rows_per_part": 4}})
    run = tmp_path / "out" / "to-cancel"
    run_cli("submit", str(job), "--address", address, "--run-id", "to-cancel", env=env, check=True)
    deadline = time.time() + 420
    while time.time() < deadline and not list(run.glob("*.parquet")):
        time.sleep(1)
    assert list(run.glob("*.parquet")), "no part was written"
    twice = run_cli("submit", str(job), "--address", address, "--run-id", "to-cancel", env=env)
    assert twice.returncode == 2 and "run to-cancel is still RUNNING on the cluster" in twice.stderr, twice.stderr
    proc = run_cli("cancel", "to-cancel", "--address", address, env=env, check=True)
    assert "run to-cancel: STOPPED" in proc.stdout
    status = run_cli("status", "to-cancel", "--address", address, env=env, check=True).stdout
    assert "status:      STOPPED" in status
    assert not (run / "_manifest.json").exists()

    resumed = run_cli("submit", str(job), "--address", address, "--resume", "to-cancel", env=env, check=True)
    assert "submitted to-cancel as to-cancel.attempt-2" in resumed.stdout
    assert f"watch it with: llmbatch watch to-cancel --address {address}" in resumed.stdout
    watched = run_cli("watch", "to-cancel", "--address", address, env=env)
    assert watched.returncode == 0, watched.stdout[-4000:] + watched.stderr[-4000:]
    progress = [line for line in watched.stdout.splitlines() if "] progress" in line]   # no terminal: log lines
    assert progress and all("rows_done=" in line and "replicas=" not in line for line in progress)
    assert "] run_finished" in watched.stdout and "pid=" not in watched.stdout
    assert "run to-cancel: succeeded" in watched.stdout and watched.stdout.endswith("run to-cancel: SUCCEEDED\n")
    out, manifest = read_output(str(run))
    assert sorted(r.n for r in out) == list(range(rows)) and all(r.error is None for r in out)
    assert manifest["resumed"]["rows_skipped"] >= 4 and manifest["resumed"]["automatic"] is False
    assert sum(r["rows"] for r in manifest["replicas"]) == rows - manifest["resumed"]["rows_skipped"]
    status = run_cli("status", "to-cancel", "--address", address, env=env, check=True).stdout
    assert "status:      SUCCEEDED" in status and "attempts:    2" in status and f"rows_ok:     {rows}" in status
    listing = run_cli("list", "--address", address, env=env, check=True).stdout
    assert len([l for l in listing.splitlines() if l.startswith("to-cancel ")]) == 1


def test_wrong_token_and_unreachable_address_fail_with_one_line(cluster, tmp_path: Path):
    env = {**cluster["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    proc = run_cli("list", "--address", cluster["address"], env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"error: the Ray cluster at {cluster['address']} rejected the token from "
                                   "RAY_AUTH_TOKEN: it does not match the cluster's token")
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    proc = run_cli("list", "--address", cluster["address"], env=env)
    assert proc.returncode != 0 and "requires a token and none was sent" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("submit", str(_job(tmp_path, rows=1)), "--address", f"http://127.0.0.1:{free_port()}",
                   env=cluster["env"])
    assert proc.returncode != 0 and "cannot reach the Ray Jobs API at http://127.0.0.1:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_with_an_address_is_capped_by_the_clusters_capacity(cluster, tmp_path: Path):
    """`plan --address` asks the cluster what it holds (two 1-GPU nodes) and caps `replicas: auto` there; two
    replicas miss the deadline, so the plan (and `submit --dry-run`) exits 1 with the reason; a wrong token
    fails in one line."""
    job = _job(tmp_path, rows=2000, replicas="auto", deadline="4m")
    args = ("--set", "sampling.max_tokens=1024", "--address", cluster["address"])
    proc = run_cli("plan", str(job), "--json", *args, env=cluster["env"])
    assert proc.returncode == 1, proc.stderr
    planned = json.loads(proc.stdout)
    assert planned["cluster"]["nodes"] == 2 and planned["cluster"]["gpus"] == 2.0
    assert planned["cluster"]["replica_capacity"] == 2 and planned["replicas"] == 2
    assert any(n.startswith("capped at 2 replica(s): what the cluster at") for n in planned["notes"])
    missed = (f"resources.deadline 4m is missed: 2 replica(s) finish in about {planned['wall_seconds']:.0f} s; "
              f"the cluster at {cluster['address']} holds 2 at once")
    assert planned["problems"] == [missed] and f"  {missed}" in proc.stderr.splitlines()
    dry = run_cli("submit", str(job), "--dry-run", *args, env=cluster["env"])
    assert dry.returncode == 1 and f"  {missed}" in dry.stderr.splitlines()
    assert "replicas           2" in dry.stdout and "holds 2 replica(s) of this shape" in dry.stdout
    proc = run_cli("plan", str(job), *args, env={**cluster["env"], "RAY_AUTH_TOKEN": "not-the-token"})
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "rejected the token" in proc.stderr
