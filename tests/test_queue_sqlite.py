"""
Tests for L{mailfw.queue._sqlite}: the queue contract (synchronously and
with the real threads), group commit, durability before the commit fires,
a full disk, large bodies and configuration.
"""

from __future__ import annotations

import queue
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.config import ComponentContext, ConfigError
from mailfw.envelope import RecipientOutcome
from mailfw.interfaces import ILeaseOffers, IMessageBody, IMessageQueue, IMessageQueueFactory, ISharedState
from mailfw.plugin import findPlugin
from mailfw.queue._contract import QueueContractTests, SharedStateContractTests, makeEnvelope
from mailfw.queue._engine import PURGE_BATCH, PURGE_SECONDS
from mailfw.queue._sqlite import SQLiteQueue, SynchronousExecutor, ThreadExecutor, fromConfig
from mailfw.queued import Disposition, Lease, LeaseLost, QueueFull, RecipientState, Selector
from mailfw.reply import SMTPReply

_T = TypeVar("_T")


class ManualExecutor:
    """
    An executor whose jobs run only when the test says so.
    """

    def __init__(self) -> None:
        self.jobs: list[Callable[[], None]] = []

    def submit(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)

    def stop(self) -> None:
        pass

    def run(self) -> None:
        while self.jobs:
            self.jobs.pop(0)()


@implementer(IReactorFromThreads)
class ThreadedClock(Clock):
    """
    A clock that also offers C{callFromThread}, like a reactor.
    """

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


def call(f: Callable[[], None]) -> None:
    f()


def synchronousQueue(path: Path, clock: Clock, **kw: Any) -> SQLiteQueue:
    options: dict[str, Any] = dict(
        writer=SynchronousExecutor(),
        reader=SynchronousExecutor(),
        spool=SynchronousExecutor(),
        deliver=call,
    )
    options.update(kw)
    return SQLiteQueue(path, clock, **options)


def freshCount(path: Path, table: str) -> int:
    """
    Count rows with a connection of its own, as another process would.
    """
    connection = sqlite3.connect(str(path))
    try:
        count: int = connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return count
    finally:
        connection.close()


class SQLiteSynchronousContractTests(QueueContractTests, SynchronousTestCase):
    """
    L{SQLiteQueue} keeps the queue contract, with every thread replaced by
    a synchronous call.  A small spill threshold sends the large-body test
    through the spool file and incremental BLOB I/O.
    """

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        self.path = Path(self.mktemp()) / "queue.sqlite"
        self.path.parent.mkdir()
        return synchronousQueue(self.path, clock, spillThreshold=4096)

    def assertDurable(self, queueID: str) -> None:
        connection = sqlite3.connect(str(self.path))
        try:
            rows = connection.execute(
                "SELECT COUNT(*) FROM recipients WHERE message_id = ?", (queueID,)
            ).fetchone()[0]
            bodies = connection.execute(
                "SELECT COUNT(*) FROM message_bodies WHERE message_id = ?", (queueID,)
            ).fetchone()[0]
        finally:
            connection.close()
        self.assertEqual((rows, bodies), (1, 1))


class SQLiteThreadedContractTests(SQLiteSynchronousContractTests):
    """
    L{SQLiteQueue} keeps the queue contract with its real writer, reader
    and spool threads; results are delivered to the test thread, which
    waits for them with a bounded timeout.
    """

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        self.path = Path(self.mktemp()) / "queue.sqlite"
        self.path.parent.mkdir()
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.executors = [ThreadExecutor(f"test-{n}") for n in ("writer", "reader", "spool")]
        q = SQLiteQueue(
            self.path,
            clock,
            writer=self.executors[0],
            reader=self.executors[1],
            spool=self.executors[2],
            deliver=self.calls.put,
            spillThreshold=4096,
        )
        self.addCleanup(self.stopThreads, q)
        return q

    def stopThreads(self, q: SQLiteQueue) -> None:
        if not q._closed:
            self.wait(q.close())
        for executor in self.executors:
            executor.stop()
            self.assertTrue(executor.join(10))

    def drive(self, d: Deferred[Any]) -> None:
        done: list[bool] = []

        def finished(result: object) -> object:
            done.append(True)
            return result

        d.addBoth(finished)
        deadline = time.monotonic() + 10
        while not done:
            try:
                f = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.fail("queue thread did not answer within 10 s")
            f()

    def wait(self, d: Deferred[_T]) -> _T:
        self.drive(d)
        return self.successResultOf(d)

    def waitFailure(self, d: Deferred[Any], *types: type[BaseException]) -> Failure:
        self.drive(d)
        failure: Failure = self.failureResultOf(d, *types)
        return failure

    def test_groupCommitWithThreads(self) -> None:
        """
        Commits requested while the writer is busy share one transaction.
        """
        started, release = queue.SimpleQueue[None](), queue.SimpleQueue[None]()

        def block() -> None:
            started.put(None)
            release.get(timeout=10)

        self.executors[0].submit(block)
        started.get(timeout=10)
        before = self.queue.transactions  # type: ignore[attr-defined]
        ds = []
        for _ in range(20):
            incoming = self.queue.receive(makeEnvelope("a@example.com"))
            incoming.write(b"x\r\n")
            ds.append(incoming.commit())
        release.put(None)
        for d in ds:
            self.wait(d)
        self.assertEqual(self.queue.transactions - before, 1)  # type: ignore[attr-defined]


