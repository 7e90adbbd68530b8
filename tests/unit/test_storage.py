"""Storage helpers: S3 endpoint selection, safe joins, and storage errors a user can act on."""
from __future__ import annotations

import errno

import botocore.exceptions as boto
import pytest

from llmbatch.errors import UserError
from llmbatch.storage import (
    bucket_and_key,
    describe_storage_error,
    filesystem_for,
    full_uri,
    is_s3,
    join,
    s3_endpoint,
    storage_errors,
)

PATH = "s3://my-bucket/data/prompts.jsonl"


@pytest.fixture(autouse=True)
def no_endpoint_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def client_error(code: str, message: str, op: str = "ListObjectsV2") -> boto.ClientError:
    return boto.ClientError({"Error": {"Code": code, "Message": message}}, op)


# ---- small helpers -------------------------------------------------------------------------------

def test_is_s3_recognises_s3_and_s3a_schemes():
    assert is_s3("s3://b/k") and is_s3("s3a://b/k")
    assert not is_s3("/data/s3://x") and not is_s3("gs://b/k") and not is_s3("data/file.jsonl")


def test_bucket_and_key_split():
    assert bucket_and_key("s3://b/some/key.jsonl") == ("b", "some/key.jsonl")
    assert bucket_and_key("s3://b") == ("b", "")


def test_full_uri_puts_the_scheme_back_only_for_s3():
    assert full_uri("s3://b/prefix", "b/prefix/x.jsonl") == "s3://b/prefix/x.jsonl"
    assert full_uri("/local/dir", "/local/dir/x.jsonl") == "/local/dir/x.jsonl"


def test_filesystem_for_local_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, inner = filesystem_for("data/x.jsonl")
    assert inner == str(tmp_path / "data" / "x.jsonl")
    assert "local" in type(fs).__name__.lower()


# ---- s3_endpoint ---------------------------------------------------------------------------------

def test_s3_endpoint_is_none_by_default():
    assert s3_endpoint() is None


