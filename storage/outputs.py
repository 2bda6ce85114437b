"""Files prefmill writes for the user (exports, `prefmill sql -o`): never inside a catalog, never over an existing
file unless asked, never half-written.

A path is judged after resolving it (symlinks followed, `..` removed), so a link or a detour that lands in the
catalog is refused as the catalog itself would be: overwriting `meta.ducklake` or a published Parquet file
destroys versions, whatever the user meant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from prefmill.storage.errors import CatalogError


def outside(path: Path | str, catalog: Path) -> Path:
    """`path` resolved; a `CatalogError` when it is the catalog folder or lies inside it."""
    if not str(path).strip():
        raise CatalogError("no output path given: name a file, e.g. -o pairs.parquet")
    target = Path(path).expanduser().resolve()
    root = catalog.resolve()
    if target == root or root in target.parents:
        raise CatalogError(f"refused: {path} is inside the catalog {catalog}; writing there would corrupt its "
                           "metadata or data (--force does not change this): write outside the catalog folder")
    return target


def checked_output(path: Path | str, force: bool, catalog: Path) -> Path:
    """`path` resolved once it may be written: outside `catalog`, not a folder, and not an existing file
    unless `force`."""
    target = outside(path, catalog)
    if target.is_dir():
        raise CatalogError(f"{path} is a folder: give a file name, e.g. {Path(path) / 'out.parquet'}")
    if target.exists() and not force:
        raise CatalogError(f"{path} exists: choose another name, or add --force to replace it")
    return target


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A temporary file beside `target` to write: it replaces `target` when the block ends, and is deleted when
    the block fails, so a failed or interrupted write leaves neither a partial file nor a `.tmp`."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        tmp.replace(target)
    except OSError as exc:
        raise CatalogError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