class SQLiteSharedStateTests(SharedStateContractTests, SynchronousTestCase):
    """
    L{SQLiteQueue} keeps the shared-state contract; the state lives in the
    database, so every process on the machine shares it.
    """

    def makeState(self) -> ISharedState:
        self.path = Path(self.mktemp()) / "queue.sqlite"
        self.path.parent.mkdir()
        self.clock = Clock()
        return synchronousQueue(self.path, self.clock)

    def test_sharedBetweenQueues(self) -> None:
        """
        Two queue objects on one file (two worker processes) count the same
        counter and see the same marks.
        """
        other = synchronousQueue(self.path, self.clock)
        self.assertEqual(self.wait(self.state.count("k", 2, 60, 0)), 2)
        self.assertEqual(self.wait(other.count("k", 3, 60, 1)), 5)
        self.assertEqual(self.wait(other.mark("t", 60, 7)), 7)
        self.assertEqual(self.wait(self.state.mark("t", 60, 8)), 7)

    def test_writesOnTheWriterThread(self) -> None:
        """
        Counts, marks and forgets are writes: they wait for the writer (a
        thread in production, never the caller's), are committed without
        waiting for the disk, and share its group commit.  A read (count 0)
        goes to the reader.
        """
        writer, reader = ManualExecutor(), ManualExecutor()
        q = synchronousQueue(self.path, self.clock, writer=writer, reader=reader)
        counted = q.count("k", 1, 60, 0)
        marked = q.mark("t", 60, 0)
        forgotten = q.forget("x")
        read = q.count("k", 0, 60, 0)
        for d in (counted, marked, forgotten, read):
            self.assertNoResult(d)
        self.assertEqual((len(writer.jobs), len(reader.jobs)), (1, 1))
        writer.run()
        self.assertEqual((self.successResultOf(counted), self.successResultOf(marked)), (1, 0))
        self.assertEqual(q.transactions, 1)
        reader.run()
        self.assertEqual(self.successResultOf(read), 1)

    def test_expiredPurgedInBatches(self) -> None:
        """
        Expired rows are deleted by later writes, at most L{PURGE_BATCH} at a
        time; a write that found a full batch lets the next write purge
        again at once, one that did not waits L{PURGE_SECONDS}.
        """
        q = self.state
        assert isinstance(q, SQLiteQueue)
        connection = sqlite3.connect(str(self.path))
        connection.executemany(
            "INSERT INTO shared_state (name, value, started, expires) VALUES (?, 1, 0, 10)",
            [(f"old{n}",) for n in range(PURGE_BATCH + 5)],
        )
        connection.commit()
        connection.close()
        self.wait(q.count("new", 1, 1000, 100))
        self.assertEqual(freshCount(self.path, "shared_state"), 6)
        self.wait(q.count("new", 1, 1000, 101))
        self.assertEqual(freshCount(self.path, "shared_state"), 1)
        connection = sqlite3.connect(str(self.path))
        connection.execute("INSERT INTO shared_state (name, value, started, expires) VALUES ('x', 1, 0, 10)")
        connection.commit()
        connection.close()
        self.wait(q.mark("m", 1000, 102))
        self.assertEqual(freshCount(self.path, "shared_state"), 3)
        self.wait(q.mark("m", 1000, 102 + PURGE_SECONDS))
        self.assertEqual(freshCount(self.path, "shared_state"), 2)


