"""A catalog target on PostgreSQL: DuckLake keeps its metadata there, the Parquet files stay in a local (or shared)
folder, and many processes on many machines may publish at once (PostgreSQL serialises the metadata commits).

Written as `postgres:<libpq key=value string>` (`postgres:dbname=prefmill host=127.0.0.1 port=5432 user=me`) or
as a `postgresql://user@host:port/dbname` URL. An optional `data_path=FOLDER` key (a `?data_path=FOLDER` query
parameter in a URL) names the data folder; prefmill strips it before the string reaches libpq.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from prefmill.schemas.config import prefmill_home
from prefmill.storage.errors import CatalogError

_KEY_VALUE_PREFIX = "postgres:"
_URL = re.compile(r"^(postgres(?:ql)?):/+", re.IGNORECASE)  # a Path() of a URL collapses '//' into '/'
_PAIR = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
_PASSWORD_URL = re.compile(r"(://[^:/@]+:)[^@/]*@")
_PASSWORD_PAIR = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s\"']+)", re.IGNORECASE)


@dataclass(frozen=True)
class PostgresTarget:
    """What DuckDB's postgres extension connects with, and the data folder given with it (if any)."""

    conninfo: str
    data_path: Path | None = None

    def __str__(self) -> str:
        return redact(self.conninfo if _URL.match(self.conninfo) else _KEY_VALUE_PREFIX + self.conninfo)

    def default_data_path(self) -> Path:
        """Where the Parquet files go when no data_path is given: one folder per database, under the prefmill
        home. Other machines must be given a shared folder explicitly."""
        dbname = re.sub(r"[^A-Za-z0-9_.-]", "_", self.setting("dbname") or "postgres")
        digest = hashlib.sha256(redact(self.conninfo).encode()).hexdigest()[:10]
        return prefmill_home() / "catalog-data" / f"{dbname}-{digest}"

    def setting(self, key: str) -> str | None:
        """One connection setting (dbname, host, port, user) as written, or None."""
        if _URL.match(self.conninfo):
            parts = urlsplit(self.conninfo)
            url = {"dbname": parts.path.lstrip("/") or None, "host": parts.hostname, "user": parts.username,
                   "port": str(parts.port) if parts.port else None}
            return dict(parse_qsl(parts.query)).get(key) or url.get(key)
        return dict((k, v.strip("'")) for k, v in _PAIR.findall(self.conninfo)).get(key)


def parse_target(root: str | Path | None) -> PostgresTarget | None:
    """The PostgreSQL target named by a `--catalog` value, or None for a catalog folder."""
    if root is None:
        return None
    text = str(root).strip()
    if _URL.match(text):
        return _from_url(_URL.sub(lambda m: f"{m[1]}://", text, count=1))
    if not text.lower().startswith(_KEY_VALUE_PREFIX):
        return None
    text = text[len(_KEY_VALUE_PREFIX):].strip()
    if _URL.match(text):  # DuckDB's own spelling: postgres:postgresql://…
        return _from_url(_URL.sub(lambda m: f"{m[1]}://", text, count=1))
    pairs = _PAIR.findall(text)
    data = [v.strip("'") for k, v in pairs if k == "data_path"]
    conninfo = " ".join(f"{k}={v}" for k, v in pairs if k != "data_path")
    if not conninfo:
        raise CatalogError(f"catalog {redact(str(root))!r} names no PostgreSQL database: write e.g. "
                           "'postgres:dbname=prefmill host=127.0.0.1 port=5432 user=prefmill'")
    return PostgresTarget(conninfo, Path(data[-1]).expanduser() if data else None)


def redact(text: str) -> str:
    """`text` with any password in a URL or a key=value string replaced by ***."""
    return _PASSWORD_PAIR.sub(r"\1***", _PASSWORD_URL.sub(r"\1***@", text))


def _from_url(url: str) -> PostgresTarget:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    data = [v for k, v in query if k == "data_path"]
    rest = urlencode([(k, v) for k, v in query if k != "data_path"])
    return PostgresTarget(urlunsplit(parts._replace(query=rest)), Path(data[-1]).expanduser() if data else None)
