"""The tiny pipeline config the end-to-end `prefmill` process tests run (crash/resume, deployments).

Two seeds, one self-chat turn, two short candidates, no critiques: every stage runs on the real model and
publishes real pairs, in a fraction of the demo's time. Each test writes it with its own catalog and
result storage, so runs never share a cache unless a test says so.
"""

from __future__ import annotations

from pathlib import Path

# the tables; top-level keys go before them (after them TOML would put them inside [critiques])
TINY = """
[seeds]
limit = 2
[selfchat]
max_turns = 1
max_tokens_per_turn = 32
[candidates]
n = 2
max_tokens = 32
[critiques]
enabled = false
"""


def write_config(folder: Path, shard_size: int = 1, name: str = "tiny.toml") -> Path:
    """The tiny config in `folder`, with `shard_size` seeds per shard and the catalog and result storage
    under `folder` (`catalog/`, `results/`)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / name
    config.write_text(f'catalog = "{folder / "catalog"}"\nresult_storage = "{folder / "results"}"\n'
                      f"shard_size = {shard_size}\n" + TINY)
    return config