class SQLiteQueueTests(SynchronousTestCase):
    """
    Behaviour specific to L{SQLiteQueue}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.path = Path(self.mktemp()) / "queue.sqlite"
        self.path.parent.mkdir()

    def enqueueStart(self, q: SQLiteQueue, body: bytes = b"x\r\n", *recipients: str) -> Deferred[str]:
        incoming = q.receive(makeEnvelope(*(recipients or ("a@example.com",))))
        incoming.write(body)
        return incoming.commit()

    def test_groupCommit(self) -> None:
        """
        Commits that arrive while the writer is busy are committed together
        in one transaction, and each fires only after it.
        """
        writer = ManualExecutor()
        q = synchronousQueue(self.path, self.clock, writer=writer)
        ds = [self.enqueueStart(q) for _ in range(5)]
        self.assertEqual(len(writer.jobs), 1)
        for d in ds:
            self.assertNoResult(d)
        writer.run()
        self.assertEqual(q.transactions, 1)
        self.assertEqual(len({self.successResultOf(d) for d in ds}), 5)
        self.assertEqual(freshCount(self.path, "messages"), 5)

    def test_notFiredBeforeCommit(self) -> None:
        """
        Just before C{COMMIT} the commit has not fired and another
        connection does not see the message; once it fires, it does.
        """
        seen: list[tuple[bool, int]] = []
        ds: list[Deferred[str]] = []

        def beforeCommit() -> None:
            seen.append((ds[0].called, freshCount(self.path, "recipients")))

        writer = ManualExecutor()
        q = synchronousQueue(self.path, self.clock, writer=writer, beforeCommit=beforeCommit)
        ds.append(self.enqueueStart(q))
        writer.run()
        self.assertEqual(seen, [(False, 0)])
        self.successResultOf(ds[0])
        self.assertEqual(freshCount(self.path, "recipients"), 1)

    def test_durabilityPerBatch(self) -> None:
        """
        A batch holding an enqueue (a promise to the client) commits with
        C{synchronous=FULL}; a batch of only the scheduler's claims and
        records commits with C{NORMAL} (atomic, but a power loss may roll
        it back: a redelivery, never a loss).
        """
        levels: list[int] = []
        queues: list[SQLiteQueue] = []

        def beforeCommit() -> None:
            connection = queues[0]._writerConnection
            assert connection is not None
            levels.append(connection.execute("PRAGMA synchronous").fetchone()[0])

        writer = ManualExecutor()
        q = synchronousQueue(self.path, self.clock, writer=writer, beforeCommit=beforeCommit)
        queues.append(q)
        self.enqueueStart(q)
        writer.run()
        claimed = q.claim(self.clock.seconds(), 10)
        writer.run()
        [lease] = self.successResultOf(claimed)
        outcome = RecipientOutcome(lease.recipients[0].recipient, SMTPReply(250, "2.0.0", "ok"))
        q.record(lease, [Disposition(lease.recipients[0].index, outcome)])
        writer.run()
        self.assertEqual(levels, [2, 1, 1])  # FULL, then NORMAL, NORMAL

    def test_firesOnReactorThread(self) -> None:
        """
        The commit fires only when the deliver seam runs the result on the
        reactor's side, after the rows are committed.
        """
        delivered: list[Callable[[], None]] = []
        q = synchronousQueue(self.path, self.clock, deliver=delivered.append)
        d = self.enqueueStart(q)
        self.assertNoResult(d)
        self.assertEqual(freshCount(self.path, "messages"), 1)
        [f] = delivered
        f()
        self.successResultOf(d)

    def test_failingOperationIsolated(self) -> None:
        """
        An operation that fails inside a batch is rolled back alone; the
        others in the same transaction commit, once each (the batch first
        ran without savepoints, was rolled back at the failure and ran
        again carefully).
        """
        q = synchronousQueue(self.path, self.clock)
        self.successResultOf(self.enqueueStart(q))
        [lease] = self.successResultOf(q.claim(self.clock.seconds(), 10))
        writer = ManualExecutor()
        q._writer = writer
        before = self.enqueueStart(q)
        bad = q.record(
            lease,
            [Disposition(7, RecipientOutcome(lease.envelope.recipients[0], SMTPReply(250, "2.0.0", "ok")))],
        )
        after = self.enqueueStart(q)
        writer.run()
        self.failureResultOf(bad, ValueError)
        self.assertNotEqual(self.successResultOf(before), self.successResultOf(after))
        self.assertEqual(q.transactions, 1 + 2)
        self.assertEqual(freshCount(self.path, "messages"), 3)
        self.assertEqual(freshCount(self.path, "recipients"), 3)

    def test_leaseLostWritesNothing(self) -> None:
        """
        A record refused with L{LeaseLost} leaves no notice behind.
        """
        q = synchronousQueue(self.path, self.clock)
        self.successResultOf(self.enqueueStart(q))
        [lease] = self.successResultOf(q.claim(self.clock.seconds(), 10))
        self.successResultOf(q.recover(float("inf")))
        from mailfw.queued import Notice

        self.failureResultOf(
            q.record(lease, [], [Notice(makeEnvelope("x@example.org", sender=None), b"n\r\n")]), LeaseLost
        )
        self.assertEqual(freshCount(self.path, "messages"), 1)

    def test_diskFull(self) -> None:
        """
        A full database fails the commit with L{QueueFull}, stores nothing of
        that message, and keeps working for messages that fit.
        """
        q = synchronousQueue(
            self.path,
            self.clock,
            configureConnection=lambda c: c.execute("PRAGMA max_page_count = 40"),
            spillThreshold=1 << 30,
        )
        self.failureResultOf(self.enqueueStart(q, b"x" * 400_000), QueueFull)
        self.assertEqual(freshCount(self.path, "messages"), 0)
        self.successResultOf(self.enqueueStart(q))
        self.assertEqual(freshCount(self.path, "messages"), 1)

    def test_diskFullInBatch(self) -> None:
        """
        When a full disk makes SQLite roll back a whole group commit, only
        the message that did not fit fails; the others in the batch are
        committed in a new transaction.
        """
        writer = ManualExecutor()
        q = synchronousQueue(
            self.path,
            self.clock,
            writer=writer,
            configureConnection=lambda c: c.execute("PRAGMA max_page_count = 40"),
            spillThreshold=1 << 30,
        )
        small = self.enqueueStart(q)
        big = self.enqueueStart(q, b"x" * 400_000)
        other = self.enqueueStart(q)
        writer.run()
        self.failureResultOf(big, QueueFull)
        self.successResultOf(small)
        self.successResultOf(other)
        self.assertEqual(freshCount(self.path, "messages"), 2)

    def test_diskFullTwiceInBatchDeferredDelivery(self) -> None:
        """
        Two messages that do not fit, in one group commit whose results
        reach the reactor only after the batch (as C{callFromThread} does):
        each gets its own L{QueueFull}, the others commit, and delivering
        the results raises nothing.  A result callable that looked up the
        failed operation when it ran, not when it was made, would fire the
        wrong one (regression: a late-bound lambda in the retry loop).
        """
        writer = ManualExecutor()
        delivered: list[Callable[[], None]] = []
        q = synchronousQueue(
            self.path,
            self.clock,
            writer=writer,
            deliver=delivered.append,
            configureConnection=lambda c: c.execute("PRAGMA max_page_count = 40"),
            spillThreshold=1 << 30,
        )
        small = self.enqueueStart(q)
        big1 = self.enqueueStart(q, b"x" * 400_000)
        big2 = self.enqueueStart(q, b"y" * 400_000)
        other = self.enqueueStart(q)
        writer.run()
        self.assertEqual(q.transactions, 1)
        self.assertEqual(len(delivered), 3, "one result call per aborted message and one for the commit")
        errors: list[str] = []
        for f in delivered:
            try:
                f()
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        self.assertEqual(errors, [], "delivering the batch's results raised on the reactor thread")
        self.failureResultOf(big1, QueueFull)
        self.failureResultOf(big2, QueueFull)
        self.successResultOf(small)
        self.successResultOf(other)
        self.assertEqual(freshCount(self.path, "messages"), 2)

    def test_spoolFull(self) -> None:
        """
        A spool file that cannot be written (no space) fails the commit with
        L{QueueFull}.
        """
        q = synchronousQueue(self.path, self.clock, spillThreshold=10)
        incoming = q.receive(makeEnvelope("a@example.com"))

        class Full:
            def write(self, data: bytes) -> int:
                raise OSError(28, "No space left on device")

            def close(self) -> None:
                pass

        incoming._file = Full()  # type: ignore[attr-defined]
        incoming.write(b"y" * 100)
        self.failureResultOf(incoming.commit(), QueueFull)
        self.assertEqual(freshCount(self.path, "messages"), 0)

    def test_spillOffTheCallerThread(self) -> None:
        """
        A body above the spill threshold is written by the spool executor,
        not by L{IIncomingMessage.write}, and is stored whole.
        """
        spool = ManualExecutor()
        q = synchronousQueue(self.path, self.clock, spool=spool, spillThreshold=1000)
        incoming = q.receive(makeEnvelope("a@example.com"))
        incoming.write(b"a" * 600)
        self.assertEqual(spool.jobs, [])
        incoming.write(b"b" * 600)
        self.assertEqual(len(spool.jobs), 1)
        for _ in range(10):
            incoming.write(b"c" * 65536)
        d = incoming.commit()
        self.assertNoResult(d)
        spool.run()
        queueID = self.successResultOf(d)
        body = self.successResultOf(q.openBody(queueID))
        self.assertTrue(verifyObject(IMessageBody, body))
        with body.open() as f:
            data = f.read()
        self.assertEqual(data, b"a" * 600 + b"b" * 600 + b"c" * 655360)

    def test_abortSpilled(self) -> None:
        """
        Aborting a spilled message closes its spool file and stores nothing.
        """
        q = synchronousQueue(self.path, self.clock, spillThreshold=10)
        incoming = q.receive(makeEnvelope("a@example.com"))
        incoming.write(b"z" * 100)
        spooled = incoming._file  # type: ignore[attr-defined]
        self.assertIsNotNone(spooled)
        incoming.abort()
        self.assertTrue(spooled.closed)
        self.assertEqual(freshCount(self.path, "messages"), 0)

    def test_blobBodySeekAndSnapshot(self) -> None:
        """
        A large body's reader can seek, and keeps reading its snapshot even
        when the message is deleted meanwhile.
        """
        q = synchronousQueue(self.path, self.clock, spillThreshold=100)
        queueID = self.successResultOf(self.enqueueStart(q, bytes(range(256)) * 40))
        body = self.successResultOf(q.openBody(queueID))
        f = body.open()
        try:
            f.seek(256 * 39)
            self.assertEqual(f.read(3), b"\x00\x01\x02")
            self.assertEqual(self.successResultOf(q.delete(Selector(queueIDs=(queueID,)))), 1)
            f.seek(0)
            self.assertEqual(len(f.read()), 256 * 40)
        finally:
            f.close()
        self.assertRaises(KeyError, body.open)

    def test_reopen(self) -> None:
        """
        Committed messages and their leases survive closing and reopening
        (a restart); recovery at start-up returns the old leases.
        """
        q = synchronousQueue(self.path, self.clock)
        queueID = self.successResultOf(self.enqueueStart(q, b"x\r\n", "a@example.com", "b@example.com"))
        self.successResultOf(q.claim(self.clock.seconds(), 1))
        self.successResultOf(q.close())
        self.failureResultOf(q.claim(0, 1), RuntimeError)
        again = synchronousQueue(self.path, self.clock)
        self.assertEqual(self.successResultOf(again.recover(float("inf"))), 1)
        [lease] = self.successResultOf(again.claim(self.clock.seconds(), 10))
        self.assertEqual((lease.queueID, len(lease.recipients)), (queueID, 2))

    def test_columnsAddedToOlderDatabase(self) -> None:
        """
        A queue made before ETRN and C{mailfw queue bounce} (same schema
        version, without the C{released} and C{bounce} columns) gets them
        on open, and its messages can then be bounced.
        """
        q = synchronousQueue(self.path, self.clock)
        queueID = self.successResultOf(self.enqueueStart(q))
        self.successResultOf(q.close())
        connection = sqlite3.connect(str(self.path))
        connection.execute("ALTER TABLE recipients DROP COLUMN bounce")
        connection.execute("ALTER TABLE recipients DROP COLUMN released")
        connection.commit()
        connection.close()
        again = synchronousQueue(self.path, self.clock)
        self.assertEqual(self.successResultOf(again.bounce(Selector(queueIDs=(queueID,)))), 1)
        [lease] = self.successResultOf(again.claim(self.clock.seconds(), 10))
        self.assertEqual([(r.bounceRequested, r.released) for r in lease.recipients], [(True, False)])

    def test_sharedStateAddedToVersion1(self) -> None:
        """
        A version 1 database (before shared state) gets the C{shared_state}
        table and version 2 on open, keeping its messages.
        """
        q = synchronousQueue(self.path, self.clock)
        queueID = self.successResultOf(self.enqueueStart(q))
        self.successResultOf(q.close())
        connection = sqlite3.connect(str(self.path))
        connection.execute("DROP TABLE shared_state")
        connection.execute("UPDATE mailfw_schema SET version = 1")
        connection.commit()
        connection.close()
        again = synchronousQueue(self.path, self.clock)
        self.assertEqual(self.successResultOf(again.count("k", 1, 60, 0)), 1)
        self.assertEqual(len(self.successResultOf(again.list(Selector(queueIDs=(queueID,))))), 1)
        connection = sqlite3.connect(str(self.path))
        try:
            self.assertEqual(connection.execute("SELECT version FROM mailfw_schema").fetchall(), [(2,)])
        finally:
            connection.close()

    def test_oldSQLiteRefused(self) -> None:
        """
        An SQLite library older than 3.35 (no C{RETURNING}) is refused with
        a message that says so, and configuration turns it into a
        L{ConfigError}.
        """
        self.patch(sqlite3, "sqlite_version_info", (3, 34, 1))
        self.patch(sqlite3, "sqlite_version", "3.34.1")
        error = self.assertRaises(sqlite3.NotSupportedError, synchronousQueue, self.path, self.clock)
        self.assertIn("3.35", str(error))
        self.assertFalse(self.path.exists())

    def test_walAndFullSync(self) -> None:
        """
        The database is in WAL mode, and queue connections fsync fully.
        """
        q = synchronousQueue(self.path, self.clock)
        self.successResultOf(self.enqueueStart(q))
        connection = sqlite3.connect(str(self.path))
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        connection.close()
        assert q._writerConnection is not None
        self.assertEqual(q._writerConnection.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_newerSchemaRefused(self) -> None:
        """
        A database made by a newer schema version is refused at open.
        """
        synchronousQueue(self.path, self.clock)
        connection = sqlite3.connect(str(self.path))
        connection.execute("UPDATE mailfw_schema SET version = 99")
        connection.commit()
        connection.close()
        self.assertRaises(sqlite3.DatabaseError, synchronousQueue, self.path, self.clock)

    def test_queueIDsDistinct(self) -> None:
        """
        Default queue IDs are unique and sort by time.
        """
        q = synchronousQueue(self.path, self.clock)
        ids = [q.receive(makeEnvelope("a@example.com")).queueID for _ in range(1000)]
        self.assertEqual(len(set(ids)), 1000)
        self.assertEqual(len(ids[0]), 20)

    def test_requiresDeliver(self) -> None:
        """
        Without C{deliver}, the clock must be a reactor with
        C{callFromThread}.
        """
        self.assertRaises(TypeError, SQLiteQueue, self.path, self.clock)


class SQLiteOfferTests(SynchronousTestCase):
    """
    L{ILeaseOffers}: new messages stored leased to this process's scheduler.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        path = Path(self.mktemp()) / "queue.sqlite"
        path.parent.mkdir()
        self.queue = synchronousQueue(path, self.clock, owner="host:1")
        self.room = 10
        self.taken: list[Lease] = []
        self.notified: list[None] = []
        self.queue.offerNew(lambda: self.room, self.taken.append)
        self.queue.notifyDue(lambda: self.notified.append(None))

    def enqueue(self, *recipients: str) -> str:
        incoming = self.queue.receive(makeEnvelope(*recipients))
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        return self.successResultOf(incoming.commit())

    def test_provides(self) -> None:
        """
        The SQLite queue offers new messages.
        """
        verifyObject(ILeaseOffers, self.queue)

    def test_storedLeased(self) -> None:
        """
        With room, a new message is stored leased to this process and its
        lease handed over after the commit, without a notification; nobody
        else can claim it, and recording with the lease removes it.
        """
        queueID = self.enqueue("a@example.com", "b@example.com")
        [lease] = self.taken
        self.assertEqual(lease.queueID, queueID)
        self.assertEqual([r.index for r in lease.recipients], [0, 1])
        self.assertEqual({r.state for r in lease.recipients}, {RecipientState.LEASED})
        self.assertEqual(lease.expires, self.clock.seconds() + self.queue.leaseSeconds)
        self.assertEqual(self.notified, [])
        self.assertEqual(self.successResultOf(self.queue.claim(self.clock.seconds() + 60, 10)), [])
        ok = SMTPReply(250, "2.0.0", "ok")
        self.successResultOf(
            self.queue.record(
                lease, [Disposition(r.index, RecipientOutcome(r.recipient, ok)) for r in lease.recipients]
            )
        )
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])

    def test_noRoom(self) -> None:
        """
        A message with more recipients than the scheduler has room for is
        stored ready, with a notification, and claimed as usual.
        """
        self.room = 1
        self.enqueue("a@example.com", "b@example.com")
        self.assertEqual(self.taken, [])
        self.assertEqual(self.notified, [None])
        [lease] = self.successResultOf(self.queue.claim(self.clock.seconds(), 10))
        self.assertEqual(len(lease.recipients), 2)

    def test_recovered(self) -> None:
        """
        A handed-over lease nobody acts on is recovered like any other.
        """
        self.enqueue("a@example.com")
        self.assertEqual(self.successResultOf(self.queue.recover(float("inf"))), 1)
        [lease] = self.successResultOf(self.queue.claim(self.clock.seconds(), 10))
        self.assertNotEqual(lease.token, self.taken[0].token)

    def test_handedAfterTheCommitIsAnswered(self) -> None:
        """
        The lease is handed over on a later turn of the reactor (through
        C{deliver}), after everything waiting on the commit ran: the
        session's 250 goes out before the scheduler starts delivering.
        """
        calls: list[Callable[[], None]] = []
        path = Path(self.mktemp()) / "queue.sqlite"
        path.parent.mkdir()
        queue = synchronousQueue(path, self.clock, owner="host:1", deliver=calls.append)
        order: list[str] = []
        queue.offerNew(lambda: 10, lambda lease: order.append("handed"))
        incoming = queue.receive(makeEnvelope("a@example.com"))
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        incoming.commit().addCallback(lambda queueID: order.append("250"))
        while calls:
            calls.pop(0)()
        self.assertEqual(order, ["250", "handed"])

    def test_takeFails(self) -> None:
        """
        A scheduler that raises when handed a lease does not fail the
        commit (the client still gets its 250); the error is logged.
        """

        def broken(lease: Lease) -> None:
            raise RuntimeError("scheduler bug")

        self.queue.offerNew(lambda: 10, broken)
        self.enqueue("a@example.com")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SQLiteFromConfigTests(SynchronousTestCase):
    """
    L{fromConfig} builds an L{SQLiteQueue} from C{[queue]}.
    """

    def context(self, dataDir: Path) -> ComponentContext:
        return ComponentContext(reactor=ThreadedClock(), hostname="mx.example", dataDir=dataDir)

    def test_plugin(self) -> None:
        """
        The bundled C{sqlite} plugin opens C{queue.sqlite} in the data
        directory by default, creating the directory.
        """
        dataDir = Path(self.mktemp()) / "data"
        plugin = findPlugin(IMessageQueueFactory, "sqlite")
        q = plugin.fromConfig(self.context(dataDir), "queue", {"plugin": "sqlite", "lease_seconds": 60})
        self.assertIsInstance(q, SQLiteQueue)
        self.assertTrue((dataDir / "queue.sqlite").exists())
        self.assertEqual(q.leaseSeconds, 60)

    def test_path(self) -> None:
        """
        C{path} is relative to the data directory.
        """
        dataDir = Path(self.mktemp())
        dataDir.mkdir()
        fromConfig(
            self.context(dataDir), "queue", {"plugin": "sqlite", "path": "q/x.db", "spill_threshold": 10}
        )
        self.assertTrue((dataDir / "q" / "x.db").exists())

    def test_bad(self) -> None:
        """
        Unknown options and unusable paths are configuration errors.
        """
        dataDir = Path(self.mktemp())
        dataDir.mkdir()
        self.assertRaises(
            ConfigError, fromConfig, self.context(dataDir), "queue", {"plugin": "sqlite", "paht": "x"}
        )
        (dataDir / "dir").mkdir()
        self.assertRaises(
            ConfigError, fromConfig, self.context(dataDir), "queue", {"plugin": "sqlite", "path": "dir"}
        )
