"""A real PostgreSQL server started by the tests: Debian's binaries, initdb + pg_ctl in a temporary
folder, listening on a free loopback port, trust authentication for one superuser.

initdb and postgres refuse to run as root; as root the server runs as the `postgres` system user
(the Debian package creates it) and the folder is handed to that user. `.ci/run` installs the
`postgresql` package when it is missing; without it the tests that need PostgreSQL skip, saying so.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ihd_node.sim.mini_pacs import free_port


def pg_bindir() -> Path | None:
    """The newest Debian PostgreSQL server binaries, or the ones on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def why_no_postgres() -> str | None:
    """None when a server can be started here, else why not (the skip reason)."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


@dataclass
class PostgresServer:
    """One throw-away cluster. `url(db)` is an SQLAlchemy URL for psycopg 3."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ihd-pg-")))
    user: str = "ihd"
    port: int = 0

    def __post_init__(self) -> None:
        bindir = pg_bindir()
        assert bindir is not None, why_no_postgres()
        self.bindir = bindir
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._as = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chmod(self.root, 0o700)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, check=check, timeout=timeout,
                              cwd=self.root)

    def init(self) -> PostgresServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user, "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        self.port = self.port or free_port()
        # Small and quick: tests, not production. Sockets in our folder, never /var/run/postgresql.
        with open(self.datadir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\nsynchronous_commit = off\n"
                       "full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n")
        return self

    def start(self) -> PostgresServer:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w",
                  "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        done = self._run(str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                         "-d", database, "-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql)
        return done.stdout

    def destroy(self) -> None:
        self.stop("immediate")
        # The files belong to the postgres user; we are root (or their owner): remove them either way.
        shutil.rmtree(self.root, ignore_errors=True)

    def wait_ready(self, seconds: float = 30) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done = self._run(str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), check=False)
            if done.returncode == 0:
                return True
            time.sleep(0.2)
        return False
