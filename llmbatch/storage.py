"""Local and S3 storage behind one interface, with errors a user can act on."""
from __future__ import annotations

import errno
import os
import posixpath
from contextlib import contextmanager
from typing import Iterator

import fsspec

from llmbatch.errors import UserError

S3_SCHEMES = ("s3://", "s3a://")


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEMES)


def s3_endpoint() -> str | None:
    """The S3 endpoint override, as the AWS CLI reads it: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem():
    """An s3fs filesystem on the standard AWS credential chain, honouring the endpoint override."""
    import s3fs

    client_kwargs = {}
    endpoint = s3_endpoint()
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    # Listings must reflect writes made moments ago (by this run or another process).
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True)


def filesystem_for(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it): s3 paths lose their scheme, local paths become absolute."""
    if is_s3(path):
        return s3_filesystem(), path.split("://", 1)[1].rstrip("/")
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def write_whole(fs: fsspec.AbstractFileSystem, inner: str, body: bytes) -> None:
    """Write a file in one step (a rename locally, a single PUT on S3): a reader never sees half of it, and a
    failed local write (a full disk) leaves no temporary file behind."""
    if getattr(fs, "local_file", False):
        with atomic_writer(fs, inner) as handle:
            handle.write(body)
    else:
        fs.pipe_file(inner, body)


def create_once(fs: fsspec.AbstractFileSystem, inner: str, body: bytes) -> bool:
    """Create the file with `body` unless it exists; whether this call created it. Of two writers racing for one
    name exactly one wins: S3's conditional PUT (`If-None-Match: *`), locally a hard link of a whole temporary
    file (which fails when the name exists, and never shows a half-written file)."""
    if not getattr(fs, "local_file", False):
        try:
            fs.pipe_file(inner, body, mode="create")
            return True
        except FileExistsError:
            return False
    import uuid

    os.makedirs(os.path.dirname(inner), exist_ok=True)
    tmp = f"{inner}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(body)
        os.link(tmp, inner)
        return True
    except FileExistsError:
        return False
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_local(path, body: bytes) -> None:
    """Write a local file in one step: a crash leaves the old file or the new one, never half of either."""
    from fsspec.implementations.local import LocalFileSystem

    write_whole(LocalFileSystem(), os.path.abspath(path), body)


@contextmanager
def atomic_writer(fs: fsspec.AbstractFileSystem, inner: str) -> Iterator:
    """A binary file handle whose content appears whole at `inner` when the block ends, or not at all when it
    raises: a temporary file renamed into place locally; one multipart upload on S3, aborted on failure."""
    if getattr(fs, "local_file", False):
        import uuid

        os.makedirs(os.path.dirname(inner), exist_ok=True)
        tmp = f"{inner}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as handle:
                yield handle
            os.replace(tmp, inner)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    handle = fs.open(inner, "wb")
    try:
        yield handle
    except BaseException:
        discard = getattr(handle, "discard", None)
        if discard is not None:
            discard()
        raise
    handle.close()


def full_uri(path: str, inner: str) -> str:
    """Put the scheme of `path` back on a filesystem-internal path."""
    return f"s3://{inner}" if is_s3(path) else inner


def join(base: str, *parts: str) -> str:
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise UserError(f"path part {part!r} would escape {base}")
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def local_child(root: str, relative: str, *, source: str) -> str:
    """`root/relative` for a name that came from remote storage (an S3 key below a prefix), refused when it is
    absolute or would climb out of `root`: a remote listing must never choose where a local file lands."""
    parts = relative.replace("\\", "/").split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in relative:
        raise UserError(f"{source}: the key {relative!r} would be written outside {root}; "
                        "refusing to copy it (remove or rename that key)")
    path = os.path.realpath(os.path.join(root, *parts))
    if not path.startswith(os.path.realpath(root).rstrip("/") + "/"):
        raise UserError(f"{source}: the key {relative!r} would be written outside {root} (through a link); "
                        "refusing to copy it")
    return path


def location(path: str) -> str:
    """A path comparable with others: s3://bucket/key, or an absolute local path; no glob part, no '/' at the end."""
    cut = min((path.find(c) for c in "*?[" if c in path), default=-1)
    if cut >= 0:
        path = path[:cut].rsplit("/", 1)[0]
    if is_s3(path):
        return "s3://" + path.split("://", 1)[1].rstrip("/")
    return os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"