def test_s3_endpoint_uses_aws_endpoint_url(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert s3_endpoint() == "http://generic:9000"


def test_s3_specific_endpoint_wins_over_generic(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")
    assert s3_endpoint() == "http://s3-only:9000"


def test_empty_s3_endpoint_falls_back_to_generic(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert s3_endpoint() == "http://generic:9000"


# ---- join ----------------------------------------------------------------------------------------

def test_join_local_and_s3():
    assert join("/out/job", "run-1") == "/out/job/run-1"
    assert join("s3://b/out/", "run-1", "_manifest.json") == "s3://b/out/run-1/_manifest.json"


@pytest.mark.parametrize("part", ["..", "../x", "a/../../b", "/etc", "/abs/run"])
def test_join_rejects_escaping_parts(part):
    with pytest.raises(UserError) as info:
        join("s3://b/out", part)
    assert repr(part) in str(info.value)
    assert "would escape s3://b/out" in str(info.value)


def test_join_allows_dots_inside_names():
    assert join("/out", "nightly-2026.11.23_1") == "/out/nightly-2026.11.23_1"
    assert join("/out", "a..b") == "/out/a..b"


# ---- describe_storage_error ----------------------------------------------------------------------

def test_no_such_bucket_names_the_bucket():
    msg = describe_storage_error(client_error("NoSuchBucket", "The specified bucket does not exist"),
                                 PATH, "list input")
    assert msg == f"cannot list input {PATH}: bucket 'my-bucket' does not exist"


def test_no_such_bucket_mentions_the_endpoint_when_set(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    msg = describe_storage_error(FileNotFoundError("The specified bucket does not exist"), "s3://nob", "list input")
    assert msg == "cannot list input s3://nob: bucket 'nob' does not exist at http://minio:9000"


def test_access_denied_client_error_names_bucket_and_key():
    msg = describe_storage_error(client_error("AccessDenied", "Access Denied", "GetObject"), PATH, "read")
    assert msg == (f"cannot read {PATH}: access denied to bucket 'my-bucket', key 'data/prompts.jsonl'; "
                   "the credentials in use lack permission")


def test_permission_error_on_s3_is_access_denied():
    msg = describe_storage_error(PermissionError(errno.EACCES, "Access Denied"), "s3://b/k", "write output to")
    assert "access denied to bucket 'b', key 'k'" in msg


def test_missing_credentials_names_the_env_vars():
    msg = describe_storage_error(boto.NoCredentialsError(), PATH, "list input")
    assert msg.startswith(f"cannot list input {PATH}: no AWS credentials found")
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "AWS_PROFILE" in msg


def test_rejected_credentials_names_bucket_and_env_vars():
    msg = describe_storage_error(client_error("InvalidAccessKeyId", "bad key"), PATH, "list input")
    assert "credentials were rejected for bucket 'my-bucket'" in msg
    assert "AWS_ACCESS_KEY_ID" in msg


def test_unreachable_endpoint_names_the_endpoint_and_env_vars(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://localhost:9")
    exc = boto.EndpointConnectionError(endpoint_url="http://localhost:9")
    msg = describe_storage_error(exc, PATH, "list input")
    assert msg == (f"cannot list input {PATH}: S3 endpoint http://localhost:9 is unreachable; "
                   "check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network")


def test_unreachable_default_endpoint_says_aws_default():
    msg = describe_storage_error(OSError("Cannot connect to host s3.amazonaws.com:443"), PATH, "list input")
    assert "S3 endpoint (AWS default) is unreachable" in msg


def test_missing_key_on_s3_is_not_found_with_bucket_and_key():
    msg = describe_storage_error(FileNotFoundError(errno.ENOENT, "No such file"), PATH, "read")
    assert msg == f"cannot read {PATH}: bucket 'my-bucket', key 'data/prompts.jsonl' not found"


def test_other_s3_errors_keep_type_and_text():
    msg = describe_storage_error(OSError("weird"), "s3://b", "read")
    assert msg == "cannot read s3://b: OSError: weird"


def test_local_errors_are_described_plainly():
    assert describe_storage_error(FileNotFoundError(2, "x"), "/data/x", "read") == \
        "cannot read /data/x: no such file or directory"
    assert describe_storage_error(PermissionError(13, "x"), "/data/x", "write output to") == \
        "cannot write output to /data/x: permission denied"
    assert describe_storage_error(OSError("disk full"), "/data/x", "write") == "cannot write /data/x: disk full"


def test_a_full_or_read_only_local_disk_says_what_to_do():
    full = describe_storage_error(OSError(errno.ENOSPC, "No space left on device"), "/out/r1", "write output to")
    assert full.startswith("cannot write output to /out/r1: no space left on the device; free space there")
    assert "submit the same run id again to resume" in full
    assert describe_storage_error(OSError(errno.EROFS, "Read-only file system"), "/c", "write the result cache at") \
        == "cannot write the result cache at /c: the file system is read-only"


# ---- storage_errors ------------------------------------------------------------------------------

def test_storage_errors_turns_oserror_into_user_error():
    with pytest.raises(UserError) as info:
        with storage_errors("/data/in.jsonl", "read input"):
            raise FileNotFoundError(2, "No such file")
    assert str(info.value) == "cannot read input /data/in.jsonl: no such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert info.value.lines == [str(info.value)]


def test_storage_errors_turns_botocore_errors_into_user_error():
    with pytest.raises(UserError, match="bucket 'my-bucket'"):
        with storage_errors(PATH, "list input"):
            raise client_error("NoSuchBucket", "The specified bucket does not exist")


def test_storage_errors_lets_other_exceptions_through():
    with pytest.raises(ValueError, match="not storage"):
        with storage_errors(PATH, "list input"):
            raise ValueError("not storage")


def test_storage_errors_lets_user_errors_through_unchanged():
    original = UserError("input.path: nothing there")
    with pytest.raises(UserError) as info:
        with storage_errors(PATH, "list input"):
            raise original
    assert info.value is original


def test_storage_errors_is_silent_on_success():
    with storage_errors(PATH, "list input"):
        value = 1 + 1
    assert value == 2
