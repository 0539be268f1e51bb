"""
Tests for L{mailfw.scheduling._scheduler.Scheduler}, on a L{Clock} with a
L{MemoryQueue}, a fake router and fake delivery agents.
"""

from __future__ import annotations

import email
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ConfigError, Section
from mailfw.envelope import Envelope, Recipient, RecipientOutcome, Route, RouteKind, Session
from mailfw.interfaces import IDeliveryAgent, IMessageBody, IRouter
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import QueueFull, RecipientState, Selector
from mailfw.reply import SMTPReply
from mailfw.scheduling._dsn import NoticeWriter
from mailfw.scheduling._retry import RetrySchedule
from mailfw.scheduling._scheduler import (
    AGENT_BUSY,
    BUSY_PAUSE,
    BUSY_RETRY,
    Scheduler,
    defaultPerAgent,
    schedulerFromConfig,
)

OK = SMTPReply(250, "2.0.0", "ok")
GREYLISTED = SMTPReply(451, "4.7.1", "greylisted")
UNREACHABLE = SMTPReply(451, "4.4.1", "connection refused")
UNKNOWN = SMTPReply(550, "5.1.1", "no such user")
START = 1000.0
DAY = 86400.0


def subpart(message: Message, *indices: int) -> Message:
    """
    The part of a multipart C{message} at C{indices}, one index per level.
    """
    for index in indices:
        payload = message.get_payload()
        assert isinstance(payload, list)
        part = payload[index]
        assert isinstance(part, Message)
        message = part
    return message


@implementer(IRouter)
class FakeRouter:
    """
    Routes by domain from a table; other domains go to the C{local} agent.
    """

    def __init__(self, table: dict[str, Route] | None = None) -> None:
        self.table = table or {}
        self.calls: list[tuple[Address, Session | None]] = []

    def route(self, recipient: Address, session: Session | None) -> Deferred[Route]:
        self.calls.append((recipient, session))
        route = self.table.get(recipient.domain, Route(RouteKind.LOCAL, agent="local", name="local"))
        if route.agent == "explode":
            return fail(RuntimeError("router bug"))
        return succeed(route)


@dataclass
class Delivery:
    envelope: Envelope
    body: bytes
    nexthop: str | None
    at: float
    deferred: Deferred[Sequence[RecipientOutcome]] = field(default_factory=Deferred)

    @property
    def addresses(self) -> list[str]:
        return [str(r.address) for r in self.envelope.recipients]


@implementer(IDeliveryAgent)
class FakeAgent:
    """
    Records deliveries; answers each recipient with C{reply(address)}, or
    leaves the answer to the test when C{manual}.
    """

    def __init__(
        self,
        clock: Clock,
        name: str = "local",
        reply: Callable[[str], SMTPReply] = lambda address: OK,
        manual: bool = False,
    ) -> None:
        self.name = name
        self.clock = clock
        self.reply = reply
        self.manual = manual
        self.deliveries: list[Delivery] = []
        self.active = 0
        self.mostActive = 0
        self.error: Exception | None = None

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        with body.open() as f:
            delivery = Delivery(envelope, f.read(), nexthop, self.clock.seconds())
        self.deliveries.append(delivery)
        if self.error is not None:
            raise self.error
        if not self.manual:
            return succeed([RecipientOutcome(r, self.reply(str(r.address))) for r in envelope.recipients])
        self.active += 1
        self.mostActive = max(self.mostActive, self.active)

        def done(result: Sequence[RecipientOutcome]) -> Sequence[RecipientOutcome]:
            self.active -= 1
            return result

        return delivery.deferred.addCallback(done)

    def answer(self, delivery: Delivery, reply: SMTPReply = OK) -> None:
        delivery.deferred.callback([RecipientOutcome(r, reply) for r in delivery.envelope.recipients])


def runUntilIdle(clock: Clock, until: float = float("inf")) -> None:
    """
    Advance C{clock} from one scheduled call to the next until none is left
    (or the next is after C{until}).
    """
    for _ in range(100000):
        calls = clock.getDelayedCalls()
        if not calls:
            return
        when = min(c.getTime() for c in calls)
        if when > until:
            return
        clock.advance(max(when - clock.seconds(), 0))
    raise AssertionError("clock never went idle")


