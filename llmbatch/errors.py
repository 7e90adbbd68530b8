"""Errors a user can act on, and the exit codes of the `llmbatch` command."""
from __future__ import annotations

import re
import unicodedata

EXIT_OK = 0
EXIT_JOB_FAILED = 1   # the job ran and failed, or committed with more error rows than output.max_error_rate
EXIT_USER = 2         # the job file, a flag, the input, the model, storage or credentials: the user can fix it
EXIT_INTERNAL = 3     # anything else: a bug in llmbatch or in what it runs on
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem in what the user asked for: a spec, a path, a credential, a flag."""

    exit_code = EXIT_USER

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
    """The job ran but did not succeed (or, planned, would not); `manifest`, when it committed one (status
    failed); `problems`, one line each, shown under the message."""

    exit_code = EXIT_JOB_FAILED

    def __init__(self, message: str, *, manifest=None, problems: list[str] | None = None):
        super().__init__(message)
        self.manifest = manifest
        self.problems = list(problems or [])


CHARACTER_NAMES = {" ": "space", "\t": "tab", "\n": "newline", "\r": "carriage return"}


def shown_characters(characters: list[str]) -> str:
    """'A', ' ' (space), '\\n' (newline): characters as a message quotes them."""
    return ", ".join(repr(c) + (f" ({CHARACTER_NAMES[c]})" if c in CHARACTER_NAMES else "") for c in characters)


def name_problem(value: str, allowed: str, first: str, separator: str, rule: str) -> str | None:
    """What is wrong with a name whose characters must be in the regex class `allowed` and whose first character
    in the class `first`; None when nothing is. `rule` says what is allowed; a fixed-up name is offered."""
    if not value:
        return f"is empty; {rule}"
    bad = list(dict.fromkeys(c for c in value if not re.fullmatch(f"[{allowed}]", c)))
    if bad:
        problem = f"{value!r} has {shown_characters(bad)}"
    elif not re.fullmatch(f"[{first}]", value[0]):
        problem = f"{value!r} starts with {value[0]!r}"
    else:
        return None
    suggestion = suggested_name(value, allowed, first, separator)
    return f"{problem}; {rule}" + (f" (did you mean {suggestion!r}?)" if suggestion else "")


def suggested_name(value: str, allowed: str, first: str, separator: str) -> str | None:
    """`value` lowercased, accents dropped, every run of other characters made one `separator`."""
    plain = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode().lower()
    joined = re.sub(f"[^{allowed}]+", separator, plain).strip(separator)
    return joined if joined and re.fullmatch(f"[{first}]", joined[0]) else None
