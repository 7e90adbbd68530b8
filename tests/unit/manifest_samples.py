"""A manifest as an earlier llmbatch wrote it (a 12-row quickstart run on CPU, before `timings`), for tests
of the code that reads manifests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EARLIER_MANIFEST = Path(__file__).parent / "data" / "manifest_before_timings.json"


def earlier_manifest(**changes: Any) -> dict[str, Any]:
    """The earlier run's manifest, with the given top-level keys replaced."""
    return {**json.loads(EARLIER_MANIFEST.read_text()), **changes}
