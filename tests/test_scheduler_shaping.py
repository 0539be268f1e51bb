"""
Tests for traffic shaping per destination (L{mailfw.scheduling._shaping})
in the L{Scheduler}, on a L{Clock} with a L{MemoryQueue}.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.config import ConfigError, Section
from mailfw.envelope import Route, RouteKind
from mailfw.interfaces import IConnectionGate, IConnectionShaping, IDeliveryAgent
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import Lease
from mailfw.scheduling._retry import RetrySchedule
from mailfw.scheduling._scheduler import THROTTLED, schedulerFromConfig
from mailfw.scheduling._shaping import ConnectionGate, Pace, Shape, ShapingTable, shapingFromConfig
from tests.test_scheduler import START, FakeAgent, FakeRouter, SchedulerTestsMixin, runUntilIdle

RELAY = Route(RouteKind.RELAY, agent="relay", name="relay")


def maxPerWindow(times: Sequence[float], window: float = 60.0) -> int:
    """
    The most of C{times} (sorted) inside any half-open C{window} seconds.
    """
    most = 0
    first = 0
    for last, when in enumerate(times):
        while times[first] <= when - window:
            first += 1
        most = max(most, last - first + 1)
    return most


class PaceTests(SynchronousTestCase):
    """
    L{Pace} gives turns evenly spaced, in memory within its wait and in
    the queue beyond it.
    """

    def test_turns(self) -> None:
        """
        Turns follow each other one interval apart; those further off than
        C{wait} are booked in the queue, one interval apart as well.
        """
        pace = Pace(1.0, 2.0)
        self.assertEqual(
            [pace.turn(100.0) for _ in range(5)],
            [(100.0, True), (101.0, True), (102.0, True), (103.0, False), (104.0, False)],
        )
        # Back from the queue at its turn: in memory again.
        self.assertEqual(pace.turn(103.0), (103.0, True))

    def test_untilFree(self) -> None:
        """
        A start is held back to one interval after the last one.
        """
        pace = Pace(2.0, 0.0)
        self.assertEqual(pace.untilFree(50.0), 0.0)
        pace.started(50.0)
        self.assertEqual(pace.untilFree(51.5), 0.5)


class ShapedSchedulerTests(SchedulerTestsMixin):
    """
    The scheduler paces and splits deliveries to shaped destinations.
    """

    def shaping(self, *shapes: Shape, lookup: object = None, wait: float = 10.0) -> ShapingTable:
        return ShapingTable(self.clock, shapes, lookup, wait)  # type: ignore[arg-type]

    def test_sixtyPerMinute(self) -> None:
        """
        With C{max_messages_per_minute = 60}, 200 queued messages reach the
        destination one second apart (never more than 60 in a minute),
        none counted as a failed attempt and no delay notice sent, although
        they wait longer than the delay-warning time; mail to other
        destinations is not held up.
        """
        self.router.table = {"gmail.com": RELAY}
        relay = FakeAgent(self.clock, "relay")
        local = FakeAgent(self.clock)
        schedule = RetrySchedule(jitter=0, delayWarning=60.0)
        self.makeScheduler(
            relay, local, schedule=schedule, shaping=self.shaping(Shape("gmail.com", maxMessagesPerMinute=60))
        )
        ids = [self.enqueue(makeEnvelope(f"u{n}@gmail.com")) for n in range(200)]
        self.clock.advance(0)
        self.assertEqual(len(relay.deliveries), 1)

        runUntilIdle(self.clock, START + 100.5)
        # Half way: the waiting ones were put back uncounted, saying why.
        waiting = [
            r for queueID in ids if queueID in self.queue.queueIDs() for r in self.queue.recipients(queueID)
        ]
        self.assertTrue(waiting)
        self.assertEqual({r.attempts for r in waiting}, {0})
        self.assertEqual({r.lastReply for r in waiting} - {None}, {THROTTLED})
        now = self.clock.seconds()
        self.enqueue(makeEnvelope("someone@example.com"))
        self.clock.advance(0)
        self.assertEqual([d.at for d in local.deliveries], [now])

        runUntilIdle(self.clock)
        times = [d.at for d in relay.deliveries]
        self.assertEqual(len(times), 200)
        self.assertEqual(
            sorted(d.addresses[0] for d in relay.deliveries), sorted(f"u{n}@gmail.com" for n in range(200))
        )
        self.assertTrue(all(b - a >= 1.0 for a, b in itertools.pairwise(times)), times)
        self.assertEqual(maxPerWindow(times), 60)
        self.assertLessEqual(times[-1], START + 200.0)
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual([d for d in relay.deliveries + local.deliveries if d.envelope.sender is None], [])

    def test_recordsPerMessage(self) -> None:
        """
        A backlog comes back from the queue one message per turn, not all at
        once: each waiting message is claimed about twice, not once a turn.
        """
        self.router.table = {"gmail.com": RELAY}
        relay = FakeAgent(self.clock, "relay")
        self.makeScheduler(relay, shaping=self.shaping(Shape("gmail.com", maxMessagesPerMinute=60)))
        claims: list[int] = []
        claim = self.queue.claim

        def counting(now: float, limit: int) -> Deferred[Sequence[Lease]]:
            def count(leases: Sequence[Lease]) -> Sequence[Lease]:
                claims.append(len(leases))
                return leases

            return claim(now, limit).addCallback(count)

        self.queue.claim = counting  # type: ignore[method-assign]
        for n in range(50):
            self.enqueue(makeEnvelope(f"u{n}@gmail.com"))
        runUntilIdle(self.clock)
        self.assertEqual(len(relay.deliveries), 50)
        self.assertLessEqual(sum(claims), 2 * 50)

    def test_stopWhileWaiting(self) -> None:
        """
        A delivery waiting in memory for its turn when the scheduler stops
        is not started: it goes back to the queue, due, uncounted.
        """
        self.router.table = {"gmail.com": RELAY}
        relay = FakeAgent(self.clock, "relay")
        scheduler = self.makeScheduler(
            relay, shaping=self.shaping(Shape("gmail.com", maxMessagesPerMinute=60))
        )
        self.enqueue(makeEnvelope("a@gmail.com"))
        second = self.enqueue(makeEnvelope("b@gmail.com"))
        self.clock.advance(0)
        self.assertEqual(len(relay.deliveries), 1)
        stopped = scheduler.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(len(relay.deliveries), 1)
        [waiting] = self.queue.recipients(second)
        self.assertEqual((waiting.attempts, waiting.state.name, waiting.nextAttempt), (0, "READY", START + 1))

    def test_recipientsPerMessage(self) -> None:
        """
        C{max_recipients_per_message = 2} delivers a 5-recipient message in
        three deliveries of 2, 2 and 1 recipients; with a rate they are
        paced like messages.
        """
        self.router.table = {"example.net": RELAY}
        relay = FakeAgent(self.clock, "relay")
        shape = Shape("example.net", maxMessagesPerMinute=30, maxRecipientsPerMessage=2)
        self.makeScheduler(relay, shaping=self.shaping(shape))
        self.enqueue(makeEnvelope(*[f"r{n}@example.net" for n in range(5)]))
        runUntilIdle(self.clock)
        self.assertEqual(
            [(d.addresses, d.at) for d in relay.deliveries],
            [
                (["r0@example.net", "r1@example.net"], START),
                (["r2@example.net", "r3@example.net"], START + 2),
                (["r4@example.net"], START + 4),
            ],
        )
        self.assertEqual(self.queue.queueIDs(), [])

    def test_hostPattern(self) -> None:
        """
        A pattern over MX host names paces every domain whose mail hosts
        match it together; a section named after the recipient domain wins
        over it; hosts are looked up once per domain; a failed lookup leaves
        the recipient unshaped.
        """
        looked: list[str] = []
        hosts = {
            "gmail.com": ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"],
            "customer.example": ["aspmx.l.google.com"],
            "fast.example": ["aspmx.l.google.com"],
        }

        def lookup(domain: str) -> Deferred[Sequence[str]]:
            looked.append(domain)
            if domain not in hosts:
                return fail(RuntimeError("SERVFAIL"))
            return succeed(hosts[domain])

        self.router.table = {d: RELAY for d in (*hosts, "broken.example")}
        relay = FakeAgent(self.clock, "relay")
        table = self.shaping(
            Shape("*.google.com", maxMessagesPerMinute=6),
            Shape("fast.example"),
            lookup=lookup,
        )
        self.makeScheduler(relay, shaping=table)
        for to in ("a@gmail.com", "b@customer.example", "c@gmail.com", "d@fast.example", "e@broken.example"):
            self.enqueue(makeEnvelope(to))
        runUntilIdle(self.clock)
        self.assertEqual(
            [(d.addresses[0], d.at - START) for d in relay.deliveries],
            [
                ("a@gmail.com", 0),
                ("d@fast.example", 0),
                ("e@broken.example", 0),
                ("b@customer.example", 10),
                ("c@gmail.com", 20),
            ],
        )
        self.assertEqual(sorted(looked), ["broken.example", "customer.example", "gmail.com"])

    def test_localMailNotLookedUp(self) -> None:
        """
        Mail for a local mailbox (no next hop) is matched by its domain
        only: its mail hosts are not looked up.
        """
        looked: list[str] = []

        def lookup(domain: str) -> Deferred[Sequence[str]]:
            looked.append(domain)
            return succeed(["mx.google.com"])

        local = FakeAgent(self.clock)
        self.makeScheduler(
            local, shaping=self.shaping(Shape("*.google.com", maxMessagesPerMinute=1), lookup=lookup)
        )
        self.enqueue(makeEnvelope("a@example.org"))
        self.enqueue(makeEnvelope("b@example.org"))
        runUntilIdle(self.clock)
        self.assertEqual(([d.at for d in local.deliveries], looked), ([START, START], []))

    def test_fixedNexthopHost(self) -> None:
        """
        A route to a fixed C{[host]:port} is matched by its host name,
        without a lookup.
        """
        self.router.table = {
            "example.net": Route(RouteKind.RELAY, agent="relay", nexthop="[smtp.sendgrid.net]:587")
        }
        relay = FakeAgent(self.clock, "relay")
        self.makeScheduler(relay, shaping=self.shaping(Shape("*.sendgrid.net", maxMessagesPerMinute=1)))
        self.enqueue(makeEnvelope("a@example.net"))
        self.enqueue(makeEnvelope("b@example.net"))
        runUntilIdle(self.clock)
        self.assertEqual([d.at - START for d in relay.deliveries], [0, 60])

    def test_expiresWhileThrottled(self) -> None:
        """
        A message whose turn comes only after its lifetime bounces then with
        4.4.7, as any message that could not be delivered in time.
        """
        self.router.table = {"slow.example": RELAY}
        relay = FakeAgent(self.clock, "relay")
        local = FakeAgent(self.clock)
        schedule = RetrySchedule(jitter=0, maxLifetime=90.0)
        self.makeScheduler(
            relay,
            local,
            schedule=schedule,
            shaping=self.shaping(Shape("slow.example", maxMessagesPerMinute=1)),
        )
        for n in range(3):
            self.enqueue(makeEnvelope(f"u{n}@slow.example"))
        runUntilIdle(self.clock)
        self.assertEqual(
            [(d.addresses, d.at - START) for d in relay.deliveries],
            [(["u0@slow.example"], 0), (["u1@slow.example"], 60)],
        )
        [bounce] = self.notices(local)
        report = bounce.get_payload()[1]  # type: ignore[index]
        self.assertIn("u2@slow.example", str(report))
        self.assertIn("Status: 4.4.7", str(report))
        self.assertEqual(self.queue.queueIDs(), [])


class ShapingConfigTests(SynchronousTestCase):
    """
    C{[scheduler.destinations."NAME"]} tables.
    """

    def build(self, destinations: object, lookup: object = None) -> ShapingTable | None:
        return shapingFromConfig(Clock(), destinations, lookup)  # type: ignore[arg-type]

    def test_read(self) -> None:
        """
        Each table becomes a L{Shape} named after it, lowercased; nothing
        configured means no shaping at all.
        """
        table = self.build(
            {
                "GMail.com": {"max_messages_per_minute": 60, "max_recipients_per_message": 50},
                "example.net": {"max_connections_per_minute": 5, "max_messages_per_connection": 100},
            },
        )
        assert table is not None
        self.assertEqual(table.shapes, (Shape("gmail.com", 60, 50), Shape("example.net", None, None, 5, 100)))
        self.assertIsNone(self.build({}))

    def test_errors(self) -> None:
        """
        Unknown keys, bad values, bad names and host patterns without DNS
        are refused, naming the table.
        """
        for destinations, needle in (
            ({"gmail.com": {"max_messages_per_minut": 60}}, '"gmail.com"'),
            ({"gmail.com": {"max_messages_per_minute": 0}}, "at least 1"),
            ({"gmail.com": {"max_recipients_per_message": "x"}}, "integer"),
            ({"gm*il.com": {}}, "host pattern"),
            ({"*.google.com": {"max_messages_per_minute": 1}}, "DNS"),
            ({"gmail.com": 5}, "table"),
        ):
            e = self.assertRaises(ConfigError, self.build, destinations)
            self.assertIn(needle, str(e), destinations)

    def test_fromSchedulerSection(self) -> None:
        """
        L{schedulerFromConfig} reads the tables from C{destinations} in
        C{[scheduler]}, with C{shaping_wait}, and looks hosts up with the
        resolver it is given only when asked.
        """
        clock = Clock()
        section = Section(
            "[scheduler]",
            {"shaping_wait": 5, "destinations": {"*.google.com": {"max_messages_per_minute": 10}}},
        )
        calls: list[None] = []

        def resolver() -> object:
            calls.append(None)
            return None

        scheduler = schedulerFromConfig(
            section, clock, MemoryQueue(clock), FakeRouter(), {}, "mx.example", resolver=resolver
        )
        table = scheduler._shaping
        assert table is not None
        self.assertEqual((table.wait, table.hostPatterns), (5, (Shape("*.google.com", 10),)))
        self.assertEqual(calls, [])


@implementer(IDeliveryAgent, IConnectionShaping)
class ConnectingAgent(FakeAgent):
    """
    A L{FakeAgent} that would open connections, and so takes a gate.
    """

    gate: IConnectionGate | None = None

    def shapeConnections(self, gate: IConnectionGate) -> None:
        self.gate = gate


class ConnectionGateTests(SynchronousTestCase):
    """
    L{ConnectionGate} paces new connections and limits their transactions.
    """

    def test_verify(self) -> None:
        """
        L{ConnectionGate} provides L{IConnectionGate}.
        """
        clock = Clock()
        self.assertTrue(verifyObject(IConnectionGate, ConnectionGate(clock, ShapingTable(clock, []))))

    def test_matchAndPace(self) -> None:
        """
        The recipient's domain decides first, then the host's name; a
        paced destination's connections are spaced evenly; the answer is
        the destination's transactions per connection.
        """
        clock = Clock()
        table = ShapingTable(
            clock,
            [
                Shape("*.google.com", maxConnectionsPerMinute=4, maxMessagesPerConnection=10),
                Shape("customer.example", maxMessagesPerConnection=3),
            ],
        )
        gate = ConnectionGate(clock, table)
        self.assertEqual(self.successResultOf(gate.connect("customer.example", "aspmx.l.google.com")), 3)
        self.assertEqual(self.successResultOf(gate.connect("other.example", "mx.other.example")), None)
        self.assertEqual(
            self.successResultOf(gate.connect("gmail.com", "alt1.gmail-smtp-in.l.google.com")), 10
        )
        second = gate.connect("gmail.com", "gmail-smtp-in.l.google.com")
        third = gate.connect("googlemail.com", "gmail-smtp-in.l.google.com")
        clock.advance(14.9)
        self.assertNoResult(second)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(second), 10)
        self.assertNoResult(third)
        clock.advance(15)
        self.assertEqual(self.successResultOf(third), 10)


class SchedulerGateTests(SchedulerTestsMixin):
    """
    The scheduler gives its connection gate to the agents that open
    connections, only when some destination limits connections.
    """

    def test_handedOver(self) -> None:
        """
        An agent providing L{IConnectionShaping} gets a gate; others are
        left alone.
        """
        relay = ConnectingAgent(self.clock, "relay")
        local = FakeAgent(self.clock)
        table = ShapingTable(self.clock, [Shape("gmail.com", maxConnectionsPerMinute=5)])
        self.makeScheduler(relay, local, shaping=table)
        self.assertIsInstance(relay.gate, ConnectionGate)

    def test_notWithoutConnectionLimits(self) -> None:
        """
        With message limits only, no gate is handed over.
        """
        relay = ConnectingAgent(self.clock, "relay")
        self.makeScheduler(
            relay, shaping=ShapingTable(self.clock, [Shape("gmail.com", maxMessagesPerMinute=5)])
        )
        self.assertIsNone(relay.gate)
