"""Where a catalog keeps its DuckLake metadata: two small strategies behind one interface (`Metadata`), so that
`Catalog` never asks which one it holds.

`LocalMetadata`: a `meta.ducklake` DuckDB file next to the `data/` folder. DuckDB admits one writing process per
file, so publishes take an exclusive file lock and readers a shared one; concurrent publishers queue. A marker
file lives from a publish's first write to its commit, and the next publish that finds it (a publish died in
between) sweeps every orphan.

`PostgresMetadata`: the metadata tables in a PostgreSQL database (`storage.postgres`), the Parquet files in a
local or shared folder. No file lock: the server orders every process's commits. An unreferenced file may be
another machine's publish between its write and its commit, so only `cleanup()` sweeps, and only files older
than `ORPHAN_AGE`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol

import duckdb

from prefmill.schemas.config import file_lock, prefmill_home
from prefmill.storage.errors import CatalogError
from prefmill.storage.postgres import PostgresTarget, parse_target, redact

LAKE = "lake"
LINEAGE_INLINE_ROWS = 1000  # datasets arrive as registered files; this keeps the few lineage rows of a publish
                           # in the metadata instead of one tiny file each
COMMIT_ATTEMPTS = 8  # a publish that loses this many commit races in a row fails (DuckLake retries 10x inside each)
COMMIT_BACKOFF_S = 0.2  # first wait before a retry; doubles each time, with jitter
ORPHAN_AGE = "1 HOUR"  # on PostgreSQL, an unreferenced file younger than this may be a publish in flight
_NO_LAKE = "creating a new DuckLake is explicitly disabled"  # DuckLake's answer to a read-only attach of no lake

Connection = duckdb.DuckDBPyConnection
Cursor = Callable[[], ContextManager[Connection]]


class Metadata(Protocol):
    """What `Catalog` needs from a metadata backend; `str()` names the catalog in messages (no password)."""

    root: Path  # the folder no output file may be written into
    data_path: Path  # where the Parquet files are

    def exists(self, cursor: Cursor) -> bool:
        """Whether the lake is there yet (a first publish creates it); `cursor()` lends a loaded DuckDB."""

    def new_database(self) -> Connection:
        """A fresh DuckDB instance with the extensions this backend needs, in a folder of its own."""

    def attach(self, con: Connection, write: bool, create: bool = True) -> None:
        """Attach the lake as `LAKE`, read-only unless `write`; a missing lake is created only if `create`."""

    def lock(self, write: bool) -> ContextManager[None]:
        """Held around every connection, so that publishes exclude whoever they must."""

    def publishing(self, con: Connection) -> ContextManager[None]:
        """Held by a publish from its first data file to its commit."""

    def sweep_orphans(self, con: Connection) -> list[Path]:
        """Delete the data files no snapshot references and no live publish may still commit; return them."""


def metadata_for(root: Path | str | None, data_path: Path | str | None = None) -> Metadata:
    """The backend a `--catalog` value names: a PostgreSQL target (`storage.postgres`), else a catalog folder
    (default: under the prefmill home)."""
    target = parse_target(root)
    if target:
        return PostgresMetadata(target, data_path)
    if data_path is not None:
        raise CatalogError("data_path is for a PostgreSQL catalog; a catalog folder keeps its data in data/")
    return LocalMetadata(Path(root) if root else default_catalog_path())


def default_catalog_path() -> Path:
    return prefmill_home() / "catalog"


class LocalMetadata:
    """`meta.ducklake` (DuckDB metadata) plus `data/` (Parquet files) in one folder, created when missing."""

    def __init__(self, root: Path):
        if root.exists() and not root.is_dir():
            raise CatalogError(f"catalog {root} is a file, not a folder; give --catalog a folder "
                               "(created when missing)")
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.path, self.data_path = root, root / "meta.ducklake", root / "data"
        self._pending = root / ".publishing"  # exists from a publish's first write to its commit

    def __str__(self) -> str:
        return str(self.root)

    def exists(self, cursor: Cursor) -> bool:
        return self.path.exists()

    def new_database(self) -> Connection:
        return open_duckdb(self.root / "extensions", {"allow_persistent_secrets": False},  # no look-up in ~/.duckdb
                           ducklake=ducklake_extension_path())

    def attach(self, con: Connection, write: bool, create: bool = True) -> None:
        """The data is always this folder's `data/`, wherever the folder is now: OVERRIDE_DATA_PATH opens a
        copied, moved or symlinked catalog (the override is not written back, and file paths are stored
        relative)."""
        if not self.path.exists():
            if not create:
                raise CatalogError(f"no catalog yet at {self}: publish a dataset first (prefmill run)")
            self._create(con)
        self._attach(con, self.path, "" if write else ", READ_ONLY")

    def _create(self, con: Connection) -> None:
        """Make the lake in a scratch file, then move it into place (under the exclusive lock): a process killed
        midway leaves no `meta.ducklake` without a lake in it, which every later read-only attach would refuse."""
        scratch = self.root / ".meta.ducklake.new"
        for stale in (scratch, scratch.with_name(scratch.name + ".wal")):
            stale.unlink(missing_ok=True)
        self._attach(con, scratch, "")
        con.execute(f"DETACH {LAKE}")
        os.replace(scratch, self.path)

    def _attach(self, con: Connection, path: Path, mode: str) -> None:
        try:
            con.execute(f"ATTACH 'ducklake:{quote(path)}' AS {LAKE} (DATA_PATH '{quote(self.data_path)}/', "
                        f"OVERRIDE_DATA_PATH true, DATA_INLINING_ROW_LIMIT {LINEAGE_INLINE_ROWS}{mode})")
        except duckdb.IOException as exc:
            raise CatalogError(f"cannot open the catalog metadata {path} ({exc}); restore it from a "
                               "backup, or give --catalog another folder") from None

    def lock(self, write: bool) -> ContextManager[None]:
        """Exclusive for a publish and for the attach that creates the lake, shared for readers."""
        return file_lock(self.root / ".lock", exclusive=write or not self.path.exists())

    @contextlib.contextmanager
    def publishing(self, con: Connection) -> Iterator[None]:
        """The marker of a publish in flight; one left by a publish that died first sweeps its orphans."""
        if self._pending.exists():
            self.sweep_orphans(con)
        self._pending.touch()
        try:
            yield
        finally:
            self._pending.unlink()

    def sweep_orphans(self, con: Connection) -> list[Path]:
        """Under the exclusive lock no publish is between its write and its commit, so every unreferenced file
        is an orphan. Lists the whole data folder, hence only after a publish died (or on `cleanup()`)."""
        deleted = _delete_orphans(con, "cleanup_all => true")
        self._pending.unlink(missing_ok=True)
        return deleted


class PostgresMetadata:
    """The metadata tables in a PostgreSQL database, the Parquet files in `data_path` (given, named in the target,
    or one folder per database under the prefmill home). DuckDB's extensions are installed under the prefmill
    home, not in the data folder: DuckLake's orphan sweep deletes whatever it finds there."""

    def __init__(self, target: PostgresTarget, data_path: Path | str | None = None):
        self.target = target
        self.data_path = Path(data_path or target.data_path or target.default_data_path()).expanduser()
        self.root = self.data_path
        self._extensions = prefmill_home() / "duckdb-extensions"

    def __str__(self) -> str:
        return str(self.target)

    def exists(self, cursor: Cursor) -> bool:
        """Attaching read-only says whether the database holds a lake, without creating one."""
        with cursor() as con:
            try:
                con.execute(self._attach_sql(read_only=True))
            except duckdb.Error as exc:
                if _NO_LAKE in str(exc):
                    return False
                raise self._error(exc) from None
            con.execute(f"DETACH {LAKE}")
            return True

    def new_database(self) -> Connection:
        """The postgres extension looks up persistent secrets, so it gets an empty secret folder of its own
        (`allow_persistent_secrets=false` makes that look-up fail); processes install side by side, in turn."""
        self._extensions.mkdir(parents=True, exist_ok=True)
        with file_lock(self._extensions / ".lock"):
            return open_duckdb(self._extensions, {"secret_directory": str(self._extensions / "no-secrets")},
                               ducklake=ducklake_extension_path(), postgres_scanner=postgres_extension_path())

    def attach(self, con: Connection, write: bool, create: bool = True) -> None:
        """A database without the lake's tables gets them if `create`. Two processes creating them at once
        collide in PostgreSQL; the loser attaches again and finds them made."""
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                con.execute(self._attach_sql(read_only=not (write or attempt)))
                return
            except duckdb.Error as exc:
                if _NO_LAKE in str(exc) and create:
                    continue  # no lake in this database yet: attach read-write, which creates it
                if not (attempt and is_conflict(exc)):
                    raise self._error(exc) from None
                time.sleep(COMMIT_BACKOFF_S * random.uniform(0.5, 1.5))
        raise CatalogError(f"cannot create the lake's metadata in {self}: other processes kept colliding with "
                           "it; try again")

    def lock(self, write: bool) -> ContextManager[None]:
        """None: the server orders the commits of every process."""
        return contextlib.nullcontext()

    def publishing(self, con: Connection) -> ContextManager[None]:
        """No marker and no sweep: an unreferenced file may be another machine's publish in flight."""
        return contextlib.nullcontext()

    def sweep_orphans(self, con: Connection) -> list[Path]:
        """Only files older than `ORPHAN_AGE`: a younger one may be another machine's publish in flight."""
        return _delete_orphans(con, f"older_than => now() - INTERVAL {ORPHAN_AGE}")

    def _attach_sql(self, read_only: bool) -> str:
        return (f"ATTACH 'ducklake:postgres:{quote(self.target.conninfo)}' AS {LAKE} (DATA_PATH "
                f"'{quote(self.data_path)}/', DATA_INLINING_ROW_LIMIT {LINEAGE_INLINE_ROWS}"
                f"{', READ_ONLY' if read_only else ''})")

    def _error(self, exc: duckdb.Error) -> CatalogError:
        """A clear CatalogError for a failed attach: which target, what the server said, what to do."""
        said = redact(str(exc).replace(self.target.conninfo, redact(self.target.conninfo)))
        if _NO_LAKE in said:
            return CatalogError(f"no catalog yet at {self}: publish a dataset first (prefmill run)")
        if "Unable to connect to Postgres" in said or isinstance(exc, duckdb.IOException):
            reason = " ".join(re.split(r'Unable to connect to Postgres at "[^"]*":', said)[-1].split())
            return CatalogError(f"cannot reach the PostgreSQL catalog {self}: {reason}"
                                "\nStart the server, create the database, or fix host/port/dbname/user in "
                                "--catalog (or the config's `catalog`), e.g. "
                                "'postgres:dbname=prefmill host=127.0.0.1 port=5432 user=prefmill'")
        if "does not match existing data path" in said:
            return self._data_path_error(said)
        return CatalogError(f"cannot open the PostgreSQL catalog {self}: {said}")

    def _data_path_error(self, said: str) -> CatalogError:
        """On PostgreSQL the user names the data folder (machines mount it at different places), so a different
        one is not silently accepted: the error names the lake's folder and how to point at it."""
        found = re.search(r'existing data path in the catalog "([^"]*)"', said)
        stored = found[1].rstrip("/") if found else "the folder it was created with"
        return CatalogError(f"the PostgreSQL catalog {self} keeps its data in another folder than "
                            f"{self.data_path}: in {stored}. Point at it with data_path={stored} in --catalog "
                            f"(e.g. '{self} data_path={stored}'; a URL takes ?data_path=…), or, if the "
                            "files moved there, give their new folder")


