"""
Tests for L{mailfw.tracing}: one trace per message, from MAIL through
every delivery attempt, with OpenTelemetry's in-memory span exporter.

The tests that need OpenTelemetry skip only when the C{mailfw[otel]} extra
is not installed (the C{test} extra installs it).
"""

from __future__ import annotations

import os
import unittest
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw import tracing
from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient
from mailfw.queue._memory import MemoryQueue
from mailfw.queue._schema import envelopeFromJSON, envelopeToJSON
from mailfw.reply import SMTPReply
from mailfw.scheduling._retry import RetrySchedule
from mailfw.scheduling._scheduler import Scheduler
from tests._smtpdoubles import PROLOGUE, StagePolicy, connect
from tests.test_delivery_relay import deliver, makeAgent
from tests.test_scheduler import FakeAgent, FakeRouter, runUntilIdle

try:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    HAVE_OTEL = True
except ImportError:  # the mailfw[otel] extra is not installed
    HAVE_OTEL = False

NEEDS_OTEL = unittest.skipIf(not HAVE_OTEL, "mailfw[otel] (opentelemetry-sdk) is not installed")

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"
DEFERRED = SMTPReply(451, "4.3.0", "try later")
OK = SMTPReply(250, "2.0.0", "ok")


def _spansByName(spans: Sequence[Any]) -> dict[str, list[Any]]:
    byName: dict[str, list[Any]] = {}
    for span in spans:
        byName.setdefault(span.name, []).append(span)
    return byName


class _Traced(SynchronousTestCase):
    """
    Tracing on, into an in-memory exporter, for the duration of a test.
    """

    def setUp(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        tracing.enable(provider)
        self.addCleanup(provider.shutdown)
        self.addCleanup(tracing.disable)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.queue = MemoryQueue(self.clock, leaseSeconds=900)

    def receive(self) -> str:
        """
        One message over SMTP into the queue, with one policy asked at each
        stage; returns its queue ID.
        """
        conn = connect(queue=self.queue, clock=self.clock, policies=(StagePolicy("checker"),))  # type: ignore[arg-type]
        conn.send(PROLOGUE + MESSAGE)
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"354", b"250"])
        [queueID] = self.queue.queueIDs()
        return queueID

    def scheduler(self, agent: FakeAgent) -> Scheduler:
        scheduler = Scheduler(
            self.clock,
            self.queue,
            FakeRouter(),
            {agent.name: agent},
            "mx.example.org",
            RetrySchedule(jitter=0),
        )
        scheduler.startService()
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    def spans(self) -> dict[str, list[Any]]:
        return _spansByName(self.exporter.get_finished_spans())


