"""A throw-away PostgreSQL server for tests: Debian's PostgreSQL 15 binaries, a temp data folder, a free port on
127.0.0.1, trust auth. PostgreSQL refuses to run as root, so as root the server runs as user `postgres`."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(os.environ.get("PREFMILL_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass(frozen=True)
class Server:
    port: int
    folder: Path

    def target(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A prefmill catalog target for a database on this server."""
        return f"postgres:dbname={dbname} host=127.0.0.1 port={self.port} user={user}"

    def createdb(self, name: str) -> None:
        _as_server_user(self.folder, BIN / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        name)


def missing() -> str | None:
    """Why no server can start here, or None."""
    for tool in ("initdb", "pg_ctl", "createdb"):
        if not (BIN / tool).exists():
            return f"no PostgreSQL binaries at {BIN} ({tool} missing); install postgresql-15 or set PREFMILL_PG_BIN"
    return None


@contextlib.contextmanager
def server() -> Iterator[Server]:
    """Start a server in a fresh folder (under /tmp: the socket path must be short), stop it and delete the
    folder at the end."""
    folder = Path(tempfile.mkdtemp(prefix="pm-pg-", dir="/tmp"))
    data = folder / "data"
    port = _free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    _as_server_user(folder, BIN / "initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    _as_server_user(folder, BIN / "pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w",
                    "start")
    try:
        yield Server(port, folder)
    finally:
        _as_server_user(folder, BIN / "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _as_server_user(folder: Path, *command: str | Path) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    done = subprocess.run([*prefix, *map(str, command)], cwd=folder, capture_output=True, text=True, timeout=120)
    if done.returncode:
        log = folder / "log"
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({done.returncode}): {done.stderr}{done.stdout}"
                           + (log.read_text() if log.exists() else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