class SchedulerTestsMixin(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = MemoryQueue(self.clock, leaseSeconds=900)
        self.router = FakeRouter()
        self.events: list[dict[str, object]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def makeScheduler(self, *agents: FakeAgent, **kw: object) -> Scheduler:
        options: dict[str, object] = {"schedule": RetrySchedule(jitter=0)}
        options.update(kw)
        scheduler = Scheduler(
            self.clock,
            self.queue,
            self.router,
            {agent.name: agent for agent in agents},
            "mx.example",
            **options,  # type: ignore[arg-type]
        )
        scheduler.startService()
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    def enqueue(self, envelope: Envelope, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> str:
        incoming = self.queue.receive(envelope)
        incoming.write(body)
        return self.successResultOf(incoming.commit())

    def notices(self, agent: FakeAgent) -> list[email.message.Message]:
        return [email.message_from_bytes(d.body) for d in agent.deliveries if d.envelope.sender is None]


class SchedulerDeliveryTests(SchedulerTestsMixin):
    """
    The scheduler delivers, groups, retries and bounces.
    """

    def test_verifyFakes(self) -> None:
        """
        The fakes provide the interfaces the scheduler uses.
        """
        self.assertTrue(verifyObject(IRouter, self.router))
        self.assertTrue(verifyObject(IDeliveryAgent, FakeAgent(self.clock)))

    def test_deliversNewMail(self) -> None:
        """
        A new message is delivered in the same reactor turn it is queued,
        routed with no session, and leaves the queue.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com"))
        self.assertEqual(agent.deliveries, [])
        self.clock.advance(0)
        [delivery] = agent.deliveries
        self.assertEqual(
            (delivery.addresses, delivery.body, delivery.at),
            (["a@example.com"], b"Subject: hi\r\n\r\nhello\r\n", START),
        )
        self.assertEqual(self.router.calls, [(Address.parse("a@example.com"), None)])
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_outcomeLogged(self) -> None:
        """
        Every outcome is one info event naming the queue ID, recipient,
        agent and reply: how a sink's discarded mail is accounted for.
        """
        agent = FakeAgent(self.clock, name="sink")
        self.router.table["example.com"] = Route(RouteKind.LOCAL, agent="sink")
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        [event] = [e for e in self.events if e.get("queueID") == queueID and "code" in e]
        self.assertEqual(
            (
                cast(LogLevel, event["log_level"]).name,
                event["recipient"],
                event["agent"],
                event["code"],
                event["enhanced"],
            ),
            ("info", "a@example.com", "sink", 250, "2.0.0"),
        )

    def test_agentSeesQueueID(self) -> None:
        """
        The envelope given to an agent carries the message's queue ID, so
        its log events can name it.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        self.assertEqual(agent.deliveries[0].envelope.queueID, queueID)

    def test_retryOnTimeWhileTimerIsLater(self) -> None:
        """
        A deferral recorded while the scheduler sleeps until a later time
        (here the delivery's own lease expiry) still gets its retry at the
        scheduled time, not when the later timer fires.
        """
        agent = FakeAgent(self.clock, manual=True)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        [first] = agent.deliveries
        self.clock.advance(10)
        agent.answer(first, GREYLISTED)
        self.clock.advance(0)
        runUntilIdle(self.clock, until=START + 10 + 300)
        self.assertEqual([d.at for d in agent.deliveries], [START, START + 10 + 300])

    def test_queuedBeforeStart(self) -> None:
        """
        Mail already queued (and leases left by a dead process) is delivered
        when the scheduler starts.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        self.enqueue(makeEnvelope("b@example.com"))
        self.successResultOf(self.queue.claim(START, 1))
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        self.assertEqual(
            sorted(a for d in agent.deliveries for a in d.addresses), ["a@example.com", "b@example.com"]
        )

    def test_groupsByAgentAndNexthop(self) -> None:
        """
        Recipients of one message are grouped by (agent, next hop): one
        delivery per group, with that group's recipients in order.
        """
        self.router.table = {
            "a.example": Route(RouteKind.RELAY, agent="relay", nexthop="a.example"),
            "a2.example": Route(RouteKind.RELAY, agent="relay", nexthop="a.example"),
            "b.example": Route(RouteKind.RELAY, agent="relay", nexthop="b.example"),
        }
        local, relay = FakeAgent(self.clock), FakeAgent(self.clock, "relay")
        self.makeScheduler(local, relay)
        self.enqueue(
            makeEnvelope(
                "x@a.example", "y@b.example", "z@localhost.example", "w@a2.example", "v@localhost.example"
            )
        )
        self.clock.advance(0)
        self.assertEqual(
            sorted((d.nexthop or "", d.addresses) for d in relay.deliveries),
            [("a.example", ["x@a.example", "w@a2.example"]), ("b.example", ["y@b.example"])],
        )
        self.assertEqual(
            [d.addresses for d in local.deliveries], [["z@localhost.example", "v@localhost.example"]]
        )
        self.assertEqual(self.queue.queueIDs(), [])

    def test_fiveDaySchedule(self) -> None:
        """
        A recipient that is always deferred is tried at exactly the
        scheduled times for five days, gets one delay notice after four
        hours, and then bounces with status 4.4.7.
        """
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED if a == "a@example.com" else OK)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com"))
        runUntilIdle(self.clock)
        attempts = [d.at for d in agent.deliveries if d.envelope.sender is not None]
        expected = [START, START + 300, START + 900, START + 2100, START + 4500]
        while expected[-1] + 4000 < START + 5 * DAY:
            expected.append(expected[-1] + 4000)
        expected.append(START + 5 * DAY)
        self.assertEqual(attempts, expected)
        delayNotice, bounce = self.notices(agent)
        self.assertEqual(delayNotice["Subject"], "Delayed Mail (still being retried)")
        [delayAt] = [d.at for d in agent.deliveries if d.envelope.sender is None][:1]
        self.assertEqual(delayAt, min(t for t in expected if t >= START + 4 * 3600))
        self.assertEqual(bounce["Subject"], "Undelivered Mail Returned to Sender")
        status = subpart(bounce, 1, 1)
        self.assertEqual((status["Action"], status["Status"]), ("failed", "4.4.7"))
        self.assertEqual(status["Diagnostic-Code"], "smtp; 451 4.7.1 greylisted")
        self.assertEqual(self.queue.queueIDs(), [])

    def test_retryTimesSurviveDeferredState(self) -> None:
        """
        After a deferral the queue holds the attempt count, the reply and
        the exact next attempt time.
        """
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        [r] = self.queue.recipients(queueID)
        self.assertEqual(
            (r.state, r.attempts, r.nextAttempt, r.lastReply),
            (RecipientState.READY, 1, START + 300, GREYLISTED),
        )
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [START + 300])

    def test_permanentFailureBounces(self) -> None:
        """
        A 5xx outcome fails the recipient at once and bounces to the sender
        with the reply and the remote MTA; the other recipient is delivered.
        """
        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN if a == "bad@example.com" else OK)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("bad@example.com", "good@example.com"))
        self.clock.advance(0)
        [_bounce] = self.notices(agent)
        [notice] = [d for d in agent.deliveries if d.envelope.sender is None]
        self.assertEqual(notice.addresses, ["sender@example.org"])
        self.assertIn(b"Diagnostic-Code: smtp; 550 5.1.1 no such user", notice.body)
        self.assertNotIn(b"good@example.com", notice.body.split(b"message/rfc822")[0])
        self.assertEqual(self.queue.queueIDs(), [])

    def test_recordRetriedWhenQueueFails(self) -> None:
        """
        When recording the outcomes fails (a full disk), the scheduler
        tries again every 30 seconds instead of leaving the recipients
        leased to be delivered a second time.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        record = self.queue.record
        failures = [QueueFull("disk full"), QueueFull("disk full")]

        def flaky(*args: object, **kwargs: object) -> Deferred[None]:
            if failures:
                return fail(failures.pop(0))
            return record(*args, **kwargs)  # type: ignore[arg-type]

        self.queue.record = flaky  # type: ignore[method-assign]
        self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        self.assertEqual(len(self.queue.queueIDs()), 1)
        self.clock.advance(30)
        self.assertEqual(len(self.queue.queueIDs()), 1)
        self.clock.advance(30)
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(len(self.flushLoggedErrors(QueueFull)), 2)

    def test_recordedWhenNoticeCannotBeBuilt(self) -> None:
        """
        If building a notice fails (a bug), the outcomes are still recorded
        and the failure logged: no recipient is left leased and delivered
        again and again.
        """

        class BrokenNotices(NoticeWriter):
            def build(self, *args: object, **kwargs: object) -> None:
                raise UnicodeEncodeError("ascii", "\u00fc", 0, 1, "test")

        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN if a == "bad@example.com" else OK)
        self.makeScheduler(agent, notices=BrokenNotices("mx.example"))
        self.enqueue(makeEnvelope("bad@example.com", "good@example.com"))
        self.clock.advance(0)
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(len(self.flushLoggedErrors(UnicodeEncodeError)), 1)

    def test_notifyNeverSuppresses(self) -> None:
        """
        NOTIFY=NEVER suppresses both the bounce and the delay notice.
        """
        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN if a.startswith("bad") else GREYLISTED)
        self.makeScheduler(agent)
        never = frozenset({"NEVER"})
        self.enqueue(
            Envelope(
                Address.parse("sender@example.org"),
                (
                    Recipient(Address.parse("bad@example.com"), notify=never),
                    Recipient(Address.parse("slow@example.com"), notify=never),
                ),
            )
        )
        runUntilIdle(self.clock)
        self.assertEqual(self.notices(agent), [])
        self.assertEqual(self.queue.queueIDs(), [])

    def test_noBounceOfABounce(self) -> None:
        """
        A failed message from the null sender is dropped with a log event,
        not bounced.
        """
        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com", sender=None))
        self.clock.advance(0)
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(self.queue.queueIDs(), [])
        [event] = [e for e in self.events if e.get("queueID") == queueID and e["log_level"] == LogLevel.warn]
        self.assertEqual(event["recipient"], "a@example.com")

    def test_agentFailureDefers(self) -> None:
        """
        An agent whose Deferred fails (a bug) gets its recipients deferred
        with 451 4.3.0, and the failure is logged.
        """
        agent = FakeAgent(self.clock)
        agent.error = ZeroDivisionError("bug")
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        recipients = self.queue.recipients(queueID)
        self.assertEqual(
            [
                (
                    r.attempts,
                    r.nextAttempt,
                    r.lastReply.code if r.lastReply else 0,
                    r.lastReply.enhanced if r.lastReply else "",
                )
                for r in recipients
            ],
            [(1, START + 300, 451, "4.3.0")] * 2,
        )

    def test_wrongOutcomeCount(self) -> None:
        """
        An agent returning the wrong number of outcomes is treated as a
        failing agent.
        """

        @implementer(IDeliveryAgent)
        class Short:
            name = "local"

            def deliver(
                self, envelope: Envelope, body: IMessageBody, nexthop: str | None
            ) -> Deferred[Sequence[RecipientOutcome]]:
                return succeed([])

        scheduler = Scheduler(self.clock, self.queue, self.router, {"local": Short()}, "mx.example")
        scheduler.startService()
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(
            self.queue.recipients(queueID)[0].lastReply,
            SMTPReply(451, "4.3.0", "local error in delivery; will retry"),
        )

    def test_routerFailureDefers(self) -> None:
        """
        A router that fails defers the recipient with 451 4.3.0.
        """
        self.router.table = {"boom.example": Route(RouteKind.RELAY, agent="explode")}
        self.makeScheduler(FakeAgent(self.clock))
        queueID = self.enqueue(makeEnvelope("a@boom.example"))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.queue.recipients(queueID)[0].lastReply.enhanced, "4.3.0")  # type: ignore[union-attr]

    def test_unknownAgentDefers(self) -> None:
        """
        A route to an agent that is not configured defers with 451 4.3.5
        and logs an error, without bouncing.
        """
        self.router.table = {"x.example": Route(RouteKind.RELAY, agent="nope")}
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@x.example"))
        self.clock.advance(0)
        self.assertEqual(self.queue.recipients(queueID)[0].lastReply.enhanced, "4.3.5")  # type: ignore[union-attr]
        self.assertEqual(agent.deliveries, [])
        [event] = [e for e in self.events if e.get("agent") == "nope" and e["log_level"] == LogLevel.error]
        self.assertEqual(event["queueID"], queueID)

    def test_refusedAtDelivery(self) -> None:
        """
        A route refused at delivery time fails the recipient with the
        route's reply and bounces; a 4xx refusal defers it.
        """
        self.router.table = {
            "gone.example": Route.refuse(SMTPReply(550, "5.1.2", "domain gone")),
            "later.example": Route.refuse(SMTPReply(450, "4.3.2", "not now")),
        }
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@gone.example", "b@later.example"))
        self.clock.advance(0)
        [bounce] = [d for d in agent.deliveries if d.envelope.sender is None]
        self.assertIn(b"Status: 5.1.2", bounce.body)
        [r] = self.queue.recipients(queueID)
        self.assertEqual((r.index, r.nextAttempt), (1, START + 300))

    def test_successNotice(self) -> None:
        """
        A recipient delivered locally that asked for NOTIFY=SUCCESS gets a
        delivered notice.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        self.enqueue(
            Envelope(
                Address.parse("sender@example.org"),
                (Recipient(Address.parse("a@example.com"), notify=frozenset({"SUCCESS"})),),
            )
        )
        self.clock.advance(0)
        [notice] = self.notices(agent)
        self.assertEqual(notice["Subject"], "Successful Mail Delivery Report")

    def test_routeRecorded(self) -> None:
        """
        A deferred recipient's route name is recorded, for C{ETRN #name}.
        """
        self.router.table = {
            "x.example": Route(RouteKind.RELAY, agent="local", nexthop="x.example", name="smart")
        }
        self.makeScheduler(FakeAgent(self.clock, reply=lambda a: GREYLISTED))
        self.enqueue(makeEnvelope("a@x.example"))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.queue.flush(Selector(route="smart"))), 1)

    def test_flushWakes(self) -> None:
        """
        A flush makes the scheduler try deferred mail at once.
        """
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        self.clock.advance(10)
        agent.reply = lambda a: OK
        self.successResultOf(self.queue.flush(Selector(domain="example.com")))
        self.clock.advance(0)
        self.assertEqual([d.at for d in agent.deliveries], [START, START + 10])
        self.assertEqual(self.queue.queueIDs(), [])

    def test_delayWarningPerDomain(self) -> None:
        """
        A per-domain schedule sets that domain's retry times.
        """
        schedule = RetrySchedule(
            jitter=0, domains=(("fast.example", RetrySchedule(jitter=0, firstRetry=10)),)
        )
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED)
        self.makeScheduler(agent, schedule=schedule)
        fast = self.enqueue(makeEnvelope("a@fast.example"))
        self.clock.advance(0)
        self.assertEqual(self.queue.recipients(fast)[0].nextAttempt, START + 10)


class SchedulerLimitTests(SchedulerTestsMixin):
    """
    Concurrency limits, unreachable destinations, timeouts and stopping.
    """

    def test_concurrencyLimits(self) -> None:
        """
        No more than C{maxConcurrent} deliveries run at once, nor more than
        C{perDestination} to one destination; all complete eventually (some
        after waiting in the queue, put back for the busy agent).
        """
        self.router.table = {
            "a.example": Route(RouteKind.RELAY, agent="relay", nexthop="a.example"),
            "b.example": Route(RouteKind.RELAY, agent="relay", nexthop="b.example"),
        }
        agent = FakeAgent(self.clock, "relay", manual=True)
        scheduler = self.makeScheduler(
            agent, maxConcurrent=3, perDestination=2, maxPerDestination=2, maxPerAgent=3
        )
        for n in range(10):
            self.enqueue(makeEnvelope(f"u{n}@a.example"))
            self.enqueue(makeEnvelope(f"u{n}@b.example"))
        self.clock.advance(0)
        perDestination: dict[str | None, int] = {}
        worst: dict[str | None, int] = {}
        answered = 0
        for _ in range(100):
            if answered == 20:
                break
            pending = [d for d in agent.deliveries if not d.deferred.called]
            if not pending:
                runUntilIdle(self.clock, self.clock.seconds() + BUSY_RETRY)
                continue
            self.assertLessEqual(len(pending), 3)
            for d in pending:
                perDestination[d.nexthop] = perDestination.get(d.nexthop, 0) + 1
            for hop, count in perDestination.items():
                worst[hop] = max(worst.get(hop, 0), count)
            perDestination.clear()
            agent.answer(pending[0])
            answered += 1
            self.clock.advance(0)
        self.assertEqual(agent.mostActive, 3)
        self.assertEqual(worst, {"a.example": 2, "b.example": 2})
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(scheduler.deliveries, 0)

    def test_windowGrows(self) -> None:
        """
        A destination's window grows after successful deliveries, up to
        C{maxPerDestination}.
        """
        agent = FakeAgent(self.clock)
        scheduler = self.makeScheduler(agent, perDestination=1, maxPerDestination=3)
        windows = []
        for _ in range(6):
            self.enqueue(makeEnvelope("a@example.com"))
            self.clock.advance(0)
            windows.append(scheduler._destinations[("local", None)].window)
        self.assertEqual(windows, [2, 2, 3, 3, 3, 3])

    def test_deadDestination(self) -> None:
        """
        After a connection-level failure, other mail for that destination
        is deferred without an attempt for a minute; other destinations
        are unaffected; after the minute it is tried again.
        """
        self.router.table = {
            "down.example": Route(RouteKind.RELAY, agent="relay", nexthop="down.example"),
        }
        agent = FakeAgent(
            self.clock, "relay", reply=lambda a: UNREACHABLE if a.endswith("down.example") else OK
        )
        local = FakeAgent(self.clock)
        self.makeScheduler(agent, local)
        first = self.enqueue(makeEnvelope("a@down.example"))
        self.clock.advance(0)
        self.assertEqual(len(agent.deliveries), 1)
        self.clock.advance(30)
        second = self.enqueue(makeEnvelope("b@down.example"))
        self.enqueue(makeEnvelope("c@example.com"))
        self.clock.advance(0)
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(len(local.deliveries), 1)
        [r] = self.queue.recipients(second)
        self.assertEqual((r.attempts, r.lastReply, r.nextAttempt), (1, UNREACHABLE, START + 30 + 300))
        self.clock.advance(270)
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@down.example"], ["a@down.example"]])
        self.assertEqual(self.queue.recipients(first)[0].attempts, 2)

    def test_agentTimeout(self) -> None:
        """
        An agent that never answers is given up on after C{leaseSeconds};
        its recipients are deferred with 451 4.4.1.
        """
        agent = FakeAgent(self.clock, manual=True)
        self.makeScheduler(agent, leaseSeconds=600.0)
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        self.clock.advance(599)
        self.assertEqual(self.queue.recipients(queueID)[0].state, RecipientState.LEASED)
        self.clock.advance(1)
        [r] = self.queue.recipients(queueID)
        self.assertEqual(
            (r.state, r.lastReply.enhanced if r.lastReply else ""), (RecipientState.READY, "4.4.1")
        )

    def test_stopWaitsForDeliveries(self) -> None:
        """
        Stopping waits for deliveries under way to be recorded, and claims
        nothing new.
        """
        agent = FakeAgent(self.clock, manual=True)
        scheduler = self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        d = scheduler.stopService()
        self.assertNoResult(d)
        self.enqueue(makeEnvelope("b@example.com"))
        self.clock.advance(0)
        agent.answer(agent.deliveries[0])
        self.successResultOf(d)
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(len(self.queue.queueIDs()), 1)

    def test_stopTimeout(self) -> None:
        """
        Stopping gives up waiting after C{stopTimeout}; the lease stays for
        the next start to recover.
        """
        agent = FakeAgent(self.clock, manual=True)
        scheduler = self.makeScheduler(agent, stopTimeout=5.0, leaseSeconds=3600.0)
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.clock.advance(0)
        d = scheduler.stopService()
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(self.queue.recipients(queueID)[0].state, RecipientState.LEASED)

    def test_claimAhead(self) -> None:
        """
        The scheduler leases no more than C{claimAhead} recipients at once,
        and claims more as deliveries finish.
        """
        agent = FakeAgent(self.clock, manual=True)
        self.makeScheduler(agent, claimAhead=2, maxConcurrent=10)
        for n in range(5):
            self.enqueue(makeEnvelope(f"u{n}@example.com"))
        self.clock.advance(0)
        self.assertEqual(len(self.successResultOf(self.queue.list(Selector(state=RecipientState.LEASED)))), 2)
        for _ in range(5):
            agent.answer(next(d for d in agent.deliveries if not d.deferred.called))
        self.assertEqual(self.queue.queueIDs(), [])


class SchedulerAgentLimitTests(SchedulerTestsMixin):
    """
    Each delivery agent instance has its own share of the deliveries, so
    one stuck on its next hops (a relay waiting for a dead resolver) does
    not hold up the others.
    """

    def stuckRelay(self) -> FakeAgent:
        """
        Route C{dN.test} through a C{relay} agent that never answers, one
        next hop per domain (so that no destination window is the limit).
        """
        self.router.table = {
            f"d{n}.test": Route(RouteKind.RELAY, agent="relay", nexthop=f"d{n}.test") for n in range(100)
        }
        return FakeAgent(self.clock, "relay", manual=True)

    def test_defaultPerAgent(self) -> None:
        """
        By default an agent may take four fifths of C{maxConcurrent},
        leaving at least one slot to the others when there are two.
        """
        self.assertEqual(
            [defaultPerAgent(n) for n in (1, 2, 3, 5, 10, 50)],
            [1, 1, 2, 4, 8, 40],
        )
        scheduler = self.makeScheduler(FakeAgent(self.clock), maxConcurrent=5)
        self.assertEqual((scheduler.agentLimit("local"), scheduler.agentLimit("relay")), (4, 4))

    def test_localWhileRemoteStuck(self) -> None:
        """
        With C{maxConcurrent} reached by remote deliveries that never
        finish (and more remote mail leased and waiting than C{claimAhead}),
        a local message queued afterwards is still claimed and delivered
        at once.
        """
        relay = self.stuckRelay()
        local = FakeAgent(self.clock)
        scheduler = self.makeScheduler(relay, local, maxConcurrent=5, claimAhead=8)
        for n in range(12):
            self.enqueue(makeEnvelope(f"user@d{n}.test"))
        self.clock.advance(0)
        self.assertEqual((relay.active, scheduler.deliveries), (4, 4))
        queueID = self.enqueue(makeEnvelope("someone@localhost.example"))
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in local.deliveries], [["someone@localhost.example"]])
        self.assertNotIn(queueID, self.queue.queueIDs())
        self.assertEqual((relay.active, scheduler.deliveries), (4, 4))

    def test_stuckAgentPutsBack(self) -> None:
        """
        Beyond C{AGENT_AHEAD} recipients per slot waiting for a stuck
        agent, further recipients go back to the queue uncounted, with
        L{AGENT_BUSY} and due C{BUSY_RETRY} later, and claims pause for
        C{BUSY_PAUSE}: local mail queued behind them is still delivered,
        the leases held stay bounded, and the put-back mail is tried again
        once the agent answers.
        """
        relay = self.stuckRelay()
        local = FakeAgent(self.clock)
        self.makeScheduler(relay, local, maxConcurrent=3, claimAhead=4, agentLimits={"relay": 2})
        remote = [self.enqueue(makeEnvelope(f"user@d{n}.test")) for n in range(40)]
        self.clock.advance(0)
        runUntilIdle(self.clock, START + 5)
        states = [(r.state, r.lastReply) for q in remote for r in self.queue.recipients(q)]
        # Claims pause BUSY_PAUSE after each put-back: two more a second
        # (claimAhead less the two delivering), not the whole queue at once.
        self.assertEqual(states.count((RecipientState.READY, AGENT_BUSY)), 2 * (5 / BUSY_PAUSE + 1))
        runUntilIdle(self.clock, START + 20)
        self.assertEqual(relay.active, 2)
        leased = self.successResultOf(self.queue.list(Selector(state=RecipientState.LEASED)))
        # 2 delivering, 8 (AGENT_AHEAD * 2) waiting.
        self.assertEqual(len(leased), 10)
        putBack = [r for q in remote for r in self.queue.recipients(q) if r.state is RecipientState.READY]
        self.assertEqual(len(putBack), 30)
        self.assertEqual(
            {(r.attempts, r.lastReply, r.nextAttempt is not None and r.nextAttempt > START) for r in putBack},
            {(0, AGENT_BUSY, True)},
        )
        queueID = self.enqueue(makeEnvelope("someone@localhost.example"))
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in local.deliveries], [["someone@localhost.example"]])
        self.assertNotIn(queueID, self.queue.queueIDs())
        for _ in range(200):
            pending = [d for d in relay.deliveries if not d.deferred.called]
            if pending:
                relay.answer(pending[0])
                self.clock.advance(0)
            elif self.queue.queueIDs():
                runUntilIdle(self.clock, self.clock.seconds() + BUSY_RETRY)
            else:
                break
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(len(relay.deliveries), 40)
        self.assertEqual(relay.mostActive, 2)

    def test_agentLimit(self) -> None:
        """
        An agent runs no more deliveries at once than its own limit, even
        with C{maxConcurrent} to spare.
        """
        relay = self.stuckRelay()
        scheduler = self.makeScheduler(relay, maxConcurrent=10, agentLimits={"relay": 3})
        for n in range(6):
            self.enqueue(makeEnvelope(f"user@d{n}.test"))
        self.clock.advance(0)
        self.assertEqual((relay.active, scheduler.deliveries), (3, 3))
        relay.answer(relay.deliveries[0])
        self.clock.advance(0)
        self.assertEqual((relay.active, len(relay.deliveries)), (3, 4))

    def test_wholeProcessLimit(self) -> None:
        """
        All agents together run no more than C{maxConcurrent} deliveries,
        whatever their own limits.
        """
        relay = self.stuckRelay()
        local = FakeAgent(self.clock, manual=True)
        scheduler = self.makeScheduler(relay, local, maxConcurrent=4, maxPerAgent=3)
        for n in range(5):
            self.enqueue(makeEnvelope(f"user@d{n}.test"))
        for n in range(5):
            self.enqueue(makeEnvelope(f"user{n}@localhost.example"))
        self.clock.advance(0)
        self.assertEqual((relay.active, local.active, scheduler.deliveries), (3, 1, 4))
        relay.answer(relay.deliveries[0])
        self.clock.advance(0)
        self.assertEqual((relay.active, local.active, scheduler.deliveries), (3, 1, 4))
        local.answer(local.deliveries[0])
        self.clock.advance(0)
        self.assertEqual((relay.active, local.active, scheduler.deliveries), (3, 1, 4))


class SchedulerAgentLimitSQLiteTests(SchedulerTestsMixin):
    """
    New mail offered by the SQLite queue (L{ILeaseOffers}) is not refused
    while another agent's leases wait.
    """

    def test_offeredWhileRemoteWaits(self) -> None:
        """
        With more remote recipients leased and waiting for a stuck agent
        than C{claimAhead}, new local mail is still offered to the
        scheduler and delivered.
        """
        self.queue = SchedulerWithSQLiteTests.sqliteQueue(self)  # type: ignore[arg-type]
        relay = SchedulerAgentLimitTests.stuckRelay(self)  # type: ignore[arg-type]
        local = FakeAgent(self.clock)
        scheduler = self.makeScheduler(relay, local, maxConcurrent=5, claimAhead=6)
        for n in range(12):
            self.enqueue(makeEnvelope(f"user@d{n}.test"))
        self.clock.advance(0)
        self.assertEqual((relay.active, scheduler.deliveries), (4, 4))
        self.assertGreater(scheduler._room(), 0)
        before = self.queue.transactions  # type: ignore[attr-defined]
        self.enqueue(makeEnvelope("someone@localhost.example"))
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in local.deliveries], [["someone@localhost.example"]])
        # Stored leased and recorded: no claim transaction in between.
        self.assertEqual(self.queue.transactions - before, 2)  # type: ignore[attr-defined]


def customerOnly(address: Address) -> bool:
    """
    Hold C{customer.test} and its subdomains for ETRN.
    """
    return address.domain == "customer.test" or address.domain.endswith(".customer.test")


class SchedulerETRNTests(SchedulerTestsMixin):
    """
    Hold-for-ETRN domains: held without attempts, released by a flush, and
    still warned about and expired on the normal schedule.
    """

    def test_heldUntilFlush(self) -> None:
        """
        Mail for a hold domain is routed and held in state ETRN with no
        attempt and its delay-warning time as next attempt, while other
        mail is delivered; a flush then delivers it at once.
        """
        self.router.table = {
            "customer.test": Route(RouteKind.RELAY, agent="local", nexthop="mx.customer.test", name="cust"),
        }
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent, holdForETRN=customerOnly)
        held = self.enqueue(makeEnvelope("a@customer.test", "b@example.com"))
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in agent.deliveries], [["b@example.com"]])
        [r] = self.queue.recipients(held)
        self.assertEqual(
            (r.state, r.attempts, r.nextAttempt, r.released, r.lastReply and r.lastReply.code),
            (RecipientState.ETRN, 0, START + 4 * 3600, False, 450),
        )
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [START + 4 * 3600])
        self.clock.advance(600)
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(self.successResultOf(self.queue.flush(Selector(route="cust"))), 1)
        self.clock.advance(0)
        self.assertEqual(
            [(d.addresses, d.nexthop, d.at) for d in agent.deliveries[1:]],
            [(["a@customer.test"], "mx.customer.test", START + 600)],
        )
        self.assertEqual(self.queue.queueIDs(), [])

    def test_heldWarnedAndExpired(self) -> None:
        """
        Mail held for ETRN and never asked for gets one delay notice at
        the warning time and bounces with status 4.4.7 at the end of its
        lifetime, without ever being attempted.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent, holdForETRN=customerOnly)
        self.enqueue(makeEnvelope("a@customer.test"))
        runUntilIdle(self.clock)
        self.assertEqual([d for d in agent.deliveries if d.envelope.sender is not None], [])
        self.assertEqual([d.at for d in agent.deliveries], [START + 4 * 3600, START + 5 * DAY])
        delayNotice, bounce = self.notices(agent)
        self.assertEqual(delayNotice["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(bounce["Subject"], "Undelivered Mail Returned to Sender")
        status = subpart(bounce, 1, 1)
        self.assertEqual((status["Action"], status["Status"]), ("failed", "4.4.7"))
        self.assertIn("ETRN", status["Diagnostic-Code"])
        self.assertEqual(self.queue.queueIDs(), [])

    def test_releasedAndDeferredIsHeldAgain(self) -> None:
        """
        A released recipient that is deferred again counts the attempt and
        waits for the next ETRN (its next housekeeping time), not for the
        backoff schedule.
        """
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED)
        self.makeScheduler(agent, holdForETRN=customerOnly)
        queueID = self.enqueue(makeEnvelope("a@customer.test"))
        self.clock.advance(0)
        self.clock.advance(100)
        self.successResultOf(self.queue.flush(Selector(domain="@customer.test")))
        self.clock.advance(0)
        self.assertEqual([d.at for d in agent.deliveries], [START + 100])
        [r] = self.queue.recipients(queueID)
        self.assertEqual(
            (r.state, r.attempts, r.nextAttempt, r.lastReply, r.released),
            (RecipientState.ETRN, 1, START + 4 * 3600, GREYLISTED, False),
        )
        runUntilIdle(self.clock, until=START + 3 * 3600)
        self.assertEqual(len(agent.deliveries), 1)

    def test_flushForgetsUnreachableDestination(self) -> None:
        """
        A flushed recipient is tried even while its destination is
        remembered as unreachable, and the memory is reset: ETRN means the
        destination is back.
        """
        self.router.table = {
            "down.example": Route(RouteKind.RELAY, agent="relay", nexthop="down.example"),
        }
        agent = FakeAgent(self.clock, "relay", reply=lambda a: UNREACHABLE)
        scheduler = self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@down.example"))
        self.clock.advance(0)
        self.clock.advance(10)
        self.enqueue(makeEnvelope("b@down.example"))
        self.clock.advance(0)
        self.assertEqual(len(agent.deliveries), 1)
        agent.reply = lambda a: OK
        self.assertEqual(self.successResultOf(self.queue.flush(Selector(domain="down.example"))), 2)
        self.clock.advance(0)
        self.assertEqual(
            sorted(a for d in agent.deliveries[1:] for a in d.addresses),
            ["a@down.example", "b@down.example"],
        )
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(scheduler._destinations[("relay", "down.example")].deadUntil, 0.0)

    def test_refusedHeldRecipientBounces(self) -> None:
        """
        A recipient of a hold domain that routing now refuses is bounced at
        once rather than held.
        """
        self.router.table = {
            "customer.test": Route(RouteKind.REFUSE, reply=UNKNOWN),
        }
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent, holdForETRN=customerOnly)
        self.enqueue(makeEnvelope("a@customer.test"))
        self.clock.advance(0)
        self.clock.advance(0)
        [bounce] = self.notices(agent)
        self.assertEqual(bounce["Subject"], "Undelivered Mail Returned to Sender")

    def test_fromConfigHold(self) -> None:
        """
        L{schedulerFromConfig} passes the caller's hold predicate on.
        """
        scheduler = schedulerFromConfig(
            Section("[scheduler]", {}),
            self.clock,
            self.queue,
            self.router,
            {"local": FakeAgent(self.clock)},
            "mx.example",
            holdForETRN=customerOnly,
        )
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        queueID = self.enqueue(makeEnvelope("a@customer.test"))
        self.clock.advance(0)
        self.assertEqual(self.queue.recipients(queueID)[0].state, RecipientState.ETRN)


