"""
Tests for L{mailfw.hosting}: the hosting table contract on SQLite and on a
real throw-away PostgreSQL (L{tests._postgres}), the configuration text
that names a store, and the thread the queries run in.

The stores run here with L{runSynchronously}, so each answer has fired when
the call returns and no reactor is needed; the server runs the same
queries in a thread pool (L{test_queriesRunInTheRunner}).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.config import ConfigError
from mailfw.hosting import HostingError, Mailbox, addressKey, aliasKey, domainKey
from mailfw.hosting._contract import HostingTableContractTests
from mailfw.hosting._sql import SQLHostingTable, runSynchronously, sqliteDialect, tableFromText
from mailfw.interfaces import IHostingTable
from tests._postgres import requirePostgres

_T = TypeVar("_T")


class SQLiteHostingTableTests(HostingTableContractTests, SynchronousTestCase):
    """
    The contract on SQLite.
    """

    def makeTable(self) -> IHostingTable:
        self.path = Path(self.mktemp())
        self.path.mkdir()
        table = tableFromText("sqlite:hosting.sqlite", self.path, runSynchronously, "[routing] virtual")
        self.addCleanup(table.close)
        return table

    def makeSecondTable(self) -> IHostingTable:
        return tableFromText("sqlite:hosting.sqlite", self.path, runSynchronously, "[routing] virtual")


class PostgresHostingTableTests(HostingTableContractTests, SynchronousTestCase):
    """
    The same contract on PostgreSQL, a fresh database per test.
    """

    def makeTable(self) -> IHostingTable:
        cluster = requirePostgres()
        self.dsn = cluster.createDatabase()
        self.addCleanup(cluster.dropDatabase, self.dsn)
        table = tableFromText(f"postgresql:{self.dsn}", Path("."), runSynchronously, "[routing] virtual")
        self.addCleanup(table.close)
        return table

    def makeSecondTable(self) -> IHostingTable:
        return tableFromText(f"postgresql:{self.dsn}", Path("."), runSynchronously, "[routing] virtual")


class KeyTests(SynchronousTestCase):
    """
    The normal forms of the table keys.
    """

    def test_addressKey(self) -> None:
        """
        Local parts are lower-cased and unquoted, domains normalised.
        """
        self.assertEqual(addressKey("Alice@EXAMPLE.org"), "alice@example.org")
        self.assertEqual(addressKey(Address('"A B"', "example.org")), "a b@example.org")
        self.assertRaises(HostingError, addressKey, "nope")
        self.assertRaises(HostingError, addressKey, "a@[192.0.2.1]")

    def test_aliasKey(self) -> None:
        """
        An alias is an address or C{@domain}.
        """
        self.assertEqual(aliasKey("@Example.ORG"), "@example.org")
        self.assertEqual(aliasKey("x@example.org"), "x@example.org")
        self.assertRaises(HostingError, aliasKey, "@")

    def test_domainKey(self) -> None:
        """
        Domains lose their trailing dot and case; literals are refused.
        """
        self.assertEqual(domainKey("Example.ORG."), "example.org")
        self.assertRaises(HostingError, domainKey, "[192.0.2.1]")


class ConfigTextTests(SynchronousTestCase):
    """
    L{tableFromText}: what C{virtual = "..."} may say.
    """

    def test_malformed(self) -> None:
        """
        Anything but C{sqlite:PATH} or C{postgresql:CONNINFO} is a
        L{ConfigError} naming the key and the two forms.
        """
        for text in ("hosting.sqlite", "mysql:x", "sqlite:", "postgresql:"):
            e = self.assertRaises(
                ConfigError, tableFromText, text, Path("."), runSynchronously, "[routing] virtual"
            )
            self.assertIn("[routing] virtual", str(e))
            self.assertIn("sqlite:PATH", str(e))

    def test_unopenable(self) -> None:
        """
        A SQLite file that cannot be created is a L{ConfigError} at start-up.
        """
        e = self.assertRaises(
            ConfigError,
            tableFromText,
            "sqlite:/nonexistent/dir/h.sqlite",
            Path("."),
            runSynchronously,
            "[x] y",
        )
        self.assertIn("cannot open sqlite:/nonexistent/dir/h.sqlite", str(e))

    def test_relativeToDataDir(self) -> None:
        """
        A relative SQLite path is in the data directory, and the schema is
        there after start-up.
        """
        data = Path(self.mktemp())
        data.mkdir()
        table = tableFromText("sqlite:sub.sqlite", data, runSynchronously, "[routing] virtual")
        self.addCleanup(table.close)
        with sqlite3.connect(data / "sub.sqlite") as connection:
            names = {
                row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        self.assertEqual(
            names, {"hosting_domains", "hosting_mailboxes", "hosting_aliases", "hosting_senders"}
        )
        self.assertIn("sub.sqlite", table.describe())

    def test_quotaColumns(self) -> None:
        """
        The mailbox table has nullable per-user sending quota columns.
        """
        data = Path(self.mktemp())
        data.mkdir()
        table = tableFromText("sqlite:h.sqlite", data, runSynchronously, "[routing] virtual")
        self.addCleanup(table.close)
        with sqlite3.connect(data / "h.sqlite") as connection:
            columns = {row[1]: row[3] for row in connection.execute("PRAGMA table_info(hosting_mailboxes)")}
        self.assertEqual(columns["messages_per_hour"], 0)
        self.assertEqual(columns["messages_per_day"], 0)


class RunnerTests(SynchronousTestCase):
    """
    Where the queries run.
    """

    def test_queriesRunInTheRunner(self) -> None:
        """
        Every query is handed to the runner (in the server, a thread pool)
        rather than run by the caller on the reactor thread.
        """
        data = Path(self.mktemp())
        data.mkdir()
        pending: list[Callable[[], Any]] = []

        def later(work: Callable[[], _T]) -> Deferred[_T]:
            pending.append(work)
            d: Deferred[_T] = Deferred()
            pending.append(lambda: d.callback(work()))
            return d

        table = SQLHostingTable(sqliteDialect(data / "h.sqlite"), later)
        table.createSchema()
        self.addCleanup(table.close)
        d = table.addDomain("example.org")
        self.assertNoResult(d)
        pending[1]()
        self.assertTrue(self.successResultOf(d))
        found = table.mailbox(Address("a", "example.org"))
        self.assertNoResult(found)
        pending[3]()
        self.assertIsNone(self.successResultOf(found))

    def test_lostConnectionIsRemade(self) -> None:
        """
        After the database reports a lost connection, the next operation
        connects again instead of failing forever.
        """
        data = Path(self.mktemp())
        data.mkdir()
        connects: list[int] = []
        real = sqliteDialect(data / "h.sqlite")

        def connect() -> Any:
            connects.append(1)
            return real.connect()

        from dataclasses import replace

        table = SQLHostingTable(replace(real, connect=connect), runSynchronously)
        self.addCleanup(table.close)
        table.createSchema()

        def broken(q: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        self.assertEqual(self.successResultOf(table.listDomains()), ())
        before = len(connects)
        self.assertRaises(sqlite3.OperationalError, table.transact, broken)
        self.assertEqual(self.successResultOf(table.listDomains()), ())
        self.assertEqual(len(connects), before + 1)

    def test_addMailboxUnknownDomainLeavesNothing(self) -> None:
        """
        A refused operation leaves the tables as they were.
        """
        data = Path(self.mktemp())
        data.mkdir()
        table = tableFromText("sqlite:h.sqlite", data, runSynchronously, "[routing] virtual")
        self.addCleanup(table.close)
        self.failureResultOf(table.addMailbox(Mailbox("a@example.org")), HostingError)
        self.assertEqual(self.successResultOf(table.listMailboxes(None)), ())
