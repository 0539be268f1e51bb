"""
A throw-away PostgreSQL cluster for the tests: one per test session,
started on first use on a free loopback port and removed at exit.

Debian's C{postgresql} package provides C{initdb} and C{pg_ctl} under
C{/usr/lib/postgresql/VERSION/bin}.  PostgreSQL refuses to run as root, so
when the tests run as root the cluster runs as the C{postgres} user, in a
temporary directory that user owns.  The cluster trusts local connections
(it listens on 127.0.0.1 only) and keeps C{fsync} and
C{synchronous_commit} on, as the queue's durability promise assumes.

When PostgreSQL is missing or does not start, tests skip on a developer's
machine and fail under CI (C{CI=true}), where C{.ci/run} installs it.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

__all__ = ["Cluster", "requirePostgres"]


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binDir() -> Path | None:
    """
    The newest installed PostgreSQL's server binaries, if any.
    """
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        version = Path(path).parent.parent.name
        try:
            found.append((float(version), Path(path).parent))
        except ValueError:
            continue
    if found:
        return max(found)[1]
    pgCtl = shutil.which("pg_ctl")
    return Path(pgCtl).resolve().parent if pgCtl else None


class Cluster:
    """
    One running throw-away cluster.

    @ivar port: the TCP port on 127.0.0.1.
    """

    def __init__(self, binDir: Path) -> None:
        self._bin = binDir
        self._asPostgres: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="mailfw-pg-"))
        self.port = _freePort()
        self._names = itertools.count(1)
        self._dataDir = self.root / "data"
        self._socketDir = self.root / "socket"
        self._log = self.root / "server.log"
        self._started = False
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(
            [*self._asPostgres, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            text=True,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")

    def _start(self) -> None:
        self._socketDir.mkdir()
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            for path in (self.root, self._socketDir):
                os.chown(path, user.pw_uid, user.pw_gid)
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            self._asPostgres = [runuser, "-u", "postgres", "--"]
        self._run(
            str(self._bin / "initdb"),
            "-D",
            str(self._dataDir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self._socketDir} -c listen_addresses=127.0.0.1"
            " -c fsync=on -c synchronous_commit=on -c max_connections=200"
            " -c shared_buffers=32MB"
        )
        self._started = True
        self._run(
            str(self._bin / "pg_ctl"),
            "-D",
            str(self._dataDir),
            "-l",
            str(self._log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def dsn(self, dbname: str = "postgres") -> str:
        """
        A libpq connection string for C{dbname}.
        """
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=10"

    def createDatabase(self) -> str:
        """
        Create a new empty database and return its connection string.
        """
        import psycopg

        name = f"mailfw_test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def dropDatabase(self, dsn: str) -> None:
        """
        Drop the database that C{dsn} names, disconnecting its clients.
        """
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        name = conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """
        Stop the server at once and remove its files.
        """
        if self._started:
            self._started = False
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(
                    str(self._bin / "pg_ctl"),
                    "-D",
                    str(self._dataDir),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    timeout=60,
                )
        shutil.rmtree(self.root, ignore_errors=True)

    def logTail(self) -> str:
        try:
            return self._log.read_text("utf-8", "replace")[-4000:]
        except OSError:
            return ""


_cluster: Cluster | None = None
_problem: str | None = None


def _startCluster() -> Cluster:
    global _cluster, _problem
    if _cluster is not None:
        return _cluster
    if _problem is not None:
        raise RuntimeError(_problem)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _problem = "psycopg is not installed (pip install 'mailfw[postgresql]')"
        raise RuntimeError(_problem) from None
    binDir = _binDir()
    if binDir is None:
        _problem = "PostgreSQL is not installed (Debian package postgresql)"
        raise RuntimeError(_problem)
    started = time.monotonic()
    try:
        _cluster = Cluster(binDir)
    except (OSError, RuntimeError, subprocess.TimeoutExpired, KeyError) as e:
        _problem = f"cannot start a throw-away PostgreSQL: {e}"
        raise RuntimeError(_problem) from None
    atexit.register(_cluster.stop)
    _cluster.startSeconds = time.monotonic() - started  # type: ignore[attr-defined]
    return _cluster


def requirePostgres() -> Cluster:
    """
    The session's cluster, started on first use.  Without PostgreSQL the
    calling test skips (L{unittest.SkipTest}, which pytest and trial both
    understand), or fails under CI (C{CI=true}) with an L{AssertionError}.
    """
    try:
        return _startCluster()
    except RuntimeError as e:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{e}; .ci/run must install PostgreSQL") from None
        raise unittest.SkipTest(str(e)) from None