class SchedulerConfigTests(SynchronousTestCase):
    """
    L{schedulerFromConfig} reads C{[scheduler]}.
    """

    def test_fromConfig(self) -> None:
        """
        Limits and the retry schedule come from the section; unknown keys are
        refused.
        """
        clock = Clock()
        queue = MemoryQueue(clock)
        section = Section(
            "[scheduler]", {"max_concurrent": 7, "per_destination": 2, "first_retry": 60, "dead_time": 10}
        )
        scheduler = schedulerFromConfig(section, clock, queue, FakeRouter(), {}, "mx.example")
        self.assertEqual((scheduler.maxConcurrent, scheduler.perDestination, scheduler.deadTime), (7, 2, 10))
        self.assertEqual(scheduler._schedule.firstRetry, 60)
        self.assertEqual(scheduler.maxPerAgent, defaultPerAgent(7))
        self.assertRaises(
            ConfigError,
            schedulerFromConfig,
            Section("[scheduler]", {"max_concurent": 7}),
            clock,
            queue,
            FakeRouter(),
            {},
            "mx.example",
        )

    def test_agentLimitsFromConfig(self) -> None:
        """
        C{max_per_agent} replaces the default limit of every agent, and a
        C{[scheduler.agents."NAME"]} table sets one agent's; a table for an
        agent that is not configured, or with another key, is refused.
        """
        clock = Clock()
        queue = MemoryQueue(clock)
        agents = {"local": FakeAgent(clock), "relay": FakeAgent(clock, "relay")}
        section = Section(
            "[scheduler]",
            {"max_concurrent": 20, "max_per_agent": 12, "agents": {"relay": {"max_concurrent": 5}}},
        )
        scheduler = schedulerFromConfig(section, clock, queue, FakeRouter(), agents, "mx.example")
        self.assertEqual((scheduler.agentLimit("local"), scheduler.agentLimit("relay")), (12, 5))
        wrongs: list[tuple[dict[str, object], str]] = [
            ({"agents": {"outbound": {"max_concurrent": 5}}}, "no [delivery.outbound]"),
            ({"agents": {"relay": {"max_concurent": 5}}}, "needs 'max_concurrent'"),
            ({"agents": {"relay": {"max_concurrent": 0}}}, "at least 1"),
            ({"agents": {"relay": 5}}, "must be a table"),
        ]
        for wrong, message in wrongs:
            error = self.assertRaises(
                ConfigError,
                schedulerFromConfig,
                Section("[scheduler]", wrong),
                clock,
                queue,
                FakeRouter(),
                agents,
                "mx.example",
            )
            self.assertIn(message, str(error))


