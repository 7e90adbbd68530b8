"""Ray's Jobs API, as llmbatch uses it: address and token resolution, errors a user can act on."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import structlog

from llmbatch.errors import UserError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
METADATA_MARK = "llmbatch"


def cluster_address(option: str | None) -> str | None:
    """`--address`, else RAY_ADDRESS; None means the embedded local Ray."""
    address = option or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    if address in ("local", "auto"):
        raise UserError(f"--address: '{address}' names no Jobs API endpoint; use http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    if address.startswith("ray://"):
        raise UserError("--address: llmbatch submits through the Jobs API; use the dashboard address "
                        "http://HEAD:8265, not a ray:// client address")
    return address.rstrip("/")


def required_address(option: str | None, why: str) -> str:
    """The cluster address of a command that has no local form; `why` ends the error without one."""
    target = cluster_address(option)
    if target is None:
        raise UserError(f"no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS ({why})")
    return target


def planning_address(option: str | None) -> str | None:
    """The cluster a plan is fitted to: `--address`, else RAY_ADDRESS when it is a dashboard URL
    (a Ray node's own RAY_ADDRESS, such as 'auto' or a GCS address, does not make a plan ask a cluster)."""
    if option:
        return cluster_address(option)
    env = os.environ.get("RAY_ADDRESS") or ""
    return cluster_address(env) if env.startswith(("http://", "https://")) else None


def token_source() -> str | None:
    """Where Ray reads a token from, in Ray's own order: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names,
    ~/.ray/auth_token. Never the token itself."""
    if os.environ.get(TOKEN_ENV):
        return TOKEN_ENV
    named = os.environ.get(TOKEN_PATH_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise UserError(f"{TOKEN_PATH_ENV} names {path}, which is missing or empty; point it at the file that "
                            "holds the cluster's token, or unset it")
        return f"{TOKEN_PATH_ENV} ({path})"
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return str(path)
    return None


def transport_warnings(address: str, source: str | None) -> list[str]:
    """What is unsafe about talking to the cluster at `address` (with a token from `source`, or none)."""
    parsed = urlparse(address)
    host = (parsed.hostname or "").lower()
    if source and parsed.scheme == "http" and host not in LOOPBACK_HOSTS:
        return [f"the token from {source} goes to {address} over plain http, where anyone on the network path can "
                "read it; put the dashboard behind https (a TLS proxy), or reach it through an SSH tunnel to "
                "localhost"]
    return []


def open_cluster_warning(address: str) -> str:
    return (f"the Ray cluster at {address} accepted a request without a token: anyone who can reach it can run "
            "code on it; turn on Ray's token authentication (RAY_AUTH_MODE=token on the cluster) and give the "
            f"token to llmbatch through {TOKEN_ENV}, {TOKEN_PATH_ENV} or ~/.ray/auth_token")


def use_token_if_available() -> str | None:
    """Turn on Ray's token auth for this client when a token exists (Ray's own loader sends it)."""
    source = token_source()
    if source and not os.environ.get(AUTH_MODE_ENV):
        os.environ[AUTH_MODE_ENV] = "token"
    return source


@contextmanager
def jobs_api_errors(address: str) -> Iterator[None]:
    try:
        yield
    except UserError:
        raise
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray Jobs API at {address}: check --address / RAY_ADDRESS "
                        f"and that the head node's dashboard is up ({type(exc).__name__})") from None
    except (RuntimeError, _auth_error()) as exc:
        text = str(exc)
        source = token_source()
        if "401" in text or "Missing authentication token" in text or "Authentication required" in text:
            raise UserError(f"the Ray cluster at {address} requires a token and none was sent: set "
                            f"{TOKEN_ENV} or put the token in ~/.ray/auth_token") from None
        if "403" in text or "Invalid authentication token" in text or "Authentication failed" in text:
            raise UserError(f"the Ray cluster at {address} rejected the token from {source or 'the client'}: "
                            "it does not match the cluster's token") from None
        if "does not exist" in text or "404" in text:
            raise UserError(f"{address}: {text.splitlines()[0][:300]}") from None
        raise


def _auth_error() -> type[Exception]:
    try:
        from ray.exceptions import AuthenticationError

        return AuthenticationError
    except ImportError:
        return RuntimeError


def client(address: str):
    """A Jobs API client; warns (once per address) when the token would travel in the clear, or when the cluster
    answers without one."""
    source = use_token_if_available()  # before Ray is imported: it reads RAY_AUTH_MODE once
    from ray.job_submission import JobSubmissionClient

    with jobs_api_errors(address):
        jobs = JobSubmissionClient(address)
    if address not in _warned:
        _warned.add(address)
        log = structlog.get_logger()
        for warning in transport_warnings(address, source):
            log.warning("token_in_the_clear", address=address, detail=warning)
        if source is None:
            log.warning("cluster_without_token", address=address, detail=open_cluster_warning(address))
    return jobs


_warned: set[str] = set()


def cluster_nodes(address: str) -> list[dict[str, float]]:
    """Each alive node's total resources, asked of the cluster's dashboard (state API, same token auth)."""
    use_token_if_available()
    from ray.util.state import list_nodes

    with jobs_api_errors(address):
        try:
            nodes = list_nodes(address=address, limit=10000, detail=True, raise_on_missing_output=False)
        except ConnectionError:
            raise
        except Exception as exc:  # the state client wraps connection failures in its own errors
            if "401" in str(exc) or "403" in str(exc) or "uthentication" in str(exc):
                raise RuntimeError(str(exc)) from None
            raise ConnectionError(str(exc)) from None
    return [dict(n.resources_total or {}) for n in nodes if n.state == "ALIVE"]
