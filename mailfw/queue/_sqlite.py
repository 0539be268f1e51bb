"""
The embedded default queue: one SQLite database in WAL mode.

Threads
=======

The reactor thread never touches the database file.  Three dedicated
threads do, each owning its own work:

  - the B{writer} thread owns the only writing connection.  Every change
    (enqueue, claim, record, recover and the operator actions) is an
    I{operation} appended to a pending list; the writer takes I{all}
    pending operations at once and runs them in one transaction (if one
    fails, the batch runs again with each operation in a savepoint, so
    one failing operation does not spoil the others), then
    commits with one fsync (C{synchronous=FULL}).  Operations that arrive
    while a commit runs wait for the next one: that is group commit, and it
    is what lets a hundred sessions share one fsync.  Each operation's
    L{Deferred} fires on the reactor thread (C{callFromThread}) only after
    the transaction holding it committed; only then may the server
    answer 250.
  - the B{reader} thread owns a read connection for C{list}, C{nextDue}
    and C{openBody}, so that an operator listing a big queue never delays
    commits.
  - the B{spool} thread writes bodies larger than C{spillThreshold} to an
    unlinked temporary file while they arrive, so that a 35 MiB message is
    never held in memory; the writer then copies that file into the body's
    BLOB (C{zeroblob} and incremental BLOB I/O in 1 MiB pieces) inside the
    same transaction as the rows.  Smaller bodies stay in memory and are
    inserted as one value.  No file is created, renamed or fsynced per
    message on the hot path.

Bodies are read with incremental BLOB I/O too: L{IMessageBody.open}
returns a reader with its own connection and read transaction (a stable
snapshot even if the message is deleted meanwhile), which may be used from
any one thread at a time.  A long read holds back WAL checkpoints while it
lasts; that is the price of never copying a big body out.

Each thread is an L{Executor}; tests pass L{SynchronousExecutor}s and a
synchronous C{deliver} so that everything runs at once, deterministically,
on the test's thread.

Crash safety
============

A commit's L{Deferred} fires after C{COMMIT} returned with
C{synchronous=FULL}, so a crash after that loses nothing.  Claims are
leases with an expiry stored in the rows (a new message handed straight to
the scheduler, see L{ILeaseOffers}, is stored leased the same way); a
crash while delivering leaves the recipients leased, and
L{SQLiteQueue.recover} (which the scheduler calls at start-up with an
infinite time, because on one node every lease in an SQLite queue belongs
to the process that died) returns them to ready, so they are delivered
again: at least once, never lost.  Worker
processes (C{--workers}) share the file; recovery spares the unexpired
leases of a live sibling process on this host, and once a minute each
queue returns to ready the leases of this host's processes that have
ended meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import itertools
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope
from mailfw.interfaces import IDescribed, ILeaseOffers, IMessageBody, IMessageQueue, ISharedState
from mailfw.queue._engine import LEASED, Database, SQLQueue, marks, returnLeases
from mailfw.queue._io import CHUNK, Executor, ExecutorRunner, SynchronousExecutor, ThreadExecutor, copySpooled
from mailfw.queue._produce import ThreadRunner, produceFromFile
from mailfw.queue._schema import SCHEMA_VERSION, createStatements, newQueueID
from mailfw.queue._spool import NewMessage
from mailfw.queued import Lease, QueueFull

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "Executor",
    "SQLiteQueue",
    "SynchronousExecutor",
    "ThreadExecutor",
    "fromConfig",
    "initialiseDatabase",
]

_T = TypeVar("_T")


# --- the database --------------------------------------------------------------


def _isFull(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "database or disk is full" in str(error)


def _translate(error: BaseException) -> BaseException:
    """
    Turn a full disk into L{QueueFull}, so the server answers 452.
    """
    if isinstance(error, sqlite3.Error) and _isFull(error):
        return QueueFull(str(error))
    if isinstance(error, OSError) and error.errno == 28:  # ENOSPC in the spool
        return QueueFull(str(error))
    return error


def connect(path: Path) -> sqlite3.Connection:
    """
    A connection in autocommit mode (we issue C{BEGIN} ourselves) with the
    settings every connection needs.
    """
    connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA busy_timeout = 30000")
    return connection


def initialiseDatabase(path: Path) -> None:
    """
    Create the database and schema if needed and switch it to WAL mode.

    Runs synchronously: call it at start-up, before the reactor runs (or
    in a thread).

    @raise sqlite3.Error: if the file cannot be opened or was made by a
        newer mailfw.
    """
    if sqlite3.sqlite_version_info < (3, 35):
        # RETURNING (the queue engine) and upserts need it.
        raise sqlite3.NotSupportedError(
            f"the SQLite queue needs SQLite 3.35 or later, not {sqlite3.sqlite_version}"
        )
    connection = connect(path)
    try:
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
        connection.execute("BEGIN IMMEDIATE")
        for statement in createStatements("BLOB"):
            connection.execute(statement)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(recipients)")}
        if "released" not in columns:
            # A queue made before ETRN (same schema version: never released).
            connection.execute("ALTER TABLE recipients ADD COLUMN released INTEGER NOT NULL DEFAULT 0")
        if "bounce" not in columns:
            # A queue made before C{mailfw queue bounce} (nothing requested).
            connection.execute("ALTER TABLE recipients ADD COLUMN bounce INTEGER NOT NULL DEFAULT 0")
        row = connection.execute("SELECT version FROM mailfw_schema").fetchone()
        if row is None:
            connection.execute("INSERT INTO mailfw_schema (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path} has queue schema version {row[0]}; this mailfw knows {SCHEMA_VERSION}"
            )
        elif row[0] < SCHEMA_VERSION:
            # The statements above created what the older version lacked
            # (version 2: shared_state).
            connection.execute("UPDATE mailfw_schema SET version = ?", (SCHEMA_VERSION,))
        connection.execute("COMMIT")
    finally:
        connection.close()


class _Operation(Generic[_T]):
    """
    One change waiting for the writer: a function of the connection and the
    L{Deferred} to fire with its result after the commit.
    """

    def __init__(self, function: Callable[[sqlite3.Connection], _T], durable: bool = True) -> None:
        self.function = function
        self.durable = durable
        self.deferred: Deferred[_T] = Deferred()
        self.ok = False
        self.result: Any = None
        self.cleanup: Callable[[], None] | None = None

    def fire(self) -> None:
        if self.ok:
            self.deferred.callback(self.result)
        else:
            self.deferred.errback(Failure(self.result))


# --- bodies ----------------------------------------------------------------------


class _BlobReader(io.RawIOBase):
    """
    Reads one body through incremental BLOB I/O, holding its own
    connection and read transaction (a stable snapshot) until closed.
    """

    def __init__(self, connection: sqlite3.Connection, blob: sqlite3.Blob, size: int) -> None:
        super().__init__()
        self._connection = connection
        self._blob = blob
        self._size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._blob.read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._blob.seek(offset, whence)
        return self._blob.tell()

    def tell(self) -> int:
        return self._blob.tell()

    def close(self) -> None:
        if not self.closed:
            try:
                self._blob.close()
                self._connection.execute("ROLLBACK")
            finally:
                self._connection.close()
        super().close()


@implementer(IMessageBody)
class _BlobBody:
    """
    A stored body too large to read at once; each L{open} reads it from the
    database in pieces.
    """

    def __init__(self, path: Path, queueID: str, size: int, reader: ThreadRunner) -> None:
        self._path = path
        self._queueID = queueID
        self.size = size
        self._inReader = reader

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        # The connection is opened, read and closed in the queue's reader
        # thread, never on the reactor thread.
        return produceFromFile(self.open, consumer, self._inReader)

    def open(self) -> BinaryIO:
        connection = connect(self._path)
        try:
            connection.execute("BEGIN")
            row = connection.execute(
                "SELECT rowid FROM message_bodies WHERE message_id = ?", (self._queueID,)
            ).fetchone()
            if row is None:
                raise KeyError(self._queueID)
            blob = connection.blobopen("message_bodies", "body", row[0], readonly=True)
        except BaseException:
            connection.close()
            raise
        return io.BufferedReader(_BlobReader(connection, blob, self.size), CHUNK)


# --- recently committed messages ------------------------------------------------


class _Recent:
    """
    The envelopes and (small) bodies of recently committed messages, so
    that the common path (accept, then deliver at once) reads nothing back
    from the database: C{claim} takes the envelope from here and
    C{openBody} the bytes.  Bounded in bytes and entries (oldest evicted
    first); a miss falls back to the database.  Used from the writer and
    the reactor thread.
    """

    def __init__(self, maxBytes: int = 16 * 1024 * 1024, maxEntries: int = 10_000) -> None:
        self._entries: dict[str, tuple[Envelope, bytes]] = {}
        self._bytes = 0
        self._maxBytes = maxBytes
        self._maxEntries = maxEntries
        self._lock = threading.Lock()

    def add(self, queueID: str, envelope: Envelope, body: bytes) -> None:
        if len(body) > self._maxBytes:
            return
        with self._lock:
            old = self._entries.pop(queueID, None)
            if old is not None:
                self._bytes -= len(old[1])
            while self._entries and (
                self._bytes + len(body) > self._maxBytes or len(self._entries) >= self._maxEntries
            ):
                evicted = self._entries.pop(next(iter(self._entries)))
                self._bytes -= len(evicted[1])
            self._entries[queueID] = (envelope, body)
            self._bytes += len(body)

    def get(self, queueID: str) -> tuple[Envelope, bytes] | None:
        with self._lock:
            return self._entries.get(queueID)

    def discard(self, queueID: str) -> None:
        with self._lock:
            old = self._entries.pop(queueID, None)
            if old is not None:
                self._bytes -= len(old[1])


# --- the queue -------------------------------------------------------------------


@implementer(IMessageQueue, ILeaseOffers, IDescribed, ISharedState)
class SQLiteQueue(SQLQueue):
    """
    An L{IMessageQueue} in one SQLite database file; see the module
    docstring for the threads and the crash safety.

    @ivar transactions: how many write transactions committed (group commit
        makes this smaller than the number of operations).
    @ivar spillThreshold: bodies larger than this many octets are spilled to
        a temporary file while they arrive and read in pieces.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        clock: IReactorTime,
        *,
        writer: Executor | None = None,
        reader: Executor | None = None,
        spool: Executor | None = None,
        deliver: Callable[[Callable[[], None]], None] | None = None,
        idGenerator: Callable[[], str] = newQueueID,
        leaseSeconds: float = 7200.0,
        owner: str | None = None,
        spillThreshold: int = 256 * 1024,
        spoolDirectory: Path | None = None,
        configureConnection: Callable[[sqlite3.Connection], None] | None = None,
        beforeCommit: Callable[[], None] | None = None,
        reapSeconds: float = 60.0,
    ) -> None:
        """
        Open the queue, creating the database if needed (synchronously:
        build queues at start-up).

        @param clock: the time source; also the reactor whose
            C{callFromThread} delivers results, unless C{deliver} is given.
        @param writer: runs write transactions (default: a dedicated
            thread); likewise C{reader} for reads and C{spool} for spilling
            large bodies.
        @param deliver: calls a function on the reactor thread (default
            C{clock.callFromThread}).
        @param owner: the lease owner recorded in claimed rows (default:
            host name and process ID).
        @param configureConnection: called with the writer connection when
            it opens, before any transaction (tests use it to limit the size
            of the database).
        @param beforeCommit: called on the writer thread just before each
            C{COMMIT}; a seam for tests.
        @param reapSeconds: how often, once L{recover} first ran, the
            leases of this host's processes that have ended are returned to
            ready (see L{_reapDeadSiblings}).
        """
        self._path = Path(path)
        self._clock = clock
        if deliver is None:
            if not IReactorFromThreads.providedBy(clock):
                raise TypeError("deliver is required when clock has no callFromThread")
            deliver = IReactorFromThreads(clock).callFromThread
        self._deliver: Callable[[Callable[[], None]], None] = deliver
        self._writer: Executor = writer or ThreadExecutor("mailfw-queue-writer")
        self._reader: Executor = reader or ThreadExecutor("mailfw-queue-reader")
        self._spool: Executor = spool or ThreadExecutor("mailfw-queue-spool")
        self._ids = idGenerator
        self.leaseSeconds = leaseSeconds
        self._owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.spillThreshold = spillThreshold
        self.spoolDirectory = spoolDirectory or self._path.parent
        self._configure = configureConnection
        self._beforeCommit = beforeCommit
        self._startEngine()
        self._lock = threading.Lock()
        self._pending: list[_Operation[Any]] = []
        self._batchScheduled = False
        self._writerConnection: sqlite3.Connection | None = None
        self._durable = True  # the writer connection's synchronous level
        self._lockFile: int | None = None
        self._readerConnection: sqlite3.Connection | None = None
        self._closed = False
        self._reaper: LoopingCall | None = None
        self.reapSeconds = reapSeconds
        self._tokens = itertools.count(1)
        self._tokenPrefix = os.urandom(8).hex()
        self._recent = _Recent()
        self.transactions = 0
        initialiseDatabase(self._path)

    def _transact(
        self,
        function: Callable[[sqlite3.Connection], _T],
        durable: bool = True,
        cleanup: Callable[[], None] | None = None,
    ) -> Deferred[_T]:
        """
        Run C{function} in the next write transaction; the result arrives on
        the reactor thread after the commit.  C{function} may run more than
        once (see L{_transaction}), so it must depend only on the database.

        @param cleanup: run on the writer thread after the transaction ended,
            whether it committed or not.
        @param durable: the commit must be on disk before the result is
            given (C{synchronous=FULL}).  The scheduler's bookkeeping
            (claims, records) passes C{False}: its transactions are still
            atomic and ordered, and after a power loss the last of them may
            be rolled back, which means a recipient is delivered again
            (delivery is at least once anyway), never lost.  Any batch that
            holds one durable operation is committed durably, and that
            fsync covers the batches before it too.
        """
        if self._closed:
            if cleanup is not None:
                self._writer.submit(cleanup)
            return fail(RuntimeError("the queue is closed"))
        operation = _Operation(function, durable)
        operation.cleanup = cleanup
        with self._lock:
            self._pending.append(operation)
            schedule = not self._batchScheduled
            self._batchScheduled = True
        if schedule:
            self._writer.submit(self._runBatches)
        return operation.deferred

    def _runBatches(self) -> None:
        # Writer thread.  Each pass takes every operation that arrived while
        # the previous commit ran: that is the group commit.
        while True:
            with self._lock:
                operations, self._pending = self._pending, []
                if not operations:
                    self._batchScheduled = False
                    return
            self._runBatch(operations)

    def _lockWriters(self) -> None:
        """
        Take the lock that orders writers across processes (worker
        processes share the file).  SQLite's own busy handler polls with
        growing sleeps, up to tens of milliseconds, which would add that to
        the 250 of a waiting process; a blocking C{flock} wakes it as soon
        as the other commit is done.  Writer thread only.
        """
        if self._lockFile is None:
            self._lockFile = os.open(f"{self._path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lockFile, fcntl.LOCK_EX)

    def _unlockWriters(self) -> None:
        if self._lockFile is not None:
            fcntl.flock(self._lockFile, fcntl.LOCK_UN)

    def _openWriter(self) -> sqlite3.Connection:
        if self._writerConnection is None:
            connection = connect(self._path)
            if self._configure is not None:
                self._configure(connection)
            self._writerConnection = connection
        return self._writerConnection

    def _runBatch(self, operations: list[_Operation[Any]]) -> None:
        try:
            self._transaction(operations)
        finally:
            for operation in operations:
                if operation.cleanup is not None:
                    try:
                        operation.cleanup()
                    except BaseException as e:
                        self.log.error("queue cleanup failed: {error}", error=str(e))

    def _transaction(self, operations: list[_Operation[Any]]) -> None:
        """
        Run C{operations} in one transaction.  They run straight through
        first; if one fails, the transaction is rolled back and they run
        again, each in a savepoint, so that only the failing one fails (the
        savepoints cost two statements per operation, so only a batch that
        needs them pays for them).  When an operation's error made SQLite
        roll back the whole transaction (a full disk does), that operation
        fails and the others run again in a new transaction.
        """
        remaining = list(operations)
        careful = False
        while True:
            try:
                connection = self._openWriter()
                durable = any(operation.durable for operation in remaining)
                if durable != self._durable:
                    connection.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                self._lockWriters()
                connection.execute("BEGIN IMMEDIATE")
            except BaseException as e:
                self._unlockWriters()
                self._finish(remaining, e)
                return
            aborted: _Operation[Any] | None = None
            try:
                if not careful and not self._straightThrough(connection, remaining):
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    careful = True
                    continue  # (the finally clause unlocks)
                for operation in remaining if careful else ():
                    connection.execute("SAVEPOINT op")
                    try:
                        operation.result = operation.function(connection)
                        operation.ok = True
                    except BaseException as e:
                        operation.ok = False
                        operation.result = _translate(e)
                        if not connection.in_transaction:
                            aborted = operation
                            break
                        connection.execute("ROLLBACK TO op")
                    connection.execute("RELEASE op")
                if aborted is None:
                    if self._beforeCommit is not None:
                        self._beforeCommit()
                    connection.execute("COMMIT")
                    self.transactions += 1
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    connection.execute("ROLLBACK")
                self._finish(remaining, e)
                return
            finally:
                self._unlockWriters()
            if aborted is None:
                self._deliver(lambda: self._fire(remaining))
                return
            # Bind the failed operation now: the loop runs again before
            # the reactor calls this.
            self._deliver(functools.partial(self._fire, [aborted]))
            remaining.remove(aborted)
            for operation in remaining:
                operation.ok = False
                operation.result = None

    @staticmethod
    def _straightThrough(connection: sqlite3.Connection, operations: list[_Operation[Any]]) -> bool:
        """
        Run C{operations} without savepoints; C{False} as soon as one
        fails (the caller rolls back and runs them carefully).
        """
        for operation in operations:
            try:
                operation.result = operation.function(connection)
            except BaseException:
                return False
            operation.ok = True
        return True

    def _finish(self, operations: list[_Operation[Any]], error: BaseException) -> None:
        error = _translate(error)
        for operation in operations:
            operation.ok = False
            operation.result = error
        self.log.error("queue transaction failed: {error}", error=str(error))
        self._deliver(lambda: self._fire(operations))

    @staticmethod
    def _fire(operations: list[_Operation[Any]]) -> None:
        for operation in operations:
            operation.fire()

    def _read(self, function: Callable[[sqlite3.Connection], _T]) -> Deferred[_T]:
        """
        Run C{function} in a read transaction on the reader thread.
        """
        if self._closed:
            return fail(RuntimeError("the queue is closed"))
        d: Deferred[_T] = Deferred()

        def job() -> None:
            try:
                if self._readerConnection is None:
                    self._readerConnection = connect(self._path)
                connection = self._readerConnection
                connection.execute("BEGIN")
                try:
                    result = function(connection)
                finally:
                    connection.execute("ROLLBACK")
            except BaseException as e:
                error = e
                self._deliver(lambda: d.errback(Failure(error)))
            else:
                self._deliver(lambda: d.callback(result))

        self._reader.submit(job)
        return d

    _translate = staticmethod(_translate)

    def _store(
        self, message: NewMessage, lease: Lease | None, insert: Callable[[sqlite3.Connection], str]
    ) -> Deferred[str]:
        def store(connection: sqlite3.Connection) -> str:
            insert(connection)
            if message.body is not None and message.envelope.recipients:
                # Harmless if the transaction then fails: only rows that
                # exist are ever claimed.
                self._recent.add(message.queueID, message.envelope, message.body)
            return message.queueID

        spooled = message.spooled
        return self._transact(store, cleanup=None if spooled is None else spooled.close)

    def _copyBody(self, db: Database, queueID: str, spooled: IO[bytes], size: int) -> None:
        """
        Copy a spilled body into its BLOB in pieces (C{zeroblob}, then
        incremental BLOB I/O).
        """
        assert isinstance(db, sqlite3.Connection)
        rowid = db.execute(
            "INSERT INTO message_bodies (message_id, body) VALUES (?, zeroblob(?))", (queueID, size)
        ).lastrowid
        assert rowid is not None
        with db.blobopen("message_bodies", "body", rowid) as blob:
            copySpooled(queueID, spooled, size, blob.write)

    def _cachedEnvelope(self, queueID: str) -> tuple[Envelope, int] | None:
        cached = self._recent.get(queueID)
        return None if cached is None else (cached[0], len(cached[1]))

    def _cachedBody(self, queueID: str) -> bytes | None:
        cached = self._recent.get(queueID)
        return None if cached is None else cached[1]

    def _largeBody(self, db: Database, queueID: str, size: int) -> IMessageBody:
        return _BlobBody(self._path, queueID, size, ExecutorRunner(self._reader, self._deliver))

    def _dropped(self, queueIDs: Sequence[str]) -> None:
        for queueID in queueIDs:
            self._recent.discard(queueID)

    def _newToken(self) -> str:
        # Unique: a random prefix per queue object, a counter within it.
        return f"{self._tokenPrefix}.{next(self._tokens)}"

    def recover(self, now: float) -> Deferred[int]:
        """
        Return leases that expire by C{now} to ready, except the unexpired
        leases (by the clock) of another live process on this host: with
        C{twistd mailfw --workers N} the processes share the database, and
        the scheduler's start-up C{recover(inf)} in one of them must not
        take the deliveries a sibling is making.  A lease of this process's
        own ID, of a process that no longer runs, or of another host is
        recovered as before.
        """
        clockNow = self._clock.seconds()

        def recover(connection: sqlite3.Connection) -> int:
            owners = [
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT lease_owner FROM recipients"
                    " WHERE state = ? AND lease_expires <= ? AND lease_expires > ?",
                    (LEASED, now, clockNow),
                )
            ]
            spared = [owner for owner in owners if self._liveSibling(owner)]
            return returnLeases(
                connection,
                f"lease_expires <= ? AND NOT (lease_expires > ? AND lease_owner IN ({marks(spared)}))",
                (now, clockNow, *spared),
            )

        if self._reaper is None and not self._closed:
            # From the first recovery (the scheduler's start) on.
            self._reaper = LoopingCall(self._reapDeadSiblings)
            self._reaper.clock = self._clock
            self._reaper.start(self.reapSeconds, now=False).addErrback(
                lambda f: self.log.failure("reaping leases failed", f)
            )
        return self._transact(recover).addCallback(self._notifyIf)

    def _reapDeadSiblings(self) -> Deferred[int]:
        """
        Return to ready the leases of processes on this host that no longer
        run: a worker that died while the others went on, or one of the
        processes before a restart that was still stopping when the new
        ones recovered.  SQLite's counterpart of PostgreSQL's heartbeats:
        without it their recipients would wait for their leases to expire.
        """
        host = self._owner.rpartition(":")[0]

        def reap(connection: sqlite3.Connection) -> int:
            owners = [
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT lease_owner FROM recipients WHERE state = ?", (LEASED,)
                )
            ]
            dead = [
                owner
                for owner in owners
                if isinstance(owner, str)
                and owner != self._owner
                and owner.rpartition(":")[0] == host
                and not self._liveSibling(owner)
            ]
            if not dead:
                return 0
            return returnLeases(connection, f"lease_owner IN ({marks(dead)})", dead)

        def reaped(count: int) -> int:
            if count:
                self.log.info("returned {count} recipients leased by processes that ended", count=count)
            return self._notifyIf(count)

        return self._transact(reap, durable=False).addCallback(reaped)

    def _liveSibling(self, owner: object) -> bool:
        """
        Whether C{owner} (a lease owner, C{host:pid}) names another process
        that runs on this host now.
        """
        if not isinstance(owner, str) or owner == self._owner:
            return False
        host, _, pid = owner.rpartition(":")
        if host != self._owner.rpartition(":")[0] or not pid.isdigit():
            return False
        return self._processAlive(int(pid))

    @staticmethod
    def _processAlive(pid: int) -> bool:
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        except OSError:
            return False
        return True

    def describe(self) -> str:
        return f"sqlite {self._path.absolute()}"

    def ownedPaths(self) -> Sequence[str]:
        """
        The database with its journal files and writer lock.
        """
        return [
            str(self._path.with_name(self._path.name + suffix))
            for suffix in ("", "-wal", "-shm", "-journal", ".writer-lock")
        ]

    def close(self) -> Deferred[None]:
        """
        Let pending operations commit, then close the connections and end
        the threads.
        """
        if self._closed:
            return fail(RuntimeError("the queue is already closed"))
        d: Deferred[None] = self._transact(lambda connection: None)
        self._closed = True
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()

        def closeWriter(_: None) -> Deferred[None]:
            done: Deferred[None] = Deferred()

            def writerJob() -> None:
                if self._writerConnection is not None:
                    self._writerConnection.close()
                    self._writerConnection = None
                if self._lockFile is not None:
                    os.close(self._lockFile)
                    self._lockFile = None

                def readerJob() -> None:
                    if self._readerConnection is not None:
                        self._readerConnection.close()
                        self._readerConnection = None
                    self._deliver(lambda: done.callback(None))

                self._reader.submit(readerJob)

            self._writer.submit(writerJob)
            return done

        def stopThreads(_: None) -> None:
            for executor in (self._writer, self._reader, self._spool):
                executor.stop()

        return d.addCallback(closeWriter).addCallback(stopThreads)


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> SQLiteQueue:
    """
    Build an L{SQLiteQueue} from C{[queue]} with C{plugin = "sqlite"}.

    Options: C{path} (relative to the data directory; default
    C{"queue.sqlite"}), C{lease_seconds} (default 7200) and
    C{spill_threshold} (octets kept in memory per message while receiving;
    default 262144).
    """
    section = Section(f"[{instanceName}]", options)
    path = context.path(section.text("path", "queue.sqlite"))
    leaseSeconds = section.number("lease_seconds", 7200.0, minimum=1)
    spillThreshold = section.integer("spill_threshold", 256 * 1024, minimum=0)
    section.finish()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return SQLiteQueue(path, context.reactor, leaseSeconds=leaseSeconds, spillThreshold=spillThreshold)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"[{instanceName}] cannot open {path}: {e}") from None
