"""A throwaway PostgreSQL server on 127.0.0.1 in a temporary folder, for `edge-tune tune --storage` tests and
benchmarks: the Debian server binaries (/usr/lib/postgresql/*/bin), run as the `postgres` user when this
process is root (the server refuses to run as root), trust authentication on loopback only, removed on
stop. `python tools/local_postgres.py` starts one, prints its URL and stops it on Enter."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def server_binaries() -> Path | None:
    """The newest Debian PostgreSQL bin folder holding initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def why_not() -> str | None:
    """Why no server can be started here (one line), or None when one can."""
    if server_binaries() is None:
        return "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin: apt install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and no runuser to start the server as the postgres user"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[postgres]')"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_postgres(db: str = "edge_tune") -> Iterator[str]:
    """Start a server, create database `db`, yield its SQLAlchemy URL; stop it and remove its folder."""
    if reason := why_not():
        raise RuntimeError(reason)
    bin_dir = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="edge_tune_pg_"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as postgres, who must own the folder
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start")  # fmt: skip
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db)
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{db}"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    with local_postgres() as url:
        print(url, flush=True)
        input("Enter stops the server ")
