"""Where llmbatch keeps its per-machine state (model cache, fingerprints)."""
from __future__ import annotations

import os
from pathlib import Path


def llmbatch_home() -> Path:
    """`LLMBATCH_HOME`, else ~/.cache/llmbatch."""
    configured = os.environ.get("LLMBATCH_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llmbatch"


def models_dir() -> Path:
    return llmbatch_home() / "models"