def open_duckdb(folder: Path, secrets: dict[str, Any], **extensions: Path) -> Connection:
    """A DuckDB instance that installs and loads `extensions` (name → packaged binary) from our own folder,
    never from the network or the user's ~/.duckdb."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                 "extension_directory": str(folder), **secrets})
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in extensions.items():
        con.execute(f"INSTALL '{quote(path)}'")
        con.execute(f"LOAD {name}")
    return con


def ducklake_extension_path() -> Path:
    """The ducklake extension binary shipped by the duckdb-extension-ducklake package."""
    import duckdb_extension_ducklake

    return _extension_file(duckdb_extension_ducklake, "ducklake")


def postgres_extension_path() -> Path:
    """The postgres_scanner extension binary shipped by the duckdb-extension-postgres-scanner package."""
    try:
        import duckdb_extension_postgres_scanner
    except ImportError:
        raise CatalogError("a PostgreSQL catalog needs the duckdb-extension-postgres-scanner package: pip install "
                           f"duckdb-extension-postgres-scanner=={duckdb.__version__}") from None
    return _extension_file(duckdb_extension_postgres_scanner, "postgres_scanner")


def _extension_file(package: Any, name: str) -> Path:
    folder = Path(package.__file__).parent
    found = sorted(folder.rglob("*.duckdb_extension"))
    if not found:
        raise CatalogError(f"no {name} .duckdb_extension file under {folder}")
    return found[0]


def _delete_orphans(con: Connection, which: str) -> list[Path]:
    rows = con.execute(f"SELECT path FROM ducklake_delete_orphaned_files('{LAKE}', {which})")
    return [Path(path) for (path,) in rows.fetchall()]


def is_conflict(exc: duckdb.Error) -> bool:
    """Whether a failed commit lost a race with another writer (and may simply be tried again)."""
    message = str(exc).lower()
    return any(sign in message for sign in ("conflict", "maximum retry count", "duplicate key", "already exists",
                                            "could not serialize", "deadlock"))


def quote(path: Path | str) -> str:
    """`path` inside a single-quoted SQL string."""
    return str(path).replace("'", "''")