def is_within(child: str, parent: str) -> bool:
    """Whether location `child` is `parent` or lies under it."""
    child, parent = location(child), location(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_bucket(path: str, field: str) -> None:
    """For an s3:// path, fail early (naming the YAML field) when its bucket does not exist."""
    if not is_s3(path):
        return
    bucket, _ = bucket_and_key(path)
    fs, _ = filesystem_for(path)
    with storage_errors(path, "reach"):
        exists = fs.exists(bucket)
    if not exists:
        endpoint = s3_endpoint()
        raise UserError(f"{field}: bucket '{bucket}' does not exist" + (f" at {endpoint}" if endpoint else ""))


def read_json(uri: str, action: str = "read"):
    """The JSON document at `uri`, or None when there is none."""
    import json

    fs, inner = filesystem_for(uri)
    with storage_errors(uri, action):
        if not fs.exists(inner):
            return None
        with fs.open(inner, "rb") as handle:
            return json.loads(handle.read())


def bucket_and_key(path: str) -> tuple[str, str]:
    inner = path.split("://", 1)[1] if "://" in path else path
    bucket, _, key = inner.partition("/")
    return bucket, key


def describe_storage_error(exc: BaseException, path: str, action: str) -> str:
    """One line that says what failed on which bucket/key and what to do about it."""
    text = f"{type(exc).__name__}: {exc}"
    if not is_s3(path):
        if getattr(exc, "errno", None) == errno.ENOSPC:
            return (f"cannot {action} {path}: no space left on the device; free space there (or point the job at "
                    "another disk) and submit the same run id again to resume")
        if getattr(exc, "errno", None) == errno.EROFS:
            return f"cannot {action} {path}: the file system is read-only"
        if isinstance(exc, FileNotFoundError):
            return f"cannot {action} {path}: no such file or directory"
        if isinstance(exc, PermissionError):
            return f"cannot {action} {path}: permission denied"
        return f"cannot {action} {path}: {exc}"
    bucket, key = bucket_and_key(path)
    where = f"bucket '{bucket}'" + (f", key '{key}'" if key else "")
    endpoint = s3_endpoint()
    inner = path.split("://", 1)[-1]
    lowered = text.replace(path, "").replace(inner, "").lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "the specified bucket does not exist" in lowered:
        return f"cannot {action} {path}: bucket '{bucket}' does not exist" + (f" at {endpoint}" if endpoint else "")
    if "nocredentials" in lowered or "unable to locate credentials" in lowered:
        return (f"cannot {action} {path}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or an instance role")
    if "invalidaccesskeyid" in lowered or "signaturedoesnotmatch" in lowered:
        return (f"cannot {action} {path}: the AWS credentials were rejected for {where}; "
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(exc, PermissionError) or "accessdenied" in lowered or "forbidden" in lowered or " 403" in lowered:
        return f"cannot {action} {path}: access denied to {where}; the credentials in use lack permission"
    if "could not connect" in lowered or "connect timeout" in lowered or "endpointconnectionerror" in lowered \
            or "cannot connect" in lowered:
        return (f"cannot {action} {path}: S3 endpoint {endpoint or '(AWS default)'} is unreachable; "
                "check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network")
    if isinstance(exc, FileNotFoundError):
        return f"cannot {action} {path}: {where} not found"
    return f"cannot {action} {path}: {text}"


@contextmanager
def storage_errors(path: str, action: str) -> Iterator[None]:
    """Turn storage exceptions into a UserError naming the bucket/key."""
    try:
        yield
    except _storage_exceptions() as exc:
        raise UserError(describe_storage_error(exc, path, action)) from exc


def _storage_exceptions() -> tuple[type[BaseException], ...]:
    """OS errors (s3fs maps most S3 failures to them) and botocore's own."""
    kinds: list[type[BaseException]] = [OSError]
    try:
        import botocore.exceptions as boto

        kinds += [boto.BotoCoreError, boto.ClientError]
    except ImportError:
        pass
    return tuple(kinds)
