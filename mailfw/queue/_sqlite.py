"""
The embedded default queue: one SQLite database in WAL mode, under the
transitions of L{mailfw.queue._engine} (see docs/architecture.rst).

The reactor thread never touches the database file.  Three dedicated
threads (L{Executor}s; tests pass L{SynchronousExecutor}s) do:

  - the B{writer} owns the only writing connection and commits every
    pending operation in one transaction with one fsync: that group commit
    lets a hundred sessions share one fsync.  A result reaches the reactor
    only after its commit; only then may the server answer 250.  Worker
    processes share the file and take turns on a blocking C{flock}.
  - the B{reader} runs C{list}, C{nextDue} and C{openBody}, so that an
    operator listing a big queue never delays commits.
  - the B{spool} spills bodies larger than C{spillThreshold} to an unlinked
    file as they arrive; the writer copies that file into the body's BLOB
    (C{zeroblob}, then incremental BLOB I/O) in the rows' transaction.  No
    file is created, renamed or fsynced per message on the hot path.

A large body is read with incremental BLOB I/O on a connection and read
transaction of its own (a stable snapshot even if the message is deleted
meanwhile); a long read holds back WAL checkpoints while it lasts, the
price of never copying a big body out.

On one host every lease belongs to a process of this host, so
L{SQLiteQueue.recover} (the scheduler's start-up, with an infinite time)
returns them all to ready except the unexpired ones of a live sibling
worker process, and once a minute the leases of this host's processes
that have ended are returned too.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import itertools
import os
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, Generic, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.interfaces import IDescribed, ILeaseOffers, IMessageBody, IMessageQueue, ISharedState
from mailfw.queue._engine import (
    LEASED,
    Database,
    RecentMessages,
    SQLQueue,
    createSchema,
    marks,
    returnLeases,
    storeOptions,
)
from mailfw.queue._io import (
    CHUNK,
    Executor,
    ExecutorRunner,
    PieceReader,
    SynchronousExecutor,
    ThreadedBody,
    ThreadExecutor,
    copySpooled,
)
from mailfw.queue._produce import ThreadRunner
from mailfw.queue._schema import createStatements, newQueueID

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
        statements = createStatements("BLOB")
        connection.execute(statements[0])  # mailfw_schema, to read the version
        stored = connection.execute("SELECT MAX(version) FROM mailfw_schema").fetchone()[0]
        createSchema(connection, stored, statements, sqlite3.DatabaseError)
        columns = {row[1] for row in connection.execute("PRAGMA table_info(recipients)")}
        if "released" not in columns:
            # A queue made before ETRN (same schema version: never released).
            connection.execute("ALTER TABLE recipients ADD COLUMN released INTEGER NOT NULL DEFAULT 0")
        if "bounce" not in columns:
            # A queue made before C{mailfw queue bounce} (nothing requested).
            connection.execute("ALTER TABLE recipients ADD COLUMN bounce INTEGER NOT NULL DEFAULT 0")
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

    def fire(self) -> None:
        if self.ok:
            self.deferred.callback(self.result)
        else:
            self.deferred.errback(Failure(self.result))


# --- bodies ----------------------------------------------------------------------


class _BlobReader(PieceReader):
    """
    Reads one body through incremental BLOB I/O, holding its own
    connection and read transaction (a stable snapshot) until closed.
    """

    def __init__(self, connection: sqlite3.Connection, blob: sqlite3.Blob, size: int) -> None:
        super().__init__(size)
        self._connection = connection
        self._blob = blob

    def _readAt(self, offset: int, length: int) -> bytes:
        self._blob.seek(offset)
        return self._blob.read(length)

    def close(self) -> None:
        if not self.closed:
            try:
                self._blob.close()
                self._connection.execute("ROLLBACK")
            finally:
                self._connection.close()
        super().close()


class _BlobBody(ThreadedBody):
    """
    A stored body too large to read at once; each L{open} reads it from the
    database in pieces (in the queue's reader thread when produced).
    """

    def __init__(self, path: Path, queueID: str, size: int, reader: ThreadRunner) -> None:
        super().__init__(size, reader)
        self._path = path
        self._queueID = queueID

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


# --- the queue -------------------------------------------------------------------


@implementer(IMessageQueue, ILeaseOffers, IDescribed, ISharedState)
class SQLiteQueue(SQLQueue):
    """
    An L{IMessageQueue} in one SQLite database file; see the module
    docstring for the threads and the crash safety.

    @ivar transactions: how many write transactions committed (group commit
        makes this smaller than the number of operations).
    """

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
        configureConnection: Callable[[sqlite3.Connection], None] | None = None,
        beforeCommit: Callable[[], None] | None = None,
        reapSeconds: float = 60.0,
    ) -> None:
        """
        Open the queue, creating the database if needed (synchronously:
        build queues at start-up).

        The other parameters are L{SQLQueue._startEngine}'s.

        @param clock: the time source; also the reactor whose
            C{callFromThread} delivers results, unless C{deliver} is given.
        @param writer: runs write transactions (default: a dedicated
            thread); likewise C{reader} for reads.
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
        self._startEngine(
            clock,
            deliver,
            ids=idGenerator,
            leaseSeconds=leaseSeconds,
            owner=owner,
            spillThreshold=spillThreshold,
            spoolDirectory=self._path.parent,
            spool=spool,
        )
        self._writer: Executor = writer or ThreadExecutor("mailfw-queue-writer")
        self._reader: Executor = reader or ThreadExecutor("mailfw-queue-reader")
        self._inReader = ExecutorRunner(self._reader, self._deliver)
        self._configure = configureConnection
        self._beforeCommit = beforeCommit
        self._lock = threading.Lock()
        self._pending: list[_Operation[Any]] = []
        self._batchScheduled = False
        self._writerConnection: sqlite3.Connection | None = None
        self._durable = True  # the writer connection's synchronous level
        self._lockFile: int | None = None
        self._readerConnection: sqlite3.Connection | None = None
        self.reapSeconds = reapSeconds
        self._tokens = itertools.count(1)
        self._tokenPrefix = os.urandom(8).hex()
        self._recent = RecentMessages()
        self.transactions = 0
        initialiseDatabase(self._path)

    def _transact(
        self,
        function: Callable[[sqlite3.Connection], _T],
        durable: bool = True,
    ) -> Deferred[_T]:
        """
        Queue C{function} for the writer's next batch (L{_transaction}).

        @param durable: commit with C{synchronous=FULL} before the result is
            given.  A batch of only C{False} ones (the scheduler's claims and
            records) commits with C{NORMAL}: a power loss may roll back the
            last of them, so a recipient is delivered again, never lost; the
            next durable batch's fsync covers them (docs/architecture.rst).
        """
        if self._closed:
            return fail(RuntimeError("the queue is closed"))
        operation = _Operation(function, durable)
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
            self._transaction(operations)

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
                        operation.result = self._translate(e)
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
        error = self._translate(error)
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

        def read() -> _T:
            if self._readerConnection is None:
                self._readerConnection = connect(self._path)
            self._readerConnection.execute("BEGIN")
            try:
                return function(self._readerConnection)
            finally:
                self._readerConnection.execute("ROLLBACK")

        return self._inReader(read)

    @staticmethod
    def _isFull(error: BaseException) -> bool:
        code = getattr(error, "sqlite_errorcode", None) or 0
        return isinstance(error, sqlite3.Error) and (
            code & 0xFF == sqlite3.SQLITE_FULL or "database or disk is full" in str(error)
        )

    def _copyBody(self, db: Database, queueID: str, head: bytes, spooled: IO[bytes], size: int) -> None:
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
            copySpooled(queueID, head, spooled, size, blob.write)

    def _largeBody(self, db: Database, queueID: str, size: int) -> IMessageBody:
        return _BlobBody(self._path, queueID, size, self._inReader)

    def _newToken(self) -> str:
        # Unique: a random prefix per queue object, a counter within it.
        return f"{self._tokenPrefix}.{next(self._tokens)}"

    def _sparedOwners(self, db: Database, now: float, clockNow: float) -> tuple[str, Sequence[Any]]:
        """
        The live sibling processes on this host (C{twistd mailfw --workers
        N} share the database); a lease of this process's own ID, of a
        process that no longer runs, or of another host is recovered.
        """
        owners = db.execute(
            "SELECT DISTINCT lease_owner FROM recipients"
            " WHERE state = ? AND lease_expires <= ? AND lease_expires > ?",
            (LEASED, now, clockNow),
        )
        spared = [owner for (owner,) in owners if self._liveSibling(owner)]
        return f"lease_owner IN ({marks(spared)})", spared

    def recover(self, now: float) -> Deferred[int]:
        if self._reaper is None and not self._closed:
            # From the first recovery (the scheduler's start) on.
            self._startReaping(self._reapDeadSiblings, self.reapSeconds, now=False)
        return super().recover(now)

    def _reapDeadSiblings(self) -> Deferred[int]:
        """
        Return to ready the leases of processes on this host that no longer
        run: a worker that died while the others went on, or one of the
        processes before a restart that was still stopping when the new
        ones recovered.  SQLite's counterpart of PostgreSQL's heartbeats:
        without it their recipients would wait for their leases to expire.
        """

        def reap(connection: sqlite3.Connection) -> int:
            owners = connection.execute(
                "SELECT DISTINCT lease_owner FROM recipients WHERE state = ?", (LEASED,)
            )
            dead = [owner for (owner,) in owners if self._sibling(owner) and not self._liveSibling(owner)]
            if not dead:
                return 0
            return returnLeases(connection, f"lease_owner IN ({marks(dead)})", dead)

        def reaped(count: int) -> int:
            if count:
                self.log.info("returned {count} recipients leased by processes that ended", count=count)
            return self._notifyIf(count)

        return self._transact(reap, durable=False).addCallback(reaped)

    def _sibling(self, owner: object) -> bool:
        """
        Whether C{owner} (a lease owner, C{host:pid}) names another process
        on this host.
        """
        return (
            isinstance(owner, str)
            and owner != self._owner
            and owner.rpartition(":")[0] == self._owner.rpartition(":")[0]
        )

    def _liveSibling(self, owner: object) -> bool:
        """
        Whether C{owner} names another process that runs on this host now.
        """
        pid = owner.rpartition(":")[2] if isinstance(owner, str) else ""
        return self._sibling(owner) and pid.isdigit() and self._processAlive(int(pid))

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

    def _shutdown(self) -> Deferred[None]:
        """
        Let pending operations commit, then close the connections and end
        the threads.
        """
        d: Deferred[None] = self._transact(lambda connection: None)
        self._closed = True

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
    C{"queue.sqlite"}) and L{storeOptions}.
    """
    section = Section(f"[{instanceName}]", options)
    path = context.path(section.text("path", "queue.sqlite"))
    common = storeOptions(section)
    section.finish()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return SQLiteQueue(path, context.reactor, **common)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"[{instanceName}] cannot open {path}: {e}") from None
