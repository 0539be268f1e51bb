"""
The queue several nodes share: PostgreSQL through psycopg 3 and
L{twisted.enterprise.adbapi}, under the transitions of
L{mailfw.queue._engine} (see docs/architecture.rst).

The tables are L{mailfw.queue._schema}'s, with the body stored
uncompressed and out of line (C{STORAGE EXTERNAL}) so that a large body is
read in slices, plus C{mailfw_nodes} (each running node's last heartbeat)
and C{destination_leases} (delivery slots per destination, numbered below
its limit; the primary key keeps the limit across nodes).
L{initialiseDatabase} creates or migrates them under an advisory lock.

Claims take rows with C{FOR UPDATE SKIP LOCKED}, so nodes never wait for
each other's rows.  Each node beats every C{heartbeatSeconds}; one silent
for three intervals is dead, and the first node to notice returns its
leases, drops its slots and its row: at least once, never lost.  Nodes
must keep their clocks in sync (NTP) to well within a heartbeat.

Commits are durable (C{synchronous_commit = on}).  Inserts are idempotent
under an ID chosen before the body arrives, so when the connection fails
around a commit the queue asks whether the message is stored and
otherwise inserts it once more.  A large body is spooled to an unlinked
file as it arrives, streamed in with binary C{COPY}, and read back in
slices into an unlinked file.

C{flush}, C{release} and C{bounce} send C{NOTIFY mailfw_due}; every node
listens on a connection of its own in a thread.  New mail does not
notify: the node that received it delivers it.
"""

from __future__ import annotations

import contextlib
import functools
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope
from mailfw.interfaces import (
    IDescribed,
    IDestinationSlots,
    ILeaseOffers,
    IMessageBody,
    IMessageQueue,
    ISharedState,
)
from mailfw.queue._engine import Database, Dialect, SQLQueue, createSchema, returnLeases, storeOptions
from mailfw.queue._io import CHUNK, Executor, ExecutorRunner, FileBody, copySpooled
from mailfw.queue._schema import (
    INSERT_MESSAGE,
    SCHEMA_VERSION,
    createStatements,
    envelopeToJSON,
    newQueueID,
    pyformat,
)
from mailfw.queue._spool import NewMessage
from mailfw.queued import Lease

if TYPE_CHECKING:
    from psycopg import Connection, Cursor

__all__ = ["CHANNEL", "PostgresQueue", "fromConfig", "initialiseDatabase", "withConnectionDefaults"]

_T = TypeVar("_T")

CHANNEL = "mailfw_due"
"""The NOTIFY channel for flushes and releases."""
LOCK_KEY = 0x6D61696C6677
"""The advisory lock held while the schema is created or migrated."""
STALE_BEATS = 3
"""A node is dead after this many heartbeat intervals without a beat."""

_POSTGRES_STATEMENTS = [
    """CREATE TABLE IF NOT EXISTS mailfw_nodes (
        node TEXT PRIMARY KEY,
        last_seen DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS destination_leases (
        destination TEXT NOT NULL,
        slot INTEGER NOT NULL,
        node TEXT NOT NULL,
        expires DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (destination, slot)
    )""",
    "CREATE INDEX IF NOT EXISTS destination_leases_node ON destination_leases (node)",
    # LIKE 'prefix%' on rdomain (ETRN @domain) needs pattern ops to use an
    # index under a non-C collation.
    "CREATE INDEX IF NOT EXISTS recipients_rdomain_pattern ON recipients (rdomain text_pattern_ops)",
    "CREATE INDEX IF NOT EXISTS recipients_owner ON recipients (lease_owner) WHERE lease_owner IS NOT NULL",
    # Bodies are mostly read in slices; compression would make each slice
    # decompress from the start.
    "ALTER TABLE message_bodies ALTER COLUMN body SET STORAGE EXTERNAL",
]

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)


# --- errors ------------------------------------------------------------------------


