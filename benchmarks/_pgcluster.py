"""
A throw-away PostgreSQL cluster for C{accept.py --queue postgresql}.

It reuses the tests' cluster (C{tests/_postgres.py}): Debian's C{initdb}
and C{pg_ctl}, run as the C{postgres} user when the benchmark runs as
root, on a free port of 127.0.0.1, in a temporary directory, with
C{fsync=on} and C{synchronous_commit=on} so that a C{COMMIT} (and so
mailfw's 250) means the message is on disk.  What this module adds is
what a benchmark needs: the server's process ID (to count its CPU) and a
fresh database per run.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests._postgres import Cluster, _binDir

__all__ = ["BenchCluster"]


class BenchCluster:
    """
    One running cluster for the whole benchmark; L{stop} removes it.
    """

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise RuntimeError("psycopg is not installed (pip install 'mailfw[postgresql]')") from None
        binDir = _binDir()
        if binDir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self._cluster = Cluster(binDir)
        self._names = itertools.count(1)
        self.port = self._cluster.port

    def postmasterPID(self) -> int:
        """
        The postmaster's process ID: its tree holds every backend, the WAL
        writer and the checkpointer.
        """
        pidFile = self._cluster.root / "data" / "postmaster.pid"
        return int(pidFile.read_text().split("\n", 1)[0])

    def createDatabase(self) -> str:
        """
        A new empty database; its libpq connection string.
        """
        import psycopg

        name = f"mailfw_bench_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self._cluster.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self._cluster.dsn(name)

    def dropDatabase(self, dsn: str) -> None:
        self._cluster.dropDatabase(dsn)

    def stop(self) -> None:
        self._cluster.stop()
