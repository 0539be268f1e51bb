"""
Tests for L{mailfw.queue._postgres} against a real, throw-away PostgreSQL
(see L{tests._postgres}): the queue contract, and what several nodes
sharing one database need: exclusive claims, fencing, heartbeats, NOTIFY,
idempotent commits, large bodies and cluster-wide destination limits.

Each test gets a fresh database.  The queue's pool threads hand results to
a fake reactor whose C{callFromThread} queues them; the test thread runs
them while it waits, with a bounded timeout, so nothing spins a real
reactor.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
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
from mailfw.interfaces import IDescribed, ILeaseOffers, IMessageQueue, IMessageQueueFactory, ISharedState
from mailfw.queue._contract import QueueContractTests, SharedStateContractTests, makeEnvelope
from mailfw.queued import Disposition, Lease, LeaseLost, Selector
from mailfw.reply import SMTPReply
from tests._postgres import requirePostgres

_T = TypeVar("_T")

OK = SMTPReply(250, "2.0.0", "ok")
LATER = SMTPReply(451, "4.4.1", "try later")
TIMEOUT = 20.0


class PostgresHelpers:
    """
    A fresh database per test and queues on it, with bounded waits.
    """

    dsn: str
    calls: queue.SimpleQueue[Callable[[], None]]
    case: SynchronousTestCase

    def startDatabase(self, case: SynchronousTestCase) -> None:
        from mailfw.queue._postgres import initialiseDatabase

        self.case = case
        cluster = requirePostgres()
        self.dsn = cluster.createDatabase()
        case.addCleanup(cluster.dropDatabase, self.dsn)
        initialiseDatabase(self.dsn)
        self.calls = queue.SimpleQueue()

    def newQueue(self, clock: Clock, **kw: Any) -> Any:
        from mailfw.queue._postgres import PostgresQueue
        from mailfw.queue._sqlite import ThreadExecutor

        spool = ThreadExecutor("test-spool")
        options: dict[str, Any] = dict(clock=clock, spool=spool, spillThreshold=4096, poolSize=3)
        options.update(kw)
        q = PostgresQueue(self.dsn, ThreadedClockFront(clock, self.calls), **options)

        def stop() -> None:
            if not q._closed:
                self.wait(q.close())
            spool.stop()
            self.case.assertTrue(spool.join(10))

        self.case.addCleanup(stop)
        return q

    def drive(self, d: Deferred[Any]) -> None:
        done: list[bool] = []

        def finished(result: object) -> object:
            done.append(True)
            return result

        d.addBoth(finished)
        self.waitUntil(lambda: bool(done), "the queue's answer")

    def waitUntil(self, predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            try:
                f = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.case.fail(f"timed out after {TIMEOUT} s waiting for {what}")
            f()

    def wait(self, d: Deferred[_T]) -> _T:
        self.drive(d)
        return self.case.successResultOf(d)

    def waitFailure(self, d: Deferred[Any], *types: type[BaseException]) -> Failure:
        self.drive(d)
        failure: Failure = self.case.failureResultOf(d, *types)
        return failure

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        """
        Run one statement on a connection of its own, as another process
        would, and return its rows.
        """
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:
            cursor = connection.execute(statement, params)
            return list(cursor.fetchall()) if cursor.description else []


@implementer(IReactorFromThreads)
class ThreadedClockFront:
    """
    The reactor a queue sees: C{callFromThread} queues calls for the test
    thread, time comes from a shared L{Clock} (so that two queues, two
    nodes, share one time).
    """

    def __init__(self, clock: Clock, calls: queue.SimpleQueue[Callable[[], None]]) -> None:
        self._clock = clock
        self._calls = calls

    def seconds(self) -> float:
        return self._clock.seconds()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self._clock.callLater(delay, f, *args, **kw)

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self._calls.put(lambda: callable(*args, **kwargs))

    def callWhenRunning(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def addSystemEventTrigger(self, *args: Any, **kwargs: Any) -> object:
        return object()

    def removeSystemEventTrigger(self, triggerID: object) -> None:
        pass


class PostgresContractTests(QueueContractTests, SynchronousTestCase):
    """
    L{PostgresQueue} keeps the queue contract on a real PostgreSQL, with
    its real pool threads, spool thread, heartbeat and listener.  A small
    spill threshold sends the large-body test through the spool file, binary
    COPY and sliced reads.
    """

    helpers: PostgresHelpers

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        self.helpers = PostgresHelpers()
        self.helpers.startDatabase(self)
        q: IMessageQueue = self.helpers.newQueue(clock)
        return q

    def wait(self, d: Deferred[_T]) -> _T:
        return self.helpers.wait(d)

    def waitFailure(self, d: Deferred[Any], *types: type[BaseException]) -> Failure:
        return self.helpers.waitFailure(d, *types)

    def assertDurable(self, queueID: str) -> None:
        [(rows, bodies)] = self.helpers.sql(
            "SELECT (SELECT COUNT(*) FROM recipients WHERE message_id = %s),"
            " (SELECT COUNT(*) FROM message_bodies WHERE message_id = %s)",
            queueID,
            queueID,
        )
        self.assertEqual((rows, bodies), (1, 1))


class PostgresSharedStateTests(SharedStateContractTests, SynchronousTestCase):
    """
    L{PostgresQueue} keeps the shared-state contract on a real PostgreSQL,
    so every node of a cluster shares the counters and marks.
    """

    def makeState(self) -> ISharedState:
        self.helpers = PostgresHelpers()
        self.helpers.startDatabase(self)
        self.clock = Clock()
        state: ISharedState = self.helpers.newQueue(self.clock, node="a")
        return state

    def wait(self, d: Deferred[_T]) -> _T:
        return self.helpers.wait(d)

    def test_sharedBetweenNodes(self) -> None:
        """
        Two nodes count the same counter and see the same marks, and an
        expired row is purged by a later write.
        """
        other = self.helpers.newQueue(self.clock, node="b")
        self.assertEqual(self.wait(self.state.count("k", 2, 60, 0)), 2)
        self.assertEqual(self.wait(other.count("k", 3, 60, 1)), 5)
        self.assertEqual(self.wait(other.mark("t", 60, 7)), 7)
        self.assertEqual(self.wait(self.state.mark("t", 60, 8)), 7)
        self.helpers.sql("INSERT INTO shared_state (name, value, started, expires) VALUES ('old', 1, 0, 10)")
        self.wait(self.state.count("k", 1, 60, 1000))
        self.assertEqual(self.helpers.sql("SELECT name FROM shared_state ORDER BY name"), [("k",)])


class PostgresNodeTests(SynchronousTestCase):
    """
    Two L{PostgresQueue}s on one database behave like two nodes sharing a
    queue.
    """

    def setUp(self) -> None:
        self.helpers = PostgresHelpers()
        self.helpers.startDatabase(self)
        self.clock = Clock()
        self.clock.advance(1000)
        self.wait = self.helpers.wait
        self.waitFailure = self.helpers.waitFailure

    def node(self, name: str, **kw: Any) -> Any:
        return self.helpers.newQueue(self.clock, node=name, **kw)

    def enqueue(self, q: Any, *recipients: str, body: bytes = b"Subject: x\r\n\r\nx\r\n") -> str:
        incoming = q.receive(makeEnvelope(*recipients))
        incoming.write(body)
        queueID: str = self.wait(incoming.commit())
        return queueID

    def test_claimExclusiveAcrossNodes(self) -> None:
        """
        Two nodes claiming the same due recipients at once each get a
        disjoint share and together get every recipient exactly once.
        """
        a, b = self.node("a"), self.node("b")
        for i in range(20):
            self.enqueue(a, f"r{i}@example.com", f"s{i}@example.com")
        claims = [a.claim(self.clock.seconds(), 25), b.claim(self.clock.seconds(), 25)]
        claims += [a.claim(self.clock.seconds(), 25), b.claim(self.clock.seconds(), 25)]
        seen: list[tuple[str, int]] = []
        for d in claims:
            for lease in self.wait(d):
                seen.extend((lease.queueID, r.index) for r in lease.recipients)
        self.assertEqual(len(seen), 40)
        self.assertEqual(len(set(seen)), 40)
        owners = self.helpers.sql(
            "SELECT lease_owner, COUNT(*) FROM recipients GROUP BY lease_owner ORDER BY 1"
        )
        self.assertEqual(sum(n for _, n in owners), 40)
        self.assertTrue({o for o, _ in owners} <= {"a", "b"})

    def test_offeredNewMail(self) -> None:
        """
        With L{ILeaseOffers}, a new message is stored leased to the node
        that received it and its lease handed to that node's taker after
        the commit; other nodes cannot claim it, and the lease records.
        """
        a, b = self.node("a"), self.node("b")
        verifyObject(ILeaseOffers, a)
        taken: list[Lease] = []
        notified: list[None] = []
        a.offerNew(lambda: 10, taken.append)
        a.notifyDue(lambda: notified.append(None))
        queueID = self.enqueue(a, "x@example.com", "y@example.com")
        # Handed over on a later turn, after the commit's callbacks.
        self.helpers.waitUntil(lambda: bool(taken), "the lease to be handed over")
        [lease] = taken
        self.assertEqual((lease.queueID, [r.index for r in lease.recipients]), (queueID, [0, 1]))
        self.assertEqual(notified, [])
        self.assertEqual(
            self.helpers.sql("SELECT DISTINCT state, lease_owner, lease_token FROM recipients"),
            [("leased", "a", lease.token)],
        )
        self.assertEqual(self.wait(b.claim(self.clock.seconds(), 10)), [])
        dispositions = [Disposition(r.index, RecipientOutcome(r.recipient, OK)) for r in lease.recipients]
        self.wait(a.record(lease, dispositions))
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_offeredNoRoom(self) -> None:
        """
        Without room for all its recipients a new message is stored ready,
        with a notification, for any node to claim.
        """
        a, b = self.node("a"), self.node("b")
        taken: list[Lease] = []
        notified: list[None] = []
        a.offerNew(lambda: 1, taken.append)
        a.notifyDue(lambda: notified.append(None))
        self.enqueue(a, "x@example.com", "y@example.com")
        self.assertEqual((taken, notified), ([], [None]))
        [lease] = self.wait(b.claim(self.clock.seconds(), 10))
        self.assertEqual(len(lease.recipients), 2)

    def test_concurrentRecordsOfOneMessage(self) -> None:
        """
        When two nodes record the last two recipients of one message at the
        same time (each leased one), the message and its body are deleted:
        records of one message take turns, so the second sees the first's
        delete rather than both seeing the other's recipient still there.
        """
        a, b = self.node("a"), self.node("b")
        self.enqueue(a, "x@example.com", "y@example.com")
        [first] = self.wait(a.claim(self.clock.seconds(), 1))
        [second] = self.wait(b.claim(self.clock.seconds(), 1))
        self.assertNotEqual(first.recipients[0].index, second.recipients[0].index)
        inside, go = threading.Event(), threading.Event()
        real = a._transact

        def transact(function: Callable[[Any], Any], durable: bool = True) -> Deferred[Any]:
            def held(cursor: Any) -> Any:
                result = function(cursor)
                inside.set()  # done, not yet committed
                go.wait(TIMEOUT)
                return result

            return real(held, durable)  # type: ignore[no-any-return]

        a._transact = transact

        def delivered(lease: Lease) -> list[Disposition]:
            return [Disposition(r.index, RecipientOutcome(r.recipient, OK)) for r in lease.recipients]

        recordedFirst = a.record(first, delivered(first))
        self.assertTrue(inside.wait(TIMEOUT))
        recordedSecond = b.record(second, delivered(second))
        time.sleep(0.5)  # let b's record run as far as it can meanwhile
        go.set()
        self.wait(recordedFirst)
        self.wait(recordedSecond)
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM messages"), [(0,)])
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM message_bodies"), [(0,)])

    def test_fencedAfterTakeover(self) -> None:
        """
        After node A's lease expires and node B takes the recipients over, A's
        record fails with L{LeaseLost} and writes nothing; B's succeeds.
        """
        a, b = self.node("a", leaseSeconds=60), self.node("b", leaseSeconds=60)
        self.enqueue(a, "x@example.com")
        [old] = self.wait(a.claim(self.clock.seconds(), 10))
        self.assertEqual(self.wait(b.claim(self.clock.seconds(), 10)), [])
        self.clock.advance(61)
        [new] = self.wait(b.claim(self.clock.seconds(), 10))
        outcome = RecipientOutcome(old.envelope.recipients[0], OK)
        self.waitFailure(a.record(old, [Disposition(0, outcome)]), LeaseLost)
        [(owner, state)] = self.helpers.sql("SELECT lease_owner, state FROM recipients")
        self.assertEqual((owner, state), ("b", "leased"))
        self.wait(b.record(new, [Disposition(0, outcome)]))
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_deadNodeReaped(self) -> None:
        """
        When a node stops beating for three intervals, another node's
        heartbeat returns its leases to ready (long before they expire),
        drops its destination slots, and wakes that node's scheduler; the
        dead node's late record is fenced.
        """
        a = self.node("a", heartbeatSeconds=5)
        b = self.node("b", heartbeatSeconds=5)
        self.enqueue(a, "x@example.com", "y@example.com")
        [lease] = self.wait(a.claim(self.clock.seconds(), 10))
        self.assertTrue(self.wait(a.acquireDestination("relay:mx.example.com", 1)))
        woken: list[None] = []
        b.notifyDue(lambda: woken.append(None))
        # A dies: its heartbeat stops; B keeps beating as the clock moves.
        a._reaper.stop()
        for _ in range(4):
            self.clock.advance(5)
            self.helpers.waitUntil(lambda: not b._inFlight, "b's heartbeat")
        self.helpers.waitUntil(lambda: bool(woken), "b's wake-up")
        self.assertEqual(
            self.helpers.sql("SELECT state, lease_owner FROM recipients"),
            [("ready", None), ("ready", None)],
        )
        self.assertEqual(self.helpers.sql("SELECT node FROM mailfw_nodes"), [("b",)])
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM destination_leases"), [(0,)])
        self.assertLess(self.clock.seconds(), lease.expires)
        [taken] = self.wait(b.claim(self.clock.seconds(), 10))
        self.assertEqual(len(taken.recipients), 2)
        self.waitFailure(a.record(lease, []), LeaseLost)

    def test_ownerlessLeasesReapedAfterGrace(self) -> None:
        """
        Leases whose owner has no node row (it left, or was declared dead)
        are reaped by a heartbeat, but only once they are older than three
        heartbeats, so a node's first claim is never mistaken for one.
        """
        a = self.node("a", heartbeatSeconds=5)
        b = self.node("b", heartbeatSeconds=5)
        a._reaper.stop()
        self.enqueue(a, "x@example.com")
        self.wait(a.claim(self.clock.seconds(), 10))
        self.helpers.sql("DELETE FROM mailfw_nodes WHERE node = 'a'")
        self.wait(b._beat())
        self.assertEqual(self.helpers.sql("SELECT lease_owner FROM recipients"), [("a",)])
        self.clock.advance(16)
        self.helpers.waitUntil(lambda: not b._inFlight, "b's heartbeat")
        self.wait(b._beat())
        self.assertEqual(self.helpers.sql("SELECT lease_owner FROM recipients"), [(None,)])

    def test_recoverLeavesLiveNodesAlone(self) -> None:
        """
        C{recover(inf)} (a scheduler that believes it is alone) returns this
        node's leases but not the fresh leases of another live node.
        """
        a, b = self.node("a"), self.node("b")
        self.enqueue(a, "x@example.com")
        self.enqueue(a, "y@example.com")
        self.wait(a.claim(self.clock.seconds(), 1))
        self.wait(b.claim(self.clock.seconds(), 1))
        self.assertEqual(self.wait(a.recover(float("inf"))), 1)
        self.assertEqual(self.helpers.sql("SELECT lease_owner FROM recipients ORDER BY 1"), [("b",), (None,)])

    def test_notifyWakesOtherNode(self) -> None:
        """
        A flush on one node wakes the other node's scheduler through
        NOTIFY; plain enqueues do not.
        """
        a, b = self.node("a"), self.node("b")
        self.wait(b.listening)
        woken: list[None] = []
        b.notifyDue(lambda: woken.append(None))
        self.enqueue(a, "x@example.com")
        self.assertEqual(self.wait(a.hold(Selector())), 1)
        self.assertEqual(self.wait(a.release(Selector())), 1)
        self.helpers.waitUntil(lambda: len(woken) >= 1, "b's wake-up after a release")
        self.assertEqual(self.wait(a.flush(Selector())), 1)
        self.helpers.waitUntil(lambda: len(woken) >= 2, "b's wake-up after a flush")
        self.enqueue(a, "y@example.com")
        self.assertEqual(self.wait(a.flush(Selector(domain="nothing.example"))), 0)
        # Notifications arrive in order: any sent for the enqueue or the
        # empty flush would arrive before this probe.
        self.helpers.sql("NOTIFY mailfw_due, 'probe'")
        self.helpers.waitUntil(lambda: b.lastNotification == "probe", "the probe")
        self.assertEqual((b.notificationsReceived, len(woken)), (3, 3))

    def test_notifyBurstEndingWithOwn(self) -> None:
        """
        In a burst of notifications whose last is the node's own, every
        earlier one still wakes the node: each wake-up handed to the
        reactor carries its own payload.  The results are run only after
        the listener thread handed over the whole burst, as a busy reactor
        would (regression: a lambda bound to the loop's variable made every
        call see the last payload, the node's own, and wake nobody).
        """
        b = self.node("b")
        self.wait(b.listening)
        self.helpers.waitUntil(lambda: not b._inFlight, "b's first heartbeat")
        woken: list[None] = []
        b.notifyDue(lambda: woken.append(None))
        calls = self.helpers.calls
        self.assertEqual(calls.qsize(), 0)
        # One transaction: the three arrive together, in this order.
        self.helpers.sql(
            "SELECT pg_notify('mailfw_due', 'n1'), pg_notify('mailfw_due', 'n2'), pg_notify('mailfw_due', 'b')"
        )
        deadline = time.monotonic() + TIMEOUT
        while calls.qsize() < 3:
            if time.monotonic() > deadline:
                self.fail(f"the listener handed over {calls.qsize()} of 3 notifications in {TIMEOUT} s")
            time.sleep(0.01)
        for _ in range(3):
            calls.get_nowait()()
        self.assertEqual((b.notificationsReceived, b.lastNotification), (3, "b"))
        self.assertEqual(len(woken), 2, "the wake-ups of the other nodes' notifications were lost")

    def test_idempotentInsert(self) -> None:
        """
        Committing the same queue ID twice (a retried commit) stores the
        message once.
        """
        a = self.node("a", idGenerator=lambda: "FIXEDID000000000001")
        self.enqueue(a, "x@example.com")
        self.enqueue(a, "x@example.com")
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM recipients"), [(1,)])

    def test_commitAnswerLost(self) -> None:
        """
        When the connection fails after C{COMMIT} reached the server, the
        commit still succeeds, because the queue finds the ID stored; the
        message is stored once.
        """
        import psycopg

        failures = [psycopg.OperationalError("server closed the connection unexpectedly")]

        def lose() -> None:
            if failures:
                raise failures.pop()

        a = self.node("a", afterInsert=lose)
        queueID = self.enqueue(a, "x@example.com")
        self.assertEqual(failures, [])
        self.assertEqual(self.helpers.sql("SELECT message_id FROM recipients"), [(queueID,)])

    def test_commitLostBeforeCommit(self) -> None:
        """
        When the connection fails before the commit, the queue finds the ID
        missing and inserts again: still one stored copy, and a 250.
        """
        import psycopg

        a = self.node("a")
        real = a._transact
        broken = [True]

        def transact(function: Callable[[Any], Any]) -> Deferred[Any]:
            if broken:
                broken.pop()

                def fails(cursor: Any) -> Any:
                    raise psycopg.OperationalError("connection lost")

                return real(fails)  # type: ignore[no-any-return]
            return real(function)  # type: ignore[no-any-return]

        a._transact = transact
        self.enqueue(a, "x@example.com")
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM messages"), [(1,)])

    def test_queueIDCollision(self) -> None:
        """
        A new message that draws the ID of a stored one fails to commit (the
        client is asked to try again), leaves the stored one alone and is
        not handed to the scheduler.
        """
        from mailfw.queue._postgres import QueueIDTaken

        a = self.node("a", idGenerator=lambda: "SAMEID")
        taken: list[Lease] = []
        a.offerNew(lambda: 10, taken.append)
        self.enqueue(a, "alice@example.com", body=b"for alice\r\n")
        incoming = a.receive(makeEnvelope("mallory@example.com"))
        incoming.write(b"for mallory\r\n")
        self.waitFailure(incoming.commit(), QueueIDTaken)
        self.assertEqual([lease.envelope.recipients[0].address.localpart for lease in taken], ["alice"])
        self.assertEqual(self.helpers.sql("SELECT address FROM recipients"), [("alice@example.com",)])
        self.assertEqual(self.helpers.sql("SELECT body FROM message_bodies"), [(b"for alice\r\n",)])

    def test_commitUnresolvedReleasesLease(self) -> None:
        """
        When the commit's answer is lost and checking for the message fails
        too, the client gets an error; the message, stored leased to this
        node (which will not deliver it), is returned to ready for any node.
        """
        import psycopg

        def lose() -> None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        a = self.node("a", afterInsert=lose)
        taken: list[Lease] = []
        a.offerNew(lambda: 10, taken.append)
        real = a._transact
        calls = [0]

        def transact(function: Callable[[Any], Any]) -> Deferred[Any]:
            calls[0] += 1
            if calls[0] == 2:  # the check whether the message is stored

                def fails(cursor: Any) -> Any:
                    raise psycopg.OperationalError("connection lost")

                return real(fails)  # type: ignore[no-any-return]
            return real(function)  # type: ignore[no-any-return]

        a._transact = transact
        incoming = a.receive(makeEnvelope("x@example.com"))
        incoming.write(b"x\r\n")
        self.waitFailure(incoming.commit(), psycopg.OperationalError)
        self.assertEqual(taken, [])
        self.helpers.waitUntil(
            lambda: self.helpers.sql("SELECT state, lease_owner FROM recipients") == [("ready", None)],
            "the lease to be released",
        )

    def test_otherErrorsNotRetried(self) -> None:
        """
        A statement the server refuses is not retried: the commit fails.
        """
        a = self.node("a")
        incoming = a.receive(makeEnvelope("x@example.com"))
        incoming.queueID = "bad\x00id"  # PostgreSQL text cannot hold NUL
        incoming.write(b"x\r\n")
        self.waitFailure(incoming.commit(), Exception)
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM messages"), [(0,)])

    def test_hugeBody(self) -> None:
        """
        A 35 MiB body streams in through the spool file and COPY and reads
        back byte for byte, seekable, through independent readers.
        """
        a = self.node("a", spillThreshold=256 * 1024)
        incoming = a.receive(makeEnvelope("x@example.com"))
        digest = hashlib.sha256()
        piece = os.urandom(64 * 1024)
        for i in range(35 * 16):
            chunk = bytes([i % 256]) + piece[1:]
            digest.update(chunk)
            incoming.write(chunk)
        queueID = self.wait(incoming.commit())
        [(stored,)] = self.helpers.sql(
            "SELECT octet_length(body) FROM message_bodies WHERE message_id = %s", queueID
        )
        self.assertEqual(stored, 35 << 20)
        body = self.wait(a.openBody(queueID))
        self.assertEqual(body.size, 35 << 20)
        check = hashlib.sha256()
        with body.open() as f, body.open() as g:
            self.assertEqual(g.read(1), b"\x00")
            while True:
                data = f.read(1 << 20)
                if not data:
                    break
                check.update(data)
            g.seek(64 * 1024)
            self.assertEqual(g.read(1), b"\x01")
        self.assertEqual(check.hexdigest(), digest.hexdigest())

    def test_destinationLimitAcrossNodes(self) -> None:
        """
        Destination slots are limited for the whole cluster: with a limit of
        two, a third acquire on either node fails until one is released.
        """
        a, b = self.node("a"), self.node("b")
        dest = "relay:mx.example.com"
        self.assertTrue(self.wait(a.acquireDestination(dest, 2)))
        self.assertTrue(self.wait(b.acquireDestination(dest, 2)))
        self.assertFalse(self.wait(a.acquireDestination(dest, 2)))
        self.assertFalse(self.wait(b.acquireDestination(dest, 2)))
        self.assertTrue(self.wait(b.acquireDestination("relay:other.example", 2)))
        self.wait(a.releaseDestination(dest))
        self.assertTrue(self.wait(b.acquireDestination(dest, 2)))
        self.waitFailure(a.releaseDestination(dest), ValueError)

    def test_destinationSlotsExpire(self) -> None:
        """
        A slot whose holder neither released nor renewed it is free again
        after the lease time.
        """
        a = self.node("a", leaseSeconds=60)
        b = self.node("b", leaseSeconds=60)
        a._reaper.stop()
        b._reaper.stop()
        dest = "relay:mx.example.com"
        self.assertTrue(self.wait(a.acquireDestination(dest, 1)))
        self.assertFalse(self.wait(b.acquireDestination(dest, 1)))
        self.clock.advance(61)
        self.assertTrue(self.wait(b.acquireDestination(dest, 1)))

    def test_heartbeatExtendsOnlyHeldSlots(self) -> None:
        """
        The heartbeat extends the slots its node knows it holds, not a slot
        row that only carries its name (an acquire whose commit succeeded
        while its reply was lost): that one expires, or the destination
        would stay busy for ever.
        """
        a = self.node("a", leaseSeconds=60)
        b = self.node("b", leaseSeconds=60)
        b._reaper.stop()
        self.assertTrue(self.wait(a.acquireDestination("relay:held.example", 1)))
        self.assertTrue(self.wait(a.acquireDestination("relay:lost.example", 1)))
        a._slots.pop("relay:lost.example")  # as if the reply had been lost
        for _ in range(7):
            self.clock.advance(10)
            self.wait(a._beat())
        self.assertFalse(self.wait(b.acquireDestination("relay:held.example", 1)))
        self.assertTrue(self.wait(b.acquireDestination("relay:lost.example", 1)))

    def test_closeHandsBackLeases(self) -> None:
        """
        Closing a node returns its leases and slots to the cluster at once.
        """
        a, b = self.node("a"), self.node("b")
        self.enqueue(a, "x@example.com")
        self.wait(a.claim(self.clock.seconds(), 10))
        self.wait(a.acquireDestination("d", 1))
        self.wait(a.close())
        [lease] = self.wait(b.claim(self.clock.seconds(), 10))
        self.assertEqual(len(lease.recipients), 1)
        self.assertTrue(self.wait(b.acquireDestination("d", 1)))
        self.assertEqual(self.helpers.sql("SELECT node FROM mailfw_nodes"), [("b",)])

    def test_unreachableClaimFails(self) -> None:
        """
        A node whose database is unreachable fails its claims (so its
        scheduler starts no deliveries) instead of hanging.
        """
        from mailfw.queue._postgres import PostgresQueue
        from mailfw.queue._sqlite import SynchronousExecutor

        q = PostgresQueue(
            "host=127.0.0.1 port=1 dbname=x connect_timeout=2",
            ThreadedClockFront(self.clock, self.helpers.calls),
            clock=self.clock,
            spool=SynchronousExecutor(),
            listen=False,
        )
        self.addCleanup(lambda: self.wait(q.close()))
        self.waitFailure(q.claim(self.clock.seconds(), 10), Exception)
        self.flushLoggedErrors()

    def test_newerSchemaRefused(self) -> None:
        """
        A database set up by a newer mailfw is refused at start-up.
        """
        import psycopg

        from mailfw.queue._postgres import initialiseDatabase

        self.helpers.sql("UPDATE mailfw_schema SET version = version + 1")
        self.assertRaises(psycopg.DatabaseError, initialiseDatabase, self.helpers.dsn)

    def test_sharedStateAddedToVersion1(self) -> None:
        """
        A version 1 database (before shared state) gets the C{shared_state}
        table and version 2 at start-up, keeping its messages.
        """
        from mailfw.queue._postgres import initialiseDatabase

        a = self.node("a")
        self.enqueue(a, "x@example.com")
        self.helpers.sql("DROP TABLE shared_state")
        self.helpers.sql("UPDATE mailfw_schema SET version = 1")
        initialiseDatabase(self.helpers.dsn)
        self.assertEqual(self.helpers.sql("SELECT version FROM mailfw_schema"), [(2,)])
        self.assertEqual(self.wait(a.count("k", 1, 60, 0)), 1)
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM messages"), [(1,)])

    def test_describedWithoutSecrets(self) -> None:
        """
        The start-up line names the server, database, user and node, never
        the password; the queue writes no files of its own.
        """
        # The throw-away cluster trusts local connections: the password is
        # sent and ignored.
        self.helpers.dsn += " password=hunter2secret"
        a = self.node("a")
        self.assertTrue(verifyObject(IDescribed, a))
        self.assertEqual(self.wait(a.count("k", 1, 60, 0)), 1)
        line = a.describe()
        self.assertNotIn("hunter2secret", line)
        self.assertIn("dbname=", line)
        self.assertTrue(line.startswith("postgresql ") and line.endswith(" node a"), line)
        self.assertEqual(a.ownedPaths(), [])

    def test_initialiseTwice(self) -> None:
        """
        Initialising an initialised database changes nothing.
        """
        from mailfw.queue._postgres import initialiseDatabase

        initialiseDatabase(self.helpers.dsn)
        self.assertEqual(self.helpers.sql("SELECT COUNT(*) FROM mailfw_schema"), [(1,)])

    def test_synchronousCommitOn(self) -> None:
        """
        Pool connections run with C{synchronous_commit = on}, whatever the
        server's default.
        """
        a = self.node("a")
        setting = self.wait(a._transact(lambda c: c.execute("SHOW synchronous_commit").fetchone()[0]))
        self.assertEqual(setting, "on")

    def test_diskFullIsQueueFull(self) -> None:
        """
        PostgreSQL's "insufficient resources" errors (disk full) become
        L{QueueFull}, so the server answers 452; other errors pass through.
        """
        import psycopg

        from mailfw.queue._postgres import PostgresQueue
        from mailfw.queued import QueueFull

        _translate = PostgresQueue._translate
        self.assertIsInstance(_translate(psycopg.errors.DiskFull("no space")), QueueFull)
        self.assertIsInstance(_translate(OSError(28, "No space left on device")), QueueFull)
        error = psycopg.errors.UniqueViolation("dup")
        self.assertIs(_translate(error), error)

    def test_connectionDefaults(self) -> None:
        """
        Connections get bounded waits (connect timeout, keepalives, TCP user
        timeout) unless the configured string sets its own.
        """
        from psycopg.conninfo import conninfo_to_dict

        from mailfw.queue._postgres import withConnectionDefaults

        given = conninfo_to_dict(
            withConnectionDefaults("postgresql://u:p@db.example/q?keepalives_idle=99", 7)
        )
        self.assertEqual(
            (given["keepalives_idle"], given["connect_timeout"], given["tcp_user_timeout"]),
            ("99", "7", "30000"),
        )
        self.assertEqual((given["host"], given["password"]), ("db.example", "p"))

    def test_reprHidesSecrets(self) -> None:
        """
        The queue's repr (logged at start-up) names the node but never the
        connection string.
        """
        a = self.node("a")
        self.assertNotIn("port", repr(a))
        self.assertIn("'a'", repr(a))


class PostgresFromConfigTests(SynchronousTestCase):
    """
    The C{postgresql} plugin's configuration.
    """

    def context(self) -> ComponentContext:
        return ComponentContext(reactor=None, hostname="mx.test", dataDir=Path(self.mktemp()))

    def test_badOptions(self) -> None:
        """
        Unknown keys and bad values are refused, naming the section.
        """
        from mailfw.queue._postgres import fromConfig

        for options in (
            {"dsn": "x", "nonsense": 1},
            {"pool_size": 0},
            {"node": ""},
            {"lease_seconds": 10, "heartbeat_seconds": 5},
        ):
            with self.assertRaises(ConfigError) as raised:
                fromConfig(self.context(), "queue", options)
            self.assertIn("[queue]", str(raised.exception))

    def test_unreachable(self) -> None:
        """
        A database that cannot be reached is a configuration error at
        start-up, and the message carries no password.
        """
        from mailfw.queue._postgres import fromConfig

        with self.assertRaises(ConfigError) as raised:
            fromConfig(
                self.context(),
                "queue",
                {"dsn": "postgresql://u:sekrit@127.0.0.1:1/x", "connect_timeout": 2},
            )
        self.assertNotIn("sekrit", str(raised.exception))

    def test_builds(self) -> None:
        """
        With a reachable database the plugin sets up the schema and builds a
        queue with the configured options.
        """
        from mailfw.queue._postgres import PostgresQueue, fromConfig

        helpers = PostgresHelpers()
        helpers.startDatabase(self)
        reactor = ThreadedClockFront(Clock(), helpers.calls)
        context = ComponentContext(reactor=reactor, hostname="mx.test", dataDir=Path(self.mktemp()))
        q = fromConfig(
            context,
            "queue",
            {"dsn": helpers.dsn, "pool_size": 2, "node": "n1", "lease_seconds": 120},
        )
        self.addCleanup(lambda: helpers.wait(q.close()))
        self.assertIsInstance(q, PostgresQueue)
        self.assertEqual((q.node, q.leaseSeconds), ("n1", 120))

    def test_plugin(self) -> None:
        """
        The C{postgresql} queue plugin is installed.
        """
        from mailfw.plugin import findPlugin

        try:
            plugin = findPlugin(IMessageQueueFactory, "postgresql")
        except Exception as e:
            self.skipTest(f"the lead has not registered the plugin yet: {e}")
        self.assertEqual(plugin.name, "postgresql")
