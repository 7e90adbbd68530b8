"""`${NAME}` references to environment variables in a job file's values: how secrets reach a run without being
written into the job file, the run folder or the cluster's job records. The reference is what is stored; its
value is read where the value is used."""
from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Option names under which a literal value is taken for a secret: api_key, apiKey, token, password, secret...
SECRET_NAME = re.compile(r"(^|[_\-.])(api[_\-]?key|apikey|secret|password|passwd|token|access[_\-]?key|auth"
                         r"|credentials?)($|[_\-.])", re.IGNORECASE)


class MissingVariable(KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf value) of every leaf under `value`."""
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from walk(inner, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for number, inner in enumerate(value):
            yield from walk(inner, f"{path}.{number}" if path else str(number))
    else:
        yield path, value


def references(value: Any) -> list[tuple[str, str]]:
    """(dotted path, variable name) of every `${NAME}` under `value`."""
    return [(path, name) for path, leaf in walk(value) if isinstance(leaf, str) for name in REFERENCE.findall(leaf)]


def literal_secrets(value: Any) -> list[str]:
    """Dotted paths of text values written out under a name that says secret (a reference is fine)."""
    found = []
    for path, leaf in walk(value):
        name = path.rsplit(".", 1)[-1]
        if isinstance(leaf, str) and leaf.strip() and SECRET_NAME.search(name) and not REFERENCE.fullmatch(leaf.strip()):
            found.append(path)
    return found


def resolve(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """`value` with each `${NAME}` replaced by the variable's value; MissingVariable for one that is unset."""
    environ = os.environ if environ is None else environ
    if isinstance(value, Mapping):
        return {key: resolve(inner, environ) for key, inner in value.items()}
    if isinstance(value, list):
        return [resolve(inner, environ) for inner in value]
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            if match.group(1) not in environ:
                raise MissingVariable(match.group(1))
            return environ[match.group(1)]
        return REFERENCE.sub(substitute, value)
    return value
