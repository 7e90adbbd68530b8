"""Named places where a run's driver can be made to die at once, as a crash would kill it there: no cleanup, no
`finally`, no lock release. Set LLMBATCH_CRASH_AT to one of CRASH_POINTS (the fault tests do) and the driver
exits with CRASH_EXIT when it reaches that place."""
from __future__ import annotations

import os
import sys

CRASH_ENV = "LLMBATCH_CRASH_AT"
CRASH_EXIT = 86
CRASH_POINTS = {
    "attempt": "after _attempt.json is written, before any row is",
    "parts": "after the passes wrote every part, before the commit reads them back",
    "cache": "after the commit added the first entry file to the result cache",
    "summary": "after _summary.json is written, before the manifest",
    "manifest": "after _manifest.json is written",
}


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        sys.stderr.write(f"{CRASH_ENV}={name}: the driver dies here ({CRASH_POINTS[name]})\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT)