def _connectionProblem(error: BaseException) -> bool:
    """
    Whether C{error} means the connection failed (so a commit may or may not
    have happened), rather than the server refusing a statement.
    """
    import psycopg
    from twisted.enterprise.adbapi import ConnectionLost

    if isinstance(error, (ConnectionLost, psycopg.InterfaceError)):
        return True
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")
    return False


# --- the schema --------------------------------------------------------------------


def initialiseDatabase(conninfo: str, connectTimeout: float = 10.0) -> None:
    """
    Create or migrate the schema, under an advisory lock.

    Runs synchronously: call it at start-up, before the reactor runs (or in
    a thread).

    @param conninfo: a libpq connection string or URI; empty to use the
        C{PG*} environment variables.
    @raise psycopg.Error: if the database cannot be reached or was set up by
        a newer mailfw.
    """
    import psycopg

    with (
        psycopg.connect(withConnectionDefaults(conninfo, connectTimeout)) as connection,
        connection.transaction(),
    ):
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        stored = None
        found = connection.execute("SELECT to_regclass('mailfw_schema')").fetchone()
        if found is not None and found[0] is not None:
            stored = (connection.execute("SELECT MAX(version) FROM mailfw_schema").fetchone() or (None,))[0]
        if stored != SCHEMA_VERSION:
            # Else no DDL: it would lock tables that running nodes write.
            statements = [*createStatements("BYTEA"), *_POSTGRES_STATEMENTS]
            createSchema(_Cursor(connection.cursor()), stored, statements, psycopg.DatabaseError)


