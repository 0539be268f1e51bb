"""
The hosting tables in SQL: one implementation of every query, over a small
dialect seam for SQLite and PostgreSQL (psycopg 3).

Configuration names a store as C{"sqlite:PATH"} (relative to the data
directory) or C{"postgresql:CONNINFO"} (a libpq connection string).

Each operation is one transaction run by a L{ThreadRunner}: in the server a
thread pool with one connection per thread, so the reactor thread never
waits for the database.  Nothing is cached: every lookup reads the tables,
so a change made by C{mailfw user add} in another process is seen by the
next RCPT without a restart (SQLite in WAL mode lets those reads run while
the command writes).  A connection that failed is dropped and made again
by the next operation.

Queries are written once, with C{?} placeholders; the dialect rewrites them
for psycopg.  Both databases understand the rest as written (C{INSERT ...
ON CONFLICT DO NOTHING}, C{ON CONFLICT ... DO UPDATE}).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from zope.interface import implementer

from mailfw.address import Address
from mailfw.config import ConfigError
from mailfw.hosting._values import (
    AliasEntry,
    HostingError,
    Mailbox,
    SenderRight,
    addressKey,
    aliasKey,
    domainKey,
    senderKey,
)
from mailfw.interfaces import IDescribed, IHostingTable

if TYPE_CHECKING:
    from mailfw.delivery._maildir import ThreadRunner

__all__ = [
    "Dialect",
    "SQLHostingTable",
    "postgresDialect",
    "runSynchronously",
    "sqliteDialect",
    "tableFromText",
]

_T = TypeVar("_T")
_P = ParamSpec("_P")
_S = TypeVar("_S")


def _refusalsAsFailures(
    method: Callable[Concatenate[_S, _P], Deferred[_T]],
) -> Callable[Concatenate[_S, _P], Deferred[_T]]:
    """
    Turn a L{HostingError} raised while checking the arguments into a
    failed L{Deferred}, so that callers handle one kind of answer.
    """

    @wraps(method)
    def wrapper(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        try:
            return method(self, *args, **kwargs)
        except HostingError:
            return fail()

    return wrapper  # type: ignore[return-value]


MAX_TARGETS = 1000
"""Targets one alias may have: bounds what one RCPT makes the router read."""

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS hosting_domains (name TEXT PRIMARY KEY)",
    # The quota columns are read by sending quotas; they are here now so
    # that adding those needs no migration.
    "CREATE TABLE IF NOT EXISTS hosting_mailboxes ("
    " address TEXT PRIMARY KEY,"
    " domain TEXT NOT NULL,"
    " agent TEXT,"
    " path TEXT,"
    " messages_per_hour INTEGER,"
    " messages_per_day INTEGER)",
    "CREATE INDEX IF NOT EXISTS hosting_mailboxes_domain ON hosting_mailboxes (domain)",
    "CREATE TABLE IF NOT EXISTS hosting_aliases ("
    " address TEXT NOT NULL,"
    " target TEXT NOT NULL,"
    " domain TEXT NOT NULL,"
    " PRIMARY KEY (address, target))",
    "CREATE INDEX IF NOT EXISTS hosting_aliases_domain ON hosting_aliases (domain)",
    "CREATE TABLE IF NOT EXISTS hosting_senders ("
    " username TEXT NOT NULL,"
    " address TEXT NOT NULL,"
    " PRIMARY KEY (username, address))",
)


@dataclass(frozen=True)
class Dialect:
    """
    What differs between the databases, and nothing else.

    @ivar connect: opens a new connection (blocking; called in a thread).
    @ivar placeholder: the parameter marker, C{?} or C{%s}.
    @ivar schemaLock: statements run before the schema in its transaction,
        so that several nodes starting at once do not race to create it.
    @ivar lostConnection: exceptions after which the connection is dropped.
    @ivar description: for the start-up log (never a password).
    @ivar files: the database's files, handed to the server's user after
        start-up (L{IDescribed.ownedPaths}).
    """

    connect: Callable[[], Any]
    placeholder: str
    schemaLock: tuple[str, ...]
    lostConnection: tuple[type[BaseException], ...]
    description: str
    files: tuple[str, ...] = ()


def sqliteDialect(path: Path) -> Dialect:
    """
    The dialect of a SQLite file, created if missing.
    """

    def connect() -> Any:
        connection = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA busy_timeout=10000")
        return connection

    files = tuple(str(path) + suffix for suffix in ("", "-wal", "-shm"))
    return Dialect(connect, "?", (), (sqlite3.OperationalError,), f"sqlite:{path}", files)


def postgresDialect(conninfo: str, connectTimeout: int = 10) -> Dialect:
    """
    The dialect of a PostgreSQL database reached with libpq's C{conninfo}.

    @raise ConfigError: if psycopg is not installed or C{conninfo} is bad.
    """
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo
    except ImportError:
        raise ConfigError(
            "virtual tables on PostgreSQL need psycopg: pip install 'mailfw[postgresql]'"
        ) from None
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as e:
        raise ConfigError(f"bad PostgreSQL connection string: {e}") from None
    if "connect_timeout" not in parts:
        conninfo = make_conninfo(conninfo, connect_timeout=connectTimeout)
    shown = " ".join(f"{k}={v}" for k, v in sorted(parts.items()) if k != "password")

    def connect() -> Any:
        return psycopg.connect(conninfo)

    return Dialect(
        connect,
        "%s",
        ("SELECT pg_advisory_xact_lock(7242227)",),
        (psycopg.OperationalError, psycopg.InterfaceError),
        f"postgresql:{shown}",
    )


def runSynchronously(work: Callable[[], _T]) -> Deferred[_T]:
    """
    A L{ThreadRunner} that runs C{work} at once in the calling thread: for
    the C{mailfw} command, which has no reactor to protect, and for tests.
    """
    return maybeDeferred(work)


class _Query:
    """
    One transaction's cursor, speaking C{?} placeholders.
    """

    def __init__(self, connection: Any, placeholder: str) -> None:
        self._connection = connection
        self._placeholder = placeholder

    def run(self, sql: str, *params: object) -> int:
        cursor = self._connection.execute(sql.replace("?", self._placeholder), params)
        return int(cursor.rowcount)

    def all(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        cursor = self._connection.execute(sql.replace("?", self._placeholder), params)
        return list(cursor.fetchall())

    def exists(self, sql: str, *params: object) -> bool:
        return bool(self.all(sql, *params))


def _mailbox(row: tuple[Any, ...]) -> Mailbox:
    address, agent, path, perHour, perDay = row
    return Mailbox(address, agent, path, perHour, perDay)


_MAILBOX_COLUMNS = "address, agent, path, messages_per_hour, messages_per_day"


@implementer(IHostingTable, IDescribed)
class SQLHostingTable:
    """
    An L{IHostingTable} in a SQL database (see the module docstring).
    """

    def __init__(self, dialect: Dialect, runInThread: ThreadRunner) -> None:
        self.dialect = dialect
        self._runInThread = runInThread
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []

    def describe(self) -> str:
        return f"virtual tables in {self.dialect.description}"

    def ownedPaths(self) -> list[str]:
        return list(self.dialect.files)

    # -- transactions ---------------------------------------------------------

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.dialect.connect()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _drop(self, connection: Any) -> None:
        self._local.connection = None
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)
        with contextlib.suppress(Exception):
            connection.close()

    def transact(self, work: Callable[[_Query], _T]) -> _T:
        """
        Run C{work} in one transaction on this thread's connection,
        blocking.
        """
        connection = self._connection()
        try:
            result = work(_Query(connection, self.dialect.placeholder))
            connection.commit()
        except BaseException as e:
            if isinstance(e, self.dialect.lostConnection):
                self._drop(connection)
            else:
                try:
                    connection.rollback()
                except Exception:
                    self._drop(connection)
            raise
        return result

    def _call(self, work: Callable[[_Query], _T]) -> Deferred[_T]:
        return self._runInThread(lambda: self.transact(work))

    def createSchema(self) -> None:
        """
        Create the tables if they are missing; blocking, called once at
        start-up before the reactor runs (and by the C{mailfw} command).
        """

        # A connection of its own, closed after: the thread that starts the
        # server never queries again.
        connection = self.dialect.connect()
        try:
            q = _Query(connection, self.dialect.placeholder)
            for statement in (*self.dialect.schemaLock, *SCHEMA):
                q.run(statement)
            connection.commit()
        finally:
            connection.close()

    def close(self) -> Deferred[None]:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(Exception):
                connection.close()
        self._local = threading.local()
        return succeed(None)

    # -- lookups ----------------------------------------------------------------

    def domain(self, name: str) -> Deferred[bool]:
        return self._call(lambda q: q.exists("SELECT 1 FROM hosting_domains WHERE name = ?", name))

    @_refusalsAsFailures
    def mailbox(self, address: Address) -> Deferred[Mailbox | None]:
        key = addressKey(address)

        def find(q: _Query) -> Mailbox | None:
            rows = q.all(f"SELECT {_MAILBOX_COLUMNS} FROM hosting_mailboxes WHERE address = ?", key)
            return _mailbox(rows[0]) if rows else None

        return self._call(find)

    @_refusalsAsFailures
    def aliases(self, address: Address) -> Deferred[tuple[str, ...]]:
        key = addressKey(address)
        catchAll = "@" + address.domain

        def find(q: _Query) -> tuple[str, ...]:
            sql = "SELECT target FROM hosting_aliases WHERE address = ? ORDER BY target LIMIT ?"
            rows = q.all(sql, key, MAX_TARGETS)
            if not rows:
                rows = q.all(sql, catchAll, MAX_TARGETS)
            return tuple(row[0] for row in rows)

        return self._call(find)

    @_refusalsAsFailures
    def maySendAs(self, user: str, address: Address) -> Deferred[bool]:
        key = addressKey(address)
        if user.lower() == key:
            return self.mailbox(address).addCallback(lambda found: found is not None)

        def find(q: _Query) -> bool:
            return q.exists(
                "SELECT 1 FROM hosting_senders WHERE username = ? AND address IN (?, ?)",
                user,
                key,
                "@" + address.domain,
            )

        return self._call(find)

    def sendersFor(self, user: str) -> Deferred[tuple[str, ...]]:
        def find(q: _Query) -> tuple[str, ...]:
            own = q.all("SELECT address FROM hosting_mailboxes WHERE address = ?", user.lower())
            granted = q.all("SELECT address FROM hosting_senders WHERE username = ? ORDER BY address", user)
            return tuple(row[0] for row in (*own, *granted))

        return self._call(find)

    # -- domains ----------------------------------------------------------------

    @_refusalsAsFailures
    def addDomain(self, name: str) -> Deferred[bool]:
        key = domainKey(name)
        return self._call(
            lambda q: q.run("INSERT INTO hosting_domains (name) VALUES (?) ON CONFLICT DO NOTHING", key) == 1
        )

    @_refusalsAsFailures
    def deleteDomain(self, name: str) -> Deferred[bool]:
        key = domainKey(name)

        def delete(q: _Query) -> bool:
            mailboxes = q.all("SELECT count(*) FROM hosting_mailboxes WHERE domain = ?", key)[0][0]
            aliases = q.all("SELECT count(DISTINCT address) FROM hosting_aliases WHERE domain = ?", key)[0][0]
            if mailboxes or aliases:
                raise HostingError(
                    f"domain {key} still has {mailboxes} mailbox(es) and {aliases} alias(es); delete them first"
                )
            return q.run("DELETE FROM hosting_domains WHERE name = ?", key) == 1

        return self._call(delete)

    def listDomains(self) -> Deferred[tuple[str, ...]]:
        return self._call(
            lambda q: tuple(row[0] for row in q.all("SELECT name FROM hosting_domains ORDER BY name"))
        )

    # -- mailboxes ----------------------------------------------------------------

    @_refusalsAsFailures
    def addMailbox(self, mailbox: Mailbox) -> Deferred[bool]:
        key = addressKey(mailbox.address)
        domain = key.rpartition("@")[2]
        for quota in (mailbox.messagesPerHour, mailbox.messagesPerDay):
            if quota is not None and quota < 0:
                raise HostingError(f"{key}: a quota cannot be negative")

        def add(q: _Query) -> bool:
            _requireDomain(q, domain)
            existed = q.exists("SELECT 1 FROM hosting_mailboxes WHERE address = ?", key)
            q.run(
                f"INSERT INTO hosting_mailboxes ({_MAILBOX_COLUMNS}, domain) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (address) DO UPDATE SET agent = excluded.agent, path = excluded.path,"
                " messages_per_hour = excluded.messages_per_hour, messages_per_day = excluded.messages_per_day",
                key,
                mailbox.agent,
                mailbox.path,
                mailbox.messagesPerHour,
                mailbox.messagesPerDay,
                domain,
            )
            return not existed

        return self._call(add)

    @_refusalsAsFailures
    def deleteMailbox(self, address: str) -> Deferred[bool]:
        key = addressKey(address)
        return self._call(lambda q: q.run("DELETE FROM hosting_mailboxes WHERE address = ?", key) == 1)

    @_refusalsAsFailures
    def listMailboxes(self, domain: str | None = None) -> Deferred[tuple[Mailbox, ...]]:
        sql = f"SELECT {_MAILBOX_COLUMNS} FROM hosting_mailboxes"
        params: tuple[str, ...] = ()
        if domain is not None:
            sql += " WHERE domain = ?"
            params = (domainKey(domain),)
        return self._call(lambda q: tuple(_mailbox(row) for row in q.all(sql + " ORDER BY address", *params)))

    # -- aliases ----------------------------------------------------------------

    @_refusalsAsFailures
    def addAlias(self, address: str, targets: Sequence[str]) -> Deferred[int]:
        key = aliasKey(address)
        domain = key.rpartition("@")[2]
        normalised = [_target(t) for t in targets]
        if not normalised:
            raise HostingError(f"alias {key} needs at least one target")

        def add(q: _Query) -> int:
            _requireDomain(q, domain)
            have = q.all("SELECT count(*) FROM hosting_aliases WHERE address = ?", key)[0][0]
            added = 0
            for target in normalised:
                added += q.run(
                    "INSERT INTO hosting_aliases (address, target, domain) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    key,
                    target,
                    domain,
                )
            if have + added > MAX_TARGETS:
                raise HostingError(f"alias {key} would have more than {MAX_TARGETS} targets")
            return added

        return self._call(add)

    @_refusalsAsFailures
    def deleteAlias(self, address: str, target: str | None = None) -> Deferred[int]:
        key = aliasKey(address)
        if target is None:
            return self._call(lambda q: q.run("DELETE FROM hosting_aliases WHERE address = ?", key))
        one = _target(target)
        return self._call(
            lambda q: q.run("DELETE FROM hosting_aliases WHERE address = ? AND target = ?", key, one)
        )

    @_refusalsAsFailures
    def listAliases(self, domain: str | None = None) -> Deferred[tuple[AliasEntry, ...]]:
        sql = "SELECT address, target FROM hosting_aliases"
        params: tuple[str, ...] = ()
        if domain is not None:
            sql += " WHERE domain = ?"
            params = (domainKey(domain),)
        return self._call(
            lambda q: tuple(AliasEntry(*row) for row in q.all(sql + " ORDER BY address, target", *params))
        )

    # -- sender rights ------------------------------------------------------------

    @_refusalsAsFailures
    def allowSender(self, user: str, address: str) -> Deferred[bool]:
        name = _user(user)
        key = senderKey(address)
        return self._call(
            lambda q: (
                q.run(
                    "INSERT INTO hosting_senders (username, address) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    name,
                    key,
                )
                == 1
            )
        )

    @_refusalsAsFailures
    def denySender(self, user: str, address: str) -> Deferred[bool]:
        name = _user(user)
        key = senderKey(address)
        return self._call(
            lambda q: q.run("DELETE FROM hosting_senders WHERE username = ? AND address = ?", name, key) == 1
        )

    @_refusalsAsFailures
    def listSenders(self, user: str | None = None) -> Deferred[tuple[SenderRight, ...]]:
        sql = "SELECT username, address FROM hosting_senders"
        params: tuple[str, ...] = ()
        if user is not None:
            sql += " WHERE username = ?"
            params = (_user(user),)
        return self._call(
            lambda q: tuple(SenderRight(*row) for row in q.all(sql + " ORDER BY username, address", *params))
        )


def _requireDomain(q: _Query, domain: str) -> None:
    if not q.exists("SELECT 1 FROM hosting_domains WHERE name = ?", domain):
        raise HostingError(f"domain {domain} is not hosted (add it with: mailfw domain add {domain})")


def _target(text: str) -> str:
    """
    An alias target as stored: a full address, domain normalised, local
    part as written (the next hop may care about its case).
    """
    try:
        return str(Address.parse(text.strip(), utf8=True))
    except Exception as e:
        raise HostingError(f"bad alias target {text!r}: {e}") from None


def _user(text: str) -> str:
    user = text.strip()
    if not user or any(c.isspace() or ord(c) < 32 for c in user):
        raise HostingError(f"bad user name {text!r}")
    return user


def tableFromText(text: str, dataDir: Path, runInThread: ThreadRunner, title: str) -> SQLHostingTable:
    """
    The table that C{text} names, C{"sqlite:PATH"} or
    C{"postgresql:CONNINFO"}, with its schema created; blocking, for
    start-up and the C{mailfw} command.

    @param title: how errors name the configuration key.
    @raise ConfigError: if C{text} is malformed or the database cannot be
        opened.
    """
    kind, sep, rest = text.partition(":")
    if not sep or not rest or kind not in ("sqlite", "postgresql"):
        raise ConfigError(f"{title}: expected 'sqlite:PATH' or 'postgresql:CONNINFO', got {text!r}")
    if kind == "sqlite":
        path = Path(rest)
        dialect = sqliteDialect(path if path.is_absolute() else dataDir / path)
    else:
        try:
            dialect = postgresDialect(rest)
        except ConfigError as e:
            raise ConfigError(f"{title}: {e}") from None
    table = SQLHostingTable(dialect, runInThread)
    try:
        table.createSchema()
    except Exception as e:
        raise ConfigError(f"{title}: cannot open {dialect.description}: {e}") from None
    return table