@NEEDS_OTEL
class MessageTraceTests(_Traced):
    def test_receiveSpans(self) -> None:
        """
        A received message is one trace: the C{smtp.receive} root span with
        a child for each policy asked (sender, recipient, message), the
        RCPT routing and the queue commit; the root span carries the queue
        ID and the 250, and the queued envelope names it as its trace.
        """
        queueID = self.receive()
        spans = self.spans()
        [root] = spans["smtp.receive"]
        self.assertIsNone(root.parent)
        self.assertEqual(root.attributes["mailfw.queue_id"], queueID)
        self.assertEqual(root.attributes["smtp.reply.code"], 250)
        self.assertEqual(root.attributes["smtp.sender"], "sender@example.net")
        children = ["policy.sender", "route", "policy.recipient", "policy.message", "enqueue"]
        for name in children:
            [span] = spans[name]
            self.assertEqual(span.context.trace_id, root.context.trace_id, name)
            self.assertEqual(span.parent.span_id, root.context.span_id, name)
        self.assertEqual(spans["policy.sender"][0].attributes["mailfw.policy"], "checker")
        self.assertEqual(spans["enqueue"][0].attributes["smtp.reply.code"], 250)
        self.assertEqual(sorted(spans), sorted([*children, "smtp.receive"]))
        envelope = self.queue.envelope(queueID)
        context = root.context
        self.assertEqual(
            envelope.traceparent,
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}",
        )

    def test_deliveryJoinsTrace(self) -> None:
        """
        The scheduler's delivery attempt is a span of the message's trace,
        below the receive span, and the agent sees that attempt as the
        envelope's trace parent (for its own spans).
        """
        self.receive()
        agent = FakeAgent(self.clock)
        self.scheduler(agent)
        runUntilIdle(self.clock, until=self.clock.seconds() + 1)
        spans = self.spans()
        [root] = spans["smtp.receive"]
        [attempt] = spans["delivery"]
        self.assertEqual(attempt.context.trace_id, root.context.trace_id)
        self.assertEqual(attempt.parent.span_id, root.context.span_id)
        self.assertEqual(attempt.attributes["mailfw.agent"], "local")
        self.assertEqual(attempt.attributes["mailfw.attempt"], 1)
        self.assertEqual(attempt.attributes["mailfw.delivered"], 1)
        [delivery] = agent.deliveries
        self.assertEqual(delivery.envelope.traceparent.split("-")[2], f"{attempt.context.span_id:016x}")

    def test_retryJoinsTrace(self) -> None:
        """
        A deferred recipient's next attempt, an hour later, is a second
        C{delivery} span of the same trace (the trace context is stored
        with the queued message), marked as attempt 2; the first is marked
        failed with the 451.
        """
        self.receive()
        replies = [DEFERRED, OK]
        agent = FakeAgent(self.clock, reply=lambda address: replies.pop(0))
        self.scheduler(agent)
        runUntilIdle(self.clock, until=self.clock.seconds() + 1)
        self.assertEqual(len(agent.deliveries), 1)
        runUntilIdle(self.clock, until=self.clock.seconds() + 4 * 3600)
        self.assertEqual(len(agent.deliveries), 2)
        spans = self.spans()
        [root] = spans["smtp.receive"]
        first, second = sorted(spans["delivery"], key=lambda s: s.start_time)
        self.assertEqual(first.context.trace_id, root.context.trace_id)
        self.assertEqual(second.context.trace_id, root.context.trace_id)
        self.assertEqual((first.attributes["mailfw.attempt"], second.attributes["mailfw.attempt"]), (1, 2))
        self.assertEqual(first.attributes["smtp.reply.code"], 451)
        self.assertFalse(first.status.is_ok)
        self.assertEqual(second.attributes["mailfw.delivered"], 1)

    def test_retryInAnotherProcessJoinsTrace(self) -> None:
        """
        The trace context survives the queue's storage format: an envelope
        decoded from its stored JSON continues the same trace.
        """
        queueID = self.receive()
        stored = envelopeFromJSON(envelopeToJSON(self.queue.envelope(queueID)))
        span = tracing.startSpan("delivery", traceparent=stored.traceparent)
        tracing.endSpan(span, 250)
        spans = self.spans()
        [root] = spans["smtp.receive"]
        [attempt] = spans["delivery"]
        self.assertEqual(attempt.context.trace_id, root.context.trace_id)

    def test_abandonedTransaction(self) -> None:
        """
        A transaction ended by RSET ends its receive span as failed: no
        span is left open.
        """
        conn = connect(queue=self.queue, clock=self.clock)  # type: ignore[arg-type]
        conn.send(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRSET\r\n")
        self.assertEqual(conn.codes(), [b"250", b"250", b"250"])
        [root] = self.spans()["smtp.receive"]
        self.assertEqual(root.status.description, "transaction abandoned")

    def test_refusedSender(self) -> None:
        """
        A MAIL the policies refuse ends its span with the refusal.
        """
        refuse = StagePolicy(sender=_verdict(SMTPReply(550, "5.7.1", "no")))
        conn = connect(queue=self.queue, clock=self.clock, policies=(refuse,))  # type: ignore[arg-type]
        conn.send(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n")
        self.assertEqual(conn.codes(), [b"250", b"550"])
        spans = self.spans()
        [root] = spans["smtp.receive"]
        self.assertEqual(root.attributes["smtp.reply.code"], 550)
        self.assertEqual(spans["policy.sender"][0].attributes["smtp.reply.code"], 550)

    def test_relaySpans(self) -> None:
        """
        The SMTP relay's steps are spans below the attempt its envelope
        names: the MX lookup, the connection, the handshake (greeting,
        EHLO, STARTTLS) and the transaction with the remote replies.
        """
        attempt = tracing.startSpan("delivery")
        agent, network = makeAgent({"192.0.2.1": {}})
        envelope = Envelope(
            sender=Address("s", "example.org"),
            recipients=(Recipient(Address("a", "example.net")),),
            traceparent=tracing.traceparentOf(attempt),
        )
        [outcome] = deliver(agent, network, envelope)
        tracing.endSpan(attempt, outcome.reply.code)
        spans = self.spans()
        for name in ("dns", "connect", "handshake", "smtp.transaction"):
            [span] = spans[name]
            self.assertEqual(span.parent.span_id, attempt.get_span_context().span_id, name)
        transaction = spans["smtp.transaction"][0]
        self.assertEqual(transaction.attributes["net.peer.ip"], "192.0.2.1")
        self.assertEqual(list(transaction.attributes["smtp.replies"]), ["250 2.0.0"])
        self.assertFalse(spans["handshake"][0].attributes["tls.negotiated"])


def _verdict(reply: SMTPReply) -> Any:
    from mailfw.verdict import Verdict

    return Verdict(reply)


class TracingOffTests(SynchronousTestCase):
    """
    With tracing off, nothing is traced and no span is started.
    """

    def test_noSpans(self) -> None:
        """
        A message received and delivered with tracing off starts no span
        and stores no trace context.
        """
        self.assertFalse(tracing.enabled())

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("a span was started with tracing off")

        self.patch(tracing, "startSpan", refuse)
        clock = Clock()
        queue = MemoryQueue(clock)
        conn = connect(queue=queue, clock=clock, policies=(StagePolicy(),))  # type: ignore[arg-type]
        conn.send(PROLOGUE + MESSAGE)
        self.assertEqual(conn.codes()[-1], b"250")
        [queueID] = queue.queueIDs()
        self.assertEqual(queue.envelope(queueID).traceparent, "")
        agent = FakeAgent(clock)
        scheduler = Scheduler(clock, queue, FakeRouter(), {"local": agent}, "mx.example.org")
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        runUntilIdle(clock, until=clock.seconds() + 1)
        self.assertEqual(len(agent.deliveries), 1)
        self.assertEqual(agent.deliveries[0].envelope.traceparent, "")

    def test_helpersWithoutSpan(self) -> None:
        """
        The helpers accept the C{None} that stands for "no span".
        """
        tracing.endSpan(None, 250)
        self.assertEqual(tracing.traceparentOf(None), "")
        self.assertIsNone(tracing.childSpan(None, "x"))
        self.assertIsNone(tracing.continueSpan("", "x"))

        def call(policy: object) -> str:
            return "verdict"

        self.assertIs(tracing.tracedCall(None, "sender", call), call)


class StoredTraceTests(SynchronousTestCase):
    """
    The queue stores the trace context with the message.
    """

    def test_roundTrip(self) -> None:
        """
        C{traceparent} survives the queue's JSON encoding.
        """
        envelope = Envelope(
            sender=Address("a", "example.org"),
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        self.assertEqual(envelopeFromJSON(envelopeToJSON(envelope)), envelope)

    def test_oldRows(self) -> None:
        """
        An envelope stored before traces existed loads with no trace.
        """
        text = envelopeToJSON(Envelope(sender=None)).replace(',"traceparent":""', "")
        self.assertNotIn("traceparent", text)
        self.assertEqual(envelopeFromJSON(text), replace(Envelope(sender=None), traceparent=""))


class _Environment:
    """
    Sets environment variables for one test (the SDK reads C{os.environ}
    itself).
    """

    def __init__(self, case: SynchronousTestCase, **values: str) -> None:
        for name, value in values.items():
            old = os.environ.get(name)
            os.environ[name] = value
            case.addCleanup(_restore, name, old)


def _restore(name: str, old: str | None) -> None:
    if old is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = old


class EnvironmentTests(SynchronousTestCase):
    """
    L{tracing.configureFromEnvironment} follows the standard C{OTEL_*}
    variables.
    """

    def setUp(self) -> None:
        self.addCleanup(tracing.disable)

    def test_offByDefault(self) -> None:
        """
        Without C{OTEL_TRACES_EXPORTER}, or with C{none}, or with the SDK
        disabled, tracing stays off.
        """
        _Environment(self, OTEL_TRACES_EXPORTER="")
        self.assertFalse(tracing.configureFromEnvironment())
        os.environ["OTEL_TRACES_EXPORTER"] = "none"
        self.assertFalse(tracing.configureFromEnvironment())
        os.environ["OTEL_TRACES_EXPORTER"] = "console"
        _Environment(self, OTEL_SDK_DISABLED="true")
        self.assertFalse(tracing.configureFromEnvironment())
        self.assertFalse(tracing.enabled())

    @NEEDS_OTEL
    def test_console(self) -> None:
        """
        C{OTEL_TRACES_EXPORTER=console} turns tracing on with the SDK's
        console exporter.
        """
        _Environment(self, OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="")
        self.assertTrue(tracing.configureFromEnvironment())
        self.addCleanup(tracing.shutdown)
        self.assertTrue(tracing.enabled())

    @NEEDS_OTEL
    def test_unknownExporter(self) -> None:
        """
        An exporter name no installed package provides is an error naming
        it, at start-up.
        """
        _Environment(self, OTEL_TRACES_EXPORTER="nosuch", OTEL_SDK_DISABLED="")
        e = self.assertRaises(tracing.TracingUnavailable, tracing.configureFromEnvironment)
        self.assertIn("nosuch", str(e))
        self.assertFalse(tracing.enabled())

    def test_missingSDK(self) -> None:
        """
        Without the SDK installed, asking for traces is an error that says
        which extra to install.
        """
        import sys

        _Environment(self, OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="")
        name = "opentelemetry.sdk._configuration"
        saved = sys.modules.get(name)
        sys.modules[name] = None  # type: ignore[assignment]
        self.addCleanup(lambda: sys.modules.__setitem__(name, saved) if saved else sys.modules.pop(name))
        e = self.assertRaises(tracing.TracingUnavailable, tracing.configureFromEnvironment)
        self.assertIn("mailfw[otel]", str(e))

    @NEEDS_OTEL
    def test_server(self) -> None:
        """
        The server turns tracing on when the environment asks, and exports
        the spans left only once it has stopped and closed its queue; then
        tracing is off.
        """
        from twisted.internet.testing import MemoryReactorClock

        from mailfw.tap import buildService

        _Environment(self, OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="")
        service = buildService(_memoryConfig(self), MemoryReactorClock())
        self.assertTrue(tracing.enabled())
        service.startService()
        closed: list[bool] = []
        service.afterClose.insert(0, lambda: closed.append(tracing.enabled()))
        self.successResultOf(service.stopService())
        self.assertEqual(closed, [True])
        self.assertFalse(tracing.enabled())

    def test_serverRefusesToStart(self) -> None:
        """
        Traces asked for but impossible (here: the SDK missing) stop the
        server at start-up with a configuration error naming tracing.
        """
        import sys

        from twisted.internet.testing import MemoryReactorClock

        from mailfw.config import ConfigError
        from mailfw.tap import buildService

        _Environment(self, OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="")
        name = "opentelemetry.sdk._configuration"
        saved = sys.modules.get(name)
        sys.modules[name] = None  # type: ignore[assignment]
        self.addCleanup(lambda: sys.modules.__setitem__(name, saved) if saved else sys.modules.pop(name))
        e = self.assertRaises(ConfigError, buildService, _memoryConfig(self), MemoryReactorClock())
        self.assertTrue(str(e).startswith("tracing: OTEL_TRACES_EXPORTER=console"), str(e))


def _memoryConfig(case: SynchronousTestCase) -> Any:
    from pathlib import Path

    from mailfw.config import loadConfig

    path = Path(case.mktemp())
    path.mkdir(parents=True)
    (path / "mailfw.toml").write_text(
        '[listen]\nsmtp = ["tcp:2525"]\n[queue]\nplugin = "memory"\n'
        '[routing]\nplugin = "static"\n[delivery.local]\nplugin = "discard"\n'
    )
    return loadConfig(str(path / "mailfw.toml"), hostname="mx.test")
