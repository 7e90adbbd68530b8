"""Credentials never reach a message: `scheme://user:password@host` is shown as `scheme://***@host`."""
from __future__ import annotations

import re
from typing import Any

URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@:'\"]+(?::[^\s/@'\"]*)?@")


def strip_url_credentials(text: str) -> str:
    return URL_CREDENTIALS.sub(r"\1***@", text)


def redact_event(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every text value of a log line without URL credentials."""
    return {key: _redact(value) for key, value in event.items()}


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return strip_url_credentials(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    return value
