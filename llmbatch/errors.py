"""Errors a user can act on. The CLI prints them without a traceback and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem in what the user asked for: a spec, a path, a credential, a flag."""

    exit_code = 2

    def __init__(self, message: str, *, lines: list[str] | None = None):
        super().__init__(message)
        self.lines = lines or [message]


class SpecError(UserError):
    """The job file is invalid; one line per problem, each naming its YAML path."""

    def __init__(self, lines: list[str], source: str | None = None):
        head = f"{source}: invalid job spec" if source else "invalid job spec"
        super().__init__(head, lines=lines)
        self.source = source


class JobFailed(Exception):
    """The job ran but did not succeed (exit 1)."""

    exit_code = 1
