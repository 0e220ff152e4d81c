"""Where ditscale keeps machine-local caches (DeepSpeed's JIT ops, inductor, measured kernel choices)."""

from __future__ import annotations

import os
from pathlib import Path


def project_cache() -> Path:
    """`.cache/` of the source checkout (shared by tests, the demo and CI), else ~/.cache/ditscale."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ditscale"