class SchedulerBounceTests(SchedulerTestsMixin):
    """
    Recipients an operator bounced (C{mailfw queue bounce}) are failed with
    a DSN instead of being delivered.
    """

    def countOpens(self) -> list[str]:
        """
        Count the queue's L{MemoryQueue.openBody} calls.
        """
        opened: list[str] = []
        openBody = self.queue.openBody

        def counting(queueID: str) -> Deferred[IMessageBody]:
            opened.append(queueID)
            return openBody(queueID)

        self.queue.openBody = counting  # type: ignore[method-assign]
        return opened

    def test_bounceSendsFailureDSN(self) -> None:
        """
        Bounced recipients leave the queue at once, without routing or
        delivery (only the DSN is routed and delivered), and the sender
        gets one failure DSN with Status 5.0.0 for them.
        """
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED if a.endswith("@example.com") else OK)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@example.com", "b@example.com"]])
        self.clock.advance(10)
        del self.router.calls[:]
        self.assertEqual(
            self.successResultOf(self.queue.bounce(Selector(queueIDs=(queueID,), domain="example.com"))), 2
        )
        self.clock.advance(0)
        self.assertNotIn(queueID, self.queue.queueIDs())
        [bounce] = self.notices(agent)
        [notice] = [d for d in agent.deliveries if d.envelope.sender is None]
        self.assertEqual((notice.addresses, notice.at), (["sender@example.org"], START + 10))
        self.assertEqual(self.router.calls, [(Address.parse("sender@example.org"), None)])
        self.assertEqual(len(agent.deliveries), 2)
        report = notice.body.split(b"message/delivery-status")[1]
        self.assertIn(b"Final-Recipient: rfc822; a@example.com", report)
        self.assertIn(b"Final-Recipient: rfc822; b@example.com", report)
        self.assertIn(b"Action: failed", report)
        self.assertIn(b"Status: 5.0.0", report)
        self.assertIn(b"smtp; 554 5.0.0 Message returned by the mail system administrator", report)
        self.assertEqual(bounce.get_content_type(), "multipart/report")

    def test_bounceOneOfTwo(self) -> None:
        """
        Bouncing one recipient of a deferred message fails only that one;
        the other waits for its retry.
        """
        agent = FakeAgent(self.clock, reply=lambda a: OK if a == "sender@example.org" else GREYLISTED)
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com", "b@example.net"))
        self.clock.advance(0)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(self.queue.bounce(Selector(domain="example.com"))), 1)
        self.clock.advance(0)
        self.assertEqual(
            [str(r.recipient.address) for r in self.queue.recipients(queueID)], ["b@example.net"]
        )
        [notice] = [d for d in agent.deliveries if d.envelope.sender is None]
        self.assertIn(b"Final-Recipient: rfc822; a@example.com", notice.body)
        self.assertNotIn(
            b"b@example.net", notice.body.split(b"message/delivery-status")[1].split(b"\r\n--")[0]
        )

    def test_notifyNeverSuppressesBounce(self) -> None:
        """
        With NOTIFY=NEVER a bounced recipient leaves the queue without a
        DSN, without the agent being called and without reading the body.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        opened = self.countOpens()
        never = frozenset({"NEVER"})
        self.enqueue(
            Envelope(
                Address.parse("sender@example.org"),
                (Recipient(Address.parse("a@example.com"), notify=never),),
            )
        )
        self.assertEqual(self.successResultOf(self.queue.hold(Selector())), 1)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(self.queue.bounce(Selector(state=RecipientState.HOLD))), 1)
        self.clock.advance(0)
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual((agent.deliveries, opened, self.router.calls), ([], [], []))

    def test_bounceOfABounceDropped(self) -> None:
        """
        A bounced message from the null sender is dropped with a log event,
        not bounced, and its body is never read.
        """
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        opened = self.countOpens()
        queueID = self.enqueue(makeEnvelope("a@example.com", sender=None))
        self.successResultOf(self.queue.hold(Selector()))
        self.clock.advance(0)
        self.successResultOf(self.queue.bounce(Selector(queueIDs=(queueID,))))
        self.clock.advance(0)
        self.assertEqual((self.queue.queueIDs(), agent.deliveries, opened), ([], [], []))
        [event] = [e for e in self.events if e.get("queueID") == queueID and e["log_level"] == LogLevel.warn]
        self.assertEqual(event["recipient"], "a@example.com")


class SchedulerWithSQLiteTests(SchedulerTestsMixin):
    """
    The scheduler works the same against the SQLite queue (with its
    threads replaced by synchronous calls).
    """

    def sqliteQueue(self, writer: Any = None) -> Any:
        from pathlib import Path

        from mailfw.queue._sqlite import SQLiteQueue, SynchronousExecutor

        path = Path(self.mktemp())
        path.mkdir()
        return SQLiteQueue(
            path / "q.sqlite",
            self.clock,
            writer=writer or SynchronousExecutor(),
            reader=SynchronousExecutor(),
            spool=SynchronousExecutor(),
            deliver=lambda f: f(),
        )

    def startCommit(self, envelope: Envelope) -> Deferred[str]:
        incoming = self.queue.receive(envelope)
        incoming.write(b"Subject: hi\r\n\r\nhello\r\n")
        return incoming.commit()

    def test_deliverAndBounce(self) -> None:
        """
        Mail in an L{SQLiteQueue} is delivered, the failed recipient
        bounced, and the bounce delivered in turn.
        """
        self.queue = self.sqliteQueue()
        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN if a.startswith("bad") else OK)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("bad@example.com", "good@example.com"))
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(
            sorted((d.envelope.senderText, tuple(d.addresses)) for d in agent.deliveries),
            [("", ("sender@example.org",)), ("sender@example.org", ("bad@example.com", "good@example.com"))],
        )
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])

    def test_newMailWithoutClaim(self) -> None:
        """
        A new message reaches the scheduler leased in the transaction that
        stored it: it is delivered in two write transactions (store, record)
        instead of three (store, claim, record), on the reactor turn after
        the commit (so the client has its 250 first).
        """
        self.queue = self.sqliteQueue()
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent)
        before = self.queue.transactions  # type: ignore[attr-defined]
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        self.assertEqual(agent.deliveries, [])
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@example.com", "b@example.com"]])
        self.assertEqual(self.queue.transactions - before, 2)  # type: ignore[attr-defined]
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])

    def test_newMailBeyondRoomIsClaimed(self) -> None:
        """
        When the scheduler has no room for a new message it is stored ready
        and claimed later, when deliveries finish.
        """
        self.queue = self.sqliteQueue()
        agent = FakeAgent(self.clock, manual=True)
        self.makeScheduler(agent, maxConcurrent=1, claimAhead=1)
        self.enqueue(makeEnvelope("a@example.com"))
        self.enqueue(makeEnvelope("b@example.com"))
        self.clock.advance(0)
        states = sorted(
            (str(m.recipients[0].recipient.address), m.recipients[0].state)
            for m in self.successResultOf(self.queue.list(Selector()))
        )
        self.assertEqual(
            states, [("a@example.com", RecipientState.LEASED), ("b@example.com", RecipientState.READY)]
        )
        agent.answer(agent.deliveries[0])
        self.clock.advance(0)
        agent.answer(agent.deliveries[1])
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@example.com"], ["b@example.com"]])
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])

    def test_offersWithinRoom(self) -> None:
        """
        The messages of one group commit are leased only as far as the
        scheduler has room for them all; the others are stored ready and
        claimed as deliveries finish.
        """
        from tests.test_queue_sqlite import ManualExecutor

        writer = ManualExecutor()
        self.queue = self.sqliteQueue(writer)
        agent = FakeAgent(self.clock, manual=True)
        self.makeScheduler(agent, maxConcurrent=2, claimAhead=2)
        writer.run()  # the start-up recovery
        commits = [self.startCommit(makeEnvelope(f"r{i}@example.com")) for i in range(5)]
        writer.run()
        for d in commits:
            self.successResultOf(d)
        states = [m.recipients[0].state for m in self.successResultOf(self.queue.list(Selector()))]
        self.assertEqual(sorted(s.value for s in states), ["leased", "leased", "ready", "ready", "ready"])
        for _ in range(10):
            self.clock.advance(0)
            writer.run()
            for delivery in agent.deliveries:
                if not delivery.deferred.called:
                    agent.answer(delivery)
            writer.run()
        self.assertEqual(
            sorted(d.addresses[0] for d in agent.deliveries), [f"r{i}@example.com" for i in range(5)]
        )
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])

    def test_restartWhileCommitting(self) -> None:
        """
        A message whose lease was made before the scheduler restarted, and
        whose commit lands before the restart's recovery returns it to
        ready, is delivered once (claimed again), not twice.
        """
        from tests.test_queue_sqlite import ManualExecutor

        writer = ManualExecutor()
        self.queue = self.sqliteQueue(writer)
        agent = FakeAgent(self.clock, manual=True)
        scheduler = self.makeScheduler(agent)
        writer.run()
        committed = self.startCommit(makeEnvelope("a@example.com"))
        self.successResultOf(scheduler.stopService())
        scheduler.startService()
        writer.run()  # the insert, then the recovery, in one batch
        self.successResultOf(committed)
        for _ in range(5):
            self.clock.advance(0)
            writer.run()
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@example.com"]])
        agent.answer(agent.deliveries[0])
        writer.run()
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])

    def test_offeredAfterStopRecovered(self) -> None:
        """
        A message committed while the scheduler stops is not lost: its
        lease is recovered and it is delivered after the next start.
        """
        self.queue = self.sqliteQueue()
        agent = FakeAgent(self.clock)
        scheduler = self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com"))
        self.successResultOf(scheduler.stopService())
        self.clock.advance(0)
        self.assertEqual(agent.deliveries, [])
        [message] = self.successResultOf(self.queue.list(Selector()))
        self.assertEqual(message.recipients[0].state, RecipientState.LEASED)
        scheduler.startService()
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@example.com"]])

    def test_holdAndFlush(self) -> None:
        """
        With an L{SQLiteQueue}, mail for a hold domain waits in state ETRN
        and is delivered after a flush.
        """
        self.queue = self.sqliteQueue()
        agent = FakeAgent(self.clock)
        self.makeScheduler(agent, holdForETRN=customerOnly)
        self.enqueue(makeEnvelope("a@customer.test"))
        self.clock.advance(0)
        [_message] = self.successResultOf(self.queue.list(Selector(state=RecipientState.ETRN)))
        self.assertEqual(agent.deliveries, [])
        self.assertEqual(self.successResultOf(self.queue.flush(Selector(domain="customer.test"))), 1)
        self.clock.advance(0)
        self.assertEqual([d.addresses for d in agent.deliveries], [["a@customer.test"]])
        self.assertEqual(self.successResultOf(self.queue.list(Selector())), [])