def withConnectionDefaults(conninfo: str, connectTimeout: float = 10.0) -> str:
    """
    C{conninfo} with bounded waits where it sets none: a connect timeout,
    TCP keepalives and a TCP user timeout, so that a node whose database
    vanished notices within about half a minute instead of hanging in a
    pool thread.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    given = conninfo_to_dict(conninfo)
    defaults: dict[str, Any] = {
        "connect_timeout": max(1, int(connectTimeout)),
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30000,
    }
    extra = {key: value for key, value in defaults.items() if key not in given}
    return make_conninfo(conninfo, **extra)


class _Cursor:
    """
    A psycopg cursor that takes the engine's C{?} placeholders (C{%s} ones
    pass through unchanged).
    """

    def __init__(self, cursor: Cursor[Any]) -> None:
        self.cursor = cursor
        self.connection: Connection[Any] = cursor.connection

    def execute(self, statement: str, params: Sequence[Any] = (), /) -> Cursor[Any]:
        return self.cursor.execute(pyformat(statement), params)

    def executemany(self, statement: str, rows: Iterable[Sequence[Any]], /) -> None:
        self.cursor.executemany(pyformat(statement), rows)


@implementer(IMessageQueue, IDestinationSlots, ILeaseOffers, IDescribed, ISharedState)
class PostgresQueue(SQLQueue):
    """
    An L{IMessageQueue} in a PostgreSQL database that several nodes share;
    see the module docstring.

    @ivar node: this node's name, recorded as the owner of its leases.
    @ivar listening: fires once this node listens for other nodes' flushes.
    @ivar notificationsReceived: how many C{NOTIFY}s reached this node (its
        own included; those do not wake it), and C{lastNotification} the
        last one's payload: the sending node's name.
    """

    _dialect = Dialect(lockRows=" FOR UPDATE", skipLocked=" FOR UPDATE SKIP LOCKED")

    def __init__(
        self,
        conninfo: str,
        reactor: Any,
        *,
        clock: Any = None,
        poolSize: int = 5,
        node: str | None = None,
        leaseSeconds: float = 7200.0,
        heartbeatSeconds: float = 10.0,
        spillThreshold: int = 256 * 1024,
        spoolDirectory: Path | None = None,
        idGenerator: Callable[[], str] = newQueueID,
        spool: Executor | None = None,
        listen: bool = True,
        afterInsert: Callable[[], None] | None = None,
        connectTimeout: float = 10.0,
    ) -> None:
        """
        Build the queue; the connection pool, heartbeat and listener start
        when the reactor runs.  Call L{initialiseDatabase} first.

        @param reactor: runs the pool's results back on the reactor thread
            (C{callFromThread}) and starts the pool (C{callWhenRunning}).
        @param clock: the time source (default C{reactor}).
        @param poolSize: the most connections (and pool threads) used.
        @param afterInsert: called in the pool thread right after an
            insert's C{COMMIT}; a seam for tests of a commit whose answer
            is lost.
        """
        from twisted.enterprise.adbapi import ConnectionPool

        self._conninfo = conninfo = withConnectionDefaults(conninfo, connectTimeout)
        self._startEngine(
            clock if clock is not None else reactor,
            reactor.callFromThread,
            ids=idGenerator,
            leaseSeconds=leaseSeconds,
            owner=node,
            spillThreshold=spillThreshold,
            spoolDirectory=spoolDirectory or Path(tempfile.gettempdir()),
            spool=spool,
        )
        self.node = self._owner
        self.heartbeatSeconds = heartbeatSeconds
        self._listen = listen
        self._afterInsert = afterInsert
        self._inFlight: set[Deferred[Any]] = set()
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._listenerDone: Deferred[None] = Deferred()
        self.listening: Deferred[None] = Deferred()
        self.notificationsReceived = 0
        self.lastNotification: str | None = None
        self._slots: dict[str, list[int]] = {}
        self._pool = ConnectionPool(
            "psycopg",
            conninfo,
            cp_min=1,
            cp_max=poolSize,
            cp_reactor=reactor,
            cp_reconnect=True,
            cp_openfun=self._configureConnection,
        )
        reactor.callWhenRunning(self._startBackground)

    def __repr__(self) -> str:
        # Never the connection string: it may hold a password.
        return f"<PostgresQueue node={self.node!r}>"

    def describe(self) -> str:
        """
        The server, database and user, and this node's name; never the
        password, nor any other part of the connection string.
        """
        from psycopg.conninfo import conninfo_to_dict

        given = conninfo_to_dict(self._conninfo)
        shown = " ".join(
            f"{key}={given[key]}" for key in ("host", "port", "dbname", "user") if given.get(key)
        )
        return f"postgresql {shown or '(PG* environment)'} node {self.node}"

    def ownedPaths(self) -> Sequence[str]:
        """
        None: the database is the server's, and spooled bodies are unlinked
        temporary files.
        """
        return []

    @staticmethod
    def _configureConnection(connection: Connection[Any]) -> None:
        connection.execute("SET synchronous_commit TO on")
        connection.execute("SET application_name TO 'mailfw'")
        connection.commit()

    def _transact(self, function: Callable[[_Cursor], _T], durable: bool = True) -> Deferred[_T]:
        """
        Run C{function} with a cursor in one transaction in a pool thread;
        the result arrives on the reactor thread after the C{COMMIT}.  Every
        commit is durable (C{synchronous_commit} is on for the pool's
        connections).
        """
        if self._closed:
            return fail(RuntimeError("the queue is closed"))

        def run(connection: Any) -> _T:
            with connection.cursor() as cursor:
                result = function(_Cursor(cursor))
            connection.commit()
            return result

        d: Deferred[_T] = self._pool.runWithConnection(run)
        self._inFlight.add(d)

        def done(result: _T | Failure) -> _T | Failure:
            self._inFlight.discard(d)
            if isinstance(result, Failure) and result.value is not None:
                translated = self._translate(result.value)
                return result if translated is result.value else Failure(translated)
            return result

        return d.addBoth(done)

    def _read(self, function: Callable[[_Cursor], _T]) -> Deferred[_T]:
        return self._transact(function)

    @staticmethod
    def _isFull(error: BaseException) -> bool:
        # Class 53: insufficient resources (a full disk, out of memory).
        import psycopg

        return isinstance(error, psycopg.Error) and (error.sqlstate or "").startswith("53")

    def _startBackground(self) -> None:
        if self._closed:
            return
        self._startReaping(self._beat, self.heartbeatSeconds, now=True)
        if self._listen:
            self._listener = threading.Thread(
                target=self._listenLoop, name="mailfw-queue-listen", daemon=True
            )
            self._listener.start()
        else:
            self._listenerDone.callback(None)

    def _beat(self) -> Deferred[None]:
        """
        Record that this node lives, extend the destination slots it holds,
        and return the leases and slots of nodes that stopped beating.

        Only the slots this node knows it holds are extended: a slot whose
        commit succeeded while its reply was lost (the server restarted
        under it) has this node's name too, and extending it would keep
        the destination busy for ever; it expires instead.
        """
        now = self._clock.seconds()
        node, lease = self.node, self.leaseSeconds
        held = [(destination, slot) for destination, slots in self._slots.items() for slot in slots]

        def beat(cursor: _Cursor) -> tuple[int, int]:
            self._touch(cursor, now)
            cursor.execute(
                "UPDATE destination_leases SET expires = %s WHERE node = %s"
                " AND (destination, slot) IN (SELECT * FROM unnest(%s::text[], %s::int[]))",
                (now + lease, node, [d for d, _ in held], [s for _, s in held]),
            )
            reaped, dead = self._deadNodes(cursor, now, " FOR UPDATE SKIP LOCKED")
            cursor.execute(
                "DELETE FROM destination_leases WHERE node = ANY(%s) OR expires <= %s", (dead, now)
            )
            cursor.execute("DELETE FROM mailfw_nodes WHERE node = ANY(%s)", (dead,))
            return reaped, len(dead)

        def done(result: tuple[int, int]) -> None:
            reaped, dead = result
            if dead or reaped:
                self.log.warn(
                    "{dead} nodes stopped beating; {count} of their recipients are ready again",
                    dead=dead,
                    count=reaped,
                )
                self._notify(None)

        def failed(failure: Failure) -> None:
            if not self._closed:
                self.log.warn("queue heartbeat failed: {error}", error=str(failure.value))

        return self._transact(beat).addCallbacks(done, failed)

    def _listenLoop(self) -> None:
        # Listener thread: its own connection, in autocommit mode.
        import psycopg

        deliver = self._deliver
        leftPayload = f"left:{self.node}"
        first = True
        delay = 0.5
        while not self._stopping.is_set():
            connection: Connection[Any] | None = None
            try:
                connection = psycopg.connect(self._conninfo, autocommit=True)
                connection.execute(f"LISTEN {CHANNEL}")
                delay = 0.5
                if first:
                    first = False
                    deliver(lambda: self.listening.callback(None))
                else:
                    # Flushes may have happened while we were away.
                    deliver(lambda: self._notify(None))
                while not self._stopping.is_set():
                    for notification in connection.notifies(timeout=0.5):
                        payload = notification.payload
                        if payload == leftPayload:
                            # Our own goodbye (see close): stop at once.
                            self._stopping.set()
                            break
                        # Bind this payload now, not the loop's last one.
                        deliver(functools.partial(self._received, payload))
            except psycopg.Error as e:
                if not self._stopping.is_set():
                    deliver(
                        functools.partial(
                            self.log.warn, "queue listener lost the database: {error}", error=str(e)
                        )
                    )
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 10.0)
            finally:
                if connection is not None:
                    with contextlib.suppress(psycopg.Error):
                        connection.close()
        deliver(lambda: self._listenerDone.callback(None))

    def _received(self, payload: str) -> None:
        self.notificationsReceived += 1
        self.lastNotification = payload
        if payload != self.node:
            self._notify(None)

    def _store(
        self, message: NewMessage, lease: Lease | None, insert: Callable[[_Cursor], str]
    ) -> Deferred[str]:
        """
        Insert a message; when the connection fails around the commit, find
        out whether it was stored, and else try once more.
        """
        queueID, envelope = message.queueID, message.envelope
        afterInsert = self._afterInsert

        def insertOnce(cursor: _Cursor) -> str:
            insert(cursor)
            if afterInsert is not None:
                cursor.connection.commit()
                afterInsert()
            return queueID

        def exists(cursor: _Cursor) -> bool:
            # This message, not another that drew the same ID (encoded only
            # on this rare path).
            found = cursor.execute(
                "SELECT 1 FROM messages WHERE id = ? AND envelope = ?", (queueID, envelopeToJSON(envelope))
            )
            return found.fetchone() is not None

        def resolve(failure: Failure) -> Deferred[str]:
            if failure.value is None or not _connectionProblem(failure.value):
                return fail(failure)
            if not envelope.recipients:
                return fail(failure)
            self.log.warn(
                "connection failed while committing {queueID}; checking whether it is stored",
                queueID=queueID,
            )

            def checked(stored: bool) -> Deferred[str] | str:
                if stored:
                    return queueID
                return self._transact(insertOnce)

            def unresolved(_: Failure) -> Failure:
                if lease is not None:
                    # It may be stored, leased to this live node, which
                    # will not deliver it: return it to ready if it is.
                    condition, params = "message_id = ? AND lease_token = ?", (queueID, lease.token)
                    self._transact(lambda cursor: returnLeases(cursor, condition, params)).addErrback(
                        lambda f: self.log.failure("releasing {queueID} failed", f, queueID=queueID)
                    )
                return failure

            resolved: Deferred[str] = self._transact(exists).addCallback(checked)
            return resolved.addErrback(unresolved)

        return self._transact(insertOnce).addErrback(resolve)

    def _insertMessageRow(self, db: Database, queueID: str, envelope: Envelope, size: int) -> bool:
        """
        Insert the message row; inserting this message again does nothing
        (a retried commit); another message with its ID fails with
        L{QueueIDTaken}.
        """
        envelopeText = envelopeToJSON(envelope)
        row = db.execute(
            INSERT_MESSAGE + " ON CONFLICT (id) DO NOTHING RETURNING id",
            (queueID, envelope.senderText, envelopeText, size, envelope.arrival),
        ).fetchone()
        if row is not None:
            return True
        stored = db.execute("SELECT envelope FROM messages WHERE id = %s", (queueID,)).fetchone()
        if stored is not None and stored[0] == envelopeText:
            return False  # this very message: a retried commit
        # Another message drew this ID: fail, and the client tries again.
        raise QueueIDTaken(queueID)

    def _copyBody(self, db: Database, queueID: str, head: bytes, spooled: IO[bytes], size: int) -> None:
        """
        Stream a spooled body into C{message_bodies} with binary C{COPY}.
        """
        assert isinstance(db, _Cursor)
        key = queueID.encode("utf-8")
        with db.cursor.copy("COPY message_bodies (message_id, body) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(_COPY_HEADER + struct.pack("!hi", 2, len(key)) + key + struct.pack("!i", size))
            copySpooled(queueID, head, spooled, size, copy.write)
            copy.write(_COPY_TRAILER)

    def _newToken(self) -> str:
        return uuid.uuid4().hex

    def _touch(self, db: Database, now: float) -> None:
        db.execute(
            "INSERT INTO mailfw_nodes (node, last_seen, heartbeat) VALUES (?, ?, ?)"
            " ON CONFLICT (node) DO UPDATE SET last_seen = EXCLUDED.last_seen,"
            " heartbeat = EXCLUDED.heartbeat",
            (self.node, now, self.heartbeatSeconds),
        )

    def _wakeOthers(self, db: Database) -> None:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.node))

    def _largeBody(self, db: Database, queueID: str, size: int) -> IMessageBody:
        """
        Copy a large body out in slices into an unlinked temporary file, so
        that it is never in memory whole and the connection is not held
        while it is delivered (read in the queue's spool thread).
        """
        file = tempfile.TemporaryFile(dir=self.spoolDirectory)  # noqa: SIM115 (returned to the caller)
        try:
            offset = 0
            while offset < size:
                piece = db.execute(
                    "SELECT substring(body FROM ? FOR ?) FROM message_bodies WHERE message_id = ?",
                    (offset + 1, CHUNK, queueID),
                ).fetchone()
                if piece is None or not piece[0]:
                    raise KeyError(queueID)
                file.write(piece[0])
                offset += len(piece[0])
            file.flush()
        except BaseException:
            file.close()
            raise
        return FileBody(file, size, ExecutorRunner(self._spool, self._deliver))

    def _beginSnapshot(self, db: Database) -> None:
        db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def _sparedOwners(self, db: Database, now: float, clockNow: float) -> tuple[str, Sequence[Any]]:
        """
        Every other node: a dead one's leases go by L{_reapDead}.
        """
        return "lease_owner <> ?", (self.node,)

    def _reapDead(self, db: Database, now: float) -> int:
        """
        Return the leases of nodes that stopped beating (their rows stay
        for the next heartbeat to drop).
        """
        return self._deadNodes(db, now)[0]

    def _deadNodes(self, db: Database, now: float, lockRows: str = "") -> tuple[int, list[str]]:
        """
        Return to ready the leases of the nodes that stopped beating and of
        nodes that have no row at all (they left, or were found dead
        before); how many, and the dead nodes.  Only ownerless leases
        granted before this node's oldest possible row are taken, so that a
        node's very first claim, whose row this statement's snapshot may not
        see yet, is left alone.
        """
        dead = [
            name
            for (name,) in db.execute(
                "SELECT node FROM mailfw_nodes WHERE last_seen < ? - ? * heartbeat AND node <> ?" + lockRows,
                (now, STALE_BEATS, self.node),
            ).fetchall()
        ]
        grantedBefore = now + self.leaseSeconds - STALE_BEATS * self.heartbeatSeconds
        reaped = returnLeases(
            db,
            "(lease_owner = ANY(?) OR (lease_expires < ? AND NOT EXISTS"
            " (SELECT 1 FROM mailfw_nodes n WHERE n.node = recipients.lease_owner)))",
            (dead, grantedBefore),
        )
        return reaped, dead

    def acquireDestination(self, destination: str, limit: int) -> Deferred[bool]:
        """
        Take one of the C{limit} cluster-wide delivery slots of
        C{destination} (for example C{"agent:nexthop"}), if one is free.

        @return: fires with C{True} when this node now holds a slot (release
            it with L{releaseDestination}), C{False} when all are taken.
        """
        now = self._clock.seconds()
        node, expires = self.node, now + self.leaseSeconds

        def acquire(cursor: _Cursor) -> int | None:
            cursor.execute(
                "DELETE FROM destination_leases WHERE destination = %s AND expires <= %s",
                (destination, now),
            )
            row = cursor.execute(
                "INSERT INTO destination_leases (destination, slot, node, expires)"
                " SELECT %s, s, %s, %s FROM generate_series(0, %s - 1) AS s"
                " WHERE s NOT IN (SELECT slot FROM destination_leases WHERE destination = %s)"
                " ORDER BY s LIMIT 1 ON CONFLICT DO NOTHING RETURNING slot",
                (destination, node, expires, limit, destination),
            ).fetchone()
            return None if row is None else int(row[0])

        def acquired(slot: int | None) -> bool:
            if slot is None:
                return False
            self._slots.setdefault(destination, []).append(slot)
            return True

        return self._transact(acquire).addCallback(acquired)

    def releaseDestination(self, destination: str) -> Deferred[None]:
        """
        Give back one slot of C{destination} that L{acquireDestination}
        gave this node.
        """
        slots = self._slots.get(destination)
        if not slots:
            return fail(ValueError(f"no slot of {destination!r} is held"))
        slot = slots.pop()
        if not slots:
            del self._slots[destination]
        node = self.node

        def release(cursor: _Cursor) -> None:
            cursor.execute(
                "DELETE FROM destination_leases WHERE destination = %s AND slot = %s AND node = %s",
                (destination, slot, node),
            )

        return self._transact(release)

    def _shutdown(self) -> Deferred[None]:
        """
        Wait for the work under way, hand this node's remaining leases and
        slots back to the cluster, stop the heartbeat and the listener, and
        close the connections.
        """
        node = self.node

        def leave(cursor: _Cursor) -> None:
            returnLeases(cursor, "lease_owner = ?", (node,))
            cursor.execute("DELETE FROM destination_leases WHERE node = %s", (node,))
            cursor.execute("DELETE FROM mailfw_nodes WHERE node = %s", (node,))
            # Wakes the other nodes (they may claim what we handed back) and
            # ends our own listener without waiting for its poll timeout.
            cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"left:{node}"))

        pending = DeferredList(list(self._inFlight), consumeErrors=True)

        def left(_: object) -> Deferred[Any]:
            self._closed = True
            self._stopping.set()
            if self._listener is None and not self._listenerDone.called:
                self._listenerDone.callback(None)
            return self._listenerDone

        def finish(_: object) -> None:
            self._pool.close()
            self._spool.stop()

        def sayLeft(_: object) -> Deferred[None]:
            return self._transact(leave).addErrback(
                lambda f: self.log.warn("could not hand back this node's leases: {error}", error=str(f.value))
            )

        return pending.addCallback(sayLeft).addCallback(left).addCallback(finish)


# --- errors and configuration -----------------------------------------------------------


class QueueIDTaken(Exception):
    """
    A new message drew the queue ID of a message already stored.
    """


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> PostgresQueue:
    """
    Build a L{PostgresQueue} from C{[queue]} with C{plugin = "postgresql"},
    creating or migrating the schema.

    Options: C{dsn} (a libpq connection string or C{postgresql://} URI;
    default empty, meaning the C{PG*} environment variables), C{pool_size}
    (5), C{node} (this node's lease owner name; default host name and
    process ID), C{heartbeat_seconds} (10), C{connect_timeout} (10
    seconds) and L{storeOptions}.
    """
    section = Section(f"[{instanceName}]", options)
    dsn = section.text("dsn", "")
    poolSize = section.integer("pool_size", 5, minimum=1)
    node = section.text("node", None)
    common = storeOptions(section)
    heartbeatSeconds = section.number("heartbeat_seconds", 10.0, minimum=0.1)
    connectTimeout = section.number("connect_timeout", 10.0, minimum=1)
    section.finish()
    if node == "":
        raise ConfigError(f"[{instanceName}] node: must not be empty")
    if common["leaseSeconds"] <= STALE_BEATS * heartbeatSeconds:
        raise ConfigError(f"[{instanceName}] lease_seconds must be longer than {STALE_BEATS} heartbeats")
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            f"[{instanceName}] plugin postgresql needs psycopg: pip install 'mailfw[postgresql]'"
        ) from None
    try:
        initialiseDatabase(dsn, connectTimeout)
    except psycopg.Error as e:
        raise ConfigError(f"[{instanceName}] cannot set up the PostgreSQL queue: {e}") from None
    spool = context.path("spool")
    spool.mkdir(parents=True, exist_ok=True)
    return PostgresQueue(
        dsn,
        context.reactor,
        poolSize=poolSize,
        node=node,
        heartbeatSeconds=heartbeatSeconds,
        spoolDirectory=spool,
        connectTimeout=connectTimeout,
        **common,
    )
