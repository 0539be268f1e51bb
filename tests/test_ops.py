"""
The operations observers (mailfw.ops): the events a session and the
scheduler emit, the metrics and status board they move, the queue
snapshot, /healthz, the endpoint's guard, the JSON log and C{mailfw log},
and the events a worker forwards.  All reactor-free.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from mailfw._workers import EVENT_MARK, JSONLineObserver, LineObserver, _WorkerProtocol
from mailfw.admin._main import formatHistory, main
from mailfw.config import ConfigError
from mailfw.envelope import Route, RouteKind
from mailfw.ops import (
    EVENTS,
    MESSAGE_EVENTS,
    HealthCheck,
    Metrics,
    OpsService,
    OpsSettings,
    QueueWatch,
    StatusBoard,
    eventFields,
    readEvents,
    summarise,
)
from mailfw.ops._status import renderPage
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.reply import SMTPReply
from mailfw.verdict import Verdict
from tests._smtpdoubles import PROLOGUE, StagePolicy, connect
from tests.test_scheduler import START, FakeAgent, SchedulerTestsMixin, runUntilIdle

DOCS = Path(__file__).parent.parent / "docs"


def sessionEvents() -> list[dict[str, Any]]:
    """
    The events of one SMTP session: a message accepted, a recipient refused
    by a policy, then QUIT.
    """
    policy = StagePolicy(
        "blocklist",
        recipient=lambda session, envelope, rcpt: (
            Verdict.reject(550, "5.7.1", "no") if rcpt.address.localpart == "bad" else Verdict()
        ),
    )
    with capturedLogs() as events:
        conn = connect(policies=(policy,))
        conn.send(PROLOGUE + b"Subject: x\r\n\r\nhi\r\n.\r\n")
        conn.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<bad@example.org>\r\nQUIT\r\n")
        conn.proto.connectionLost()
    return list(events)


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


class SessionEventTests(SynchronousTestCase):
    """
    A session emits its named events with the documented fields.
    """

    def test_sessionEvents(self) -> None:
        """
        Opened, HELO, a deciding policy verdict, the refusal naming its
        stage, the accepted message with its queue ID, size and commit
        latency, and the close, in that order.
        """
        events = sessionEvents()
        names = [e["event"] for e in events if "event" in e]
        self.assertEqual(
            names,
            [
                "connection.opened",
                "session.helo",
                "message.received",
                "policy.verdict",
                "transaction.refused",
                "connection.closed",
            ],
        )
        [received] = named(events, "message.received")
        self.assertEqual(
            (received["queueID"], received["listener"], received["latency"], received["peer"]),
            ("Q1", "smtp", 0.0, "192.0.2.1:40000"),
        )
        [verdict] = named(events, "policy.verdict")
        self.assertEqual(
            (verdict["policy"], verdict["stage"], verdict["verdict"], verdict["code"]),
            ("blocklist", "recipient", "reject", 550),
        )
        [refused] = named(events, "transaction.refused")
        self.assertEqual(
            (refused["stage"], refused["code"], refused["recipient"]), ("RCPT", 550, "bad@example.org")
        )
        [closed] = named(events, "connection.closed")
        self.assertEqual(
            (closed["accepted"], closed["tls"], closed["helo"]), (1, False, "client.example.net")
        )

    def test_structuredOnlyEventsHaveNoText(self) -> None:
        """
        Connection opened and HELO have no format: a text log writes no
        line for them (docs/logging.rst); a policy's refusal has one, naming
        the policy.
        """
        events = sessionEvents()
        for name in ("connection.opened", "session.helo"):
            [event] = named(events, name)
            self.assertIsNone(event.get("log_format"), name)
        for event in named(events, "policy.verdict"):
            if event["verdict"] in ("reject", "defer"):
                self.assertIn(event["policy"], formatEvent(event))
            else:
                self.assertIsNone(event.get("log_format"))

    def test_everyEventIsDocumented(self) -> None:
        """
        Every named event emitted is in L{EVENTS}, and docs/logging.rst
        describes each name in L{EVENTS}.
        """
        for event in sessionEvents():
            if "event" in event:
                self.assertIn(event["event"], EVENTS)
        text = (DOCS / "logging.rst").read_text()
        documented = set(re.findall(r"^``([a-zA-Z]+\.[a-zA-Z]+)``$", text, re.M))
        self.assertEqual(documented, set(EVENTS))


class SchedulerEventTests(SchedulerTestsMixin):
    """
    The scheduler's delivery events.
    """

    def test_attemptThenOutcome(self) -> None:
        """
        A delivery is one C{delivery.attempt} (agent, duration) then one
        outcome per recipient, each with the queue ID.
        """
        agent = FakeAgent(self.clock, name="sink")
        self.router.table["example.com"] = Route(RouteKind.LOCAL, agent="sink")
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        self.clock.advance(0)
        mine = [e for e in self.events if e.get("queueID") == queueID and "event" in e]
        self.assertEqual(
            [e["event"] for e in mine], ["delivery.attempt", "delivery.delivered", "delivery.delivered"]
        )
        self.assertEqual((mine[0]["agent"], mine[0]["count"], mine[0]["duration"]), ("sink", 2, 0.0))
        self.assertEqual([e["attempts"] for e in mine[1:]], [1, 1])

    def test_deferredThenExpired(self) -> None:
        """
        A 4xx is C{delivery.deferred}; past the queue lifetime it is
        C{delivery.expired}; and the C{notice.created} bounce follows.
        """
        agent = FakeAgent(self.clock, name="sink", reply=lambda address: SMTPReply(451, "4.3.0", "later"))
        self.router.table["example.com"] = Route(RouteKind.LOCAL, agent="sink")
        self.makeScheduler(agent)
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        runUntilIdle(self.clock)
        names = [e["event"] for e in self.events if e.get("queueID") == queueID and "event" in e]
        self.assertEqual(names[1], "delivery.deferred")
        self.assertIn("delivery.expired", names)
        self.assertEqual(names[-1], "notice.created")


class MetricsTests(SynchronousTestCase):
    """
    L{Metrics} counts named events, each once.
    """

    def test_sessionCounts(self) -> None:
        """
        The session's events move connections, transactions, verdicts,
        bytes and the enqueue histogram by exactly one message's worth.
        """
        metrics = Metrics()
        for event in sessionEvents():
            metrics(event)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("mailfw_connections_total", {"listener": "smtp", "outcome": "mail"}), 1)
        self.assertEqual(value("mailfw_connections_open", {"listener": "smtp"}), 0)
        self.assertEqual(
            value("mailfw_transactions_total", {"stage": "DATA", "outcome": "accepted", "class": "2xx"}), 1
        )
        self.assertEqual(
            value("mailfw_transactions_total", {"stage": "RCPT", "outcome": "refused", "class": "5xx"}), 1
        )
        self.assertEqual(
            value(
                "mailfw_policy_verdicts_total",
                {"policy": "blocklist", "stage": "recipient", "verdict": "reject"},
            ),
            1,
        )
        self.assertGreater(value("mailfw_received_bytes_total") or 0, 0)
        self.assertEqual(value("mailfw_enqueue_seconds_count"), 1)
        self.assertEqual(value("mailfw_sessions_total", {"direction": "inbound"}), 1)
        self.assertEqual(value("mailfw_events_total", {"process": "0"}), 6)

    def test_refusedConnection(self) -> None:
        """
        A connection refused at connect is counted as refused when it
        closes, not as one without mail.
        """
        metrics = Metrics()
        common = {"peer": "192.0.2.1:1", "listener": "smtp"}
        metrics({"event": "connection.opened", **common})
        metrics({"event": "connection.refused", "code": 554, **common})
        metrics({"event": "connection.closed", "accepted": 0, **common})
        value = metrics.registry.get_sample_value
        self.assertEqual(value("mailfw_connections_total", {"listener": "smtp", "outcome": "refused"}), 1)
        self.assertIsNone(value("mailfw_connections_total", {"listener": "smtp", "outcome": "nomail"}))

    def test_deliveriesAndDNS(self) -> None:
        """
        Outcomes by agent and outcome, attempts with their duration, DNS
        lookups with errors by kind, TLS outbound; events from a worker
        are counted under its process number.
        """
        metrics = Metrics()
        events: list[dict[str, Any]] = [
            {"event": "delivery.attempt", "agent": "relay", "duration": 0.5, "worker": 1},
            {"event": "delivery.deferred", "agent": "relay"},
            {"event": "delivery.bounced", "agent": "relay"},
            {"event": "dns.lookup", "kind": "MX", "outcome": "nxdomain", "duration": 0.01},
            {"event": "dns.lookup", "kind": "MX", "outcome": "ok", "duration": 0.02},
            {"event": "client.connected", "host": "mx"},
            {"event": "client.tls", "host": "mx"},
            {"log_format": "not an operations event"},
        ]
        for event in events:
            metrics(event)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("mailfw_delivery_attempts_total", {"agent": "relay"}), 1)
        self.assertEqual(value("mailfw_delivery_seconds_sum", {"agent": "relay"}), 0.5)
        self.assertEqual(value("mailfw_deliveries_total", {"agent": "relay", "outcome": "deferred"}), 1)
        self.assertEqual(value("mailfw_deliveries_total", {"agent": "relay", "outcome": "bounced"}), 1)
        self.assertEqual(value("mailfw_dns_lookup_errors_total", {"kind": "MX", "outcome": "nxdomain"}), 1)
        self.assertEqual(value("mailfw_dns_lookup_seconds_count", {"kind": "MX"}), 2)
        self.assertEqual(value("mailfw_tls_sessions_total", {"direction": "outbound"}), 1)
        self.assertEqual(value("mailfw_events_total", {"process": "1"}), 1)
        self.assertEqual(value("mailfw_events_total", {"process": "0"}), 6)

    def test_queueGauges(self) -> None:
        """
        The queue snapshot is reported as gauges; none before the first.
        """
        metrics = Metrics()
        self.assertIsNone(metrics.registry.get_sample_value("mailfw_queue_messages"))
        clock = Clock()
        clock.advance(START)
        queue = MemoryQueue(clock)
        incoming = queue.receive(makeEnvelope("a@one.example", "b@two.example"))
        incoming.write(b"x\r\n")
        self.successResultOf(incoming.commit())
        clock.advance(30)
        metrics.queue = summarise(self.successResultOf(queue.list(_all())), clock.seconds())
        value = metrics.registry.get_sample_value
        self.assertEqual(value("mailfw_queue_messages"), 1)
        self.assertEqual(value("mailfw_queue_recipients", {"state": "ready"}), 2)
        self.assertEqual(value("mailfw_queue_recipients_by_domain", {"domain": "two.example"}), 1)
        self.assertEqual(value("mailfw_queue_oldest_age_seconds"), 30)


def _all() -> Any:
    from mailfw.queued import Selector

    return Selector()


class SummariseTests(SynchronousTestCase):
    """
    L{summarise} bounds the domain labels.
    """

    def test_topDomainsThenOther(self) -> None:
        """
        The busiest domains keep their names; the rest are counted as
        C{other}.
        """
        clock = Clock()
        queue = MemoryQueue(clock)
        for rcpts in [("a@big.example", "b@big.example"), ("c@mid.example",), ("d@small.example",)]:
            incoming = queue.receive(makeEnvelope(*rcpts))
            incoming.write(b"x\r\n")
            self.successResultOf(incoming.commit())
        snapshot = summarise(self.successResultOf(queue.list(_all())), 0.0, topDomains=1)
        self.assertEqual(snapshot.byDomain, {"big.example": 2, "other": 2})
        self.assertEqual((snapshot.messages, snapshot.byState), (3, {"ready": 4}))


class QueueWatchTests(SynchronousTestCase):
    """
    L{QueueWatch} reads the queue at most once per interval.
    """

    def test_cached(self) -> None:
        """
        Within the interval the snapshot is reused; after it, read again;
        consumers get each new snapshot; a failing read keeps the last.
        """
        clock = Clock()
        queue = MemoryQueue(clock)
        seen: list[Any] = []
        watch = QueueWatch(queue, clock, 10.0, 10, [seen.append])
        first = self.successResultOf(watch.current())
        self.assertIs(self.successResultOf(watch.current()), first)
        clock.advance(11)
        second = self.successResultOf(watch.current())
        self.assertIsNot(second, first)
        self.assertEqual(seen, [first, second])
        clock.advance(11)
        queue.list = lambda selector: fail(RuntimeError("down"))  # type: ignore[method-assign]
        self.assertIs(self.successResultOf(watch.current()), second)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_concurrentWaiters(self) -> None:
        """
        Callers during a slow read share it.
        """
        clock = Clock()
        reads: list[Deferred[Any]] = []

        class SlowQueue:
            def list(self, selector: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                reads.append(d)
                return d

        watch = QueueWatch(cast(Any, SlowQueue()), clock, 10.0, 10, [])
        a, b = watch.current(), watch.current()
        self.assertEqual(len(reads), 1)
        reads[0].callback([])
        self.assertIs(self.successResultOf(a), self.successResultOf(b))


class StatusBoardTests(SynchronousTestCase):
    """
    L{StatusBoard} follows sessions, refusals, deliveries and backoff.
    """

    def test_sessionLifecycle(self) -> None:
        """
        A session appears on connect with its HELO name and state, the
        refusal names the refusing policy, and the session goes on close.
        """
        clock = Clock()
        board = StatusBoard(clock.seconds)
        seenDuring: list[Any] = []
        for event in sessionEvents():
            board(event)
            if event.get("event") == "message.received":
                seenDuring = board.view()["sessions"]
        [session] = seenDuring
        self.assertEqual(
            (session["peer"], session["helo"], session["state"], session["accepted"]),
            ("192.0.2.1:40000", "client.example.net", "accepted", 1),
        )
        view = board.view()
        self.assertEqual(view["sessions"], [])
        [refusal] = view["refusals"]
        self.assertEqual(
            (refusal["stage"], refusal["policy"], refusal["recipient"]),
            ("RCPT", "blocklist", "bad@example.org"),
        )

    def test_recentAndBackoff(self) -> None:
        """
        At most 20 recent deliveries, newest first; a destination in
        backoff shows until its time is over.
        """
        clock = Clock()
        board = StatusBoard(clock.seconds)
        for n in range(25):
            board({"event": "delivery.delivered", "queueID": f"Q{n}", "agent": "local", "code": 250})
        board({"event": "delivery.attempt", "queueID": "Q99"})
        board({"event": "destination.backoff", "agent": "relay", "nexthop": "mx.example", "until": 60.0})
        view = board.view()
        self.assertEqual([d["queueID"] for d in view["deliveries"]][:2], ["Q24", "Q23"])
        self.assertEqual(len(view["deliveries"]), 20)
        self.assertEqual([b["nexthop"] for b in view["backoff"]], ["mx.example"])
        clock.advance(61)
        self.assertEqual(board.view()["backoff"], [])

    def test_pageEscapes(self) -> None:
        """
        Client-controlled strings (HELO name, addresses) are escaped in
        the server-rendered page.
        """
        board = StatusBoard(Clock().seconds)
        board({"event": "connection.opened", "peer": "p", "listener": "smtp"})
        board({"event": "session.helo", "peer": "p", "helo": "<script>alert(1)</script>"})
        board({"event": "transaction.refused", "peer": "p", "stage": "MAIL", "sender": '"<b>"@x.example'})
        page = renderPage(board.view()).decode()
        self.assertNotIn("<script>alert", page)
        self.assertNotIn("<b>", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertIn("&quot;&lt;b&gt;&quot;@x.example", page)


class FakeScheduler:
    running = True
    deliveries = 0
    lastClaimed: float | None = None


class HealthTests(SynchronousTestCase):
    """
    C{/healthz}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = MemoryQueue(self.clock)
        self.scheduler = FakeScheduler()
        self.health = HealthCheck(self.queue, self.scheduler, self.clock)

    def render(self) -> tuple[int, bytes]:
        request = DummyRequest([b""])
        self.health.render(request)
        self.assertEqual(request.finished, 1)
        return request.responseCode or 200, b"".join(request.written)

    def test_healthy(self) -> None:
        """
        An empty queue and a running scheduler: 200 C{ok}.
        """
        self.assertEqual(self.render(), (200, b"ok\n"))

    def test_queueCannotCommit(self) -> None:
        """
        A queue whose probe fails: 503 naming the error.
        """
        self.queue.nextDue = lambda: fail(OSError("disk full"))  # type: ignore[method-assign]
        code, text = self.render()
        self.assertEqual((code, text), (503, b"queue: OSError: disk full\n"))

    def test_schedulerStalled(self) -> None:
        """
        Mail overdue for over a minute and no claim for a minute: 503; a
        recent claim or a running delivery is not a stall.
        """
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        incoming.write(b"x\r\n")
        self.successResultOf(incoming.commit())
        self.clock.advance(120)
        code, text = self.render()
        self.assertEqual(code, 503)
        self.assertIn(b"scheduler: mail due for 120s", text)
        self.scheduler.lastClaimed = self.clock.seconds() - 5
        self.assertEqual(self.render(), (200, b"ok\n"))
        self.scheduler.lastClaimed = None
        self.scheduler.deliveries = 1
        self.assertEqual(self.render(), (200, b"ok\n"))

    def test_schedulerStopped(self) -> None:
        """
        A scheduler that is not running: 503.
        """
        self.scheduler.running = False
        self.assertEqual(self.render(), (503, b"scheduler: not running\n"))


class GuardTests(SynchronousTestCase):
    """
    The endpoint's basic auth and loopback rule.
    """

    def service(self, **settings: Any) -> OpsService:
        clock = Clock()
        reactor: Any = clock
        return OpsService(
            OpsSettings(**settings), reactor, MemoryQueue(clock), FakeScheduler(), LogPublisher()
        )

    def get(self, service: OpsService, path: bytes, host: str = "127.0.0.1", auth: str | None = None) -> int:
        request = DummyRequest([path])
        request.client = IPv4Address("TCP", host, 1234)
        if auth is not None:
            request.requestHeaders.setRawHeaders(
                b"authorization", [b"Basic " + base64.b64encode(auth.encode())]
            )
        resource = service.site.resource.getChildWithDefault(path, request)
        resource.render(request)
        return request.responseCode or 200

    def test_loopbackOnly(self) -> None:
        """
        The status page answers loopback clients only, unless allowed;
        metrics and health answer anyone.
        """
        service = self.service()
        self.assertEqual(self.get(service, b"status"), 200)
        self.assertEqual(self.get(service, b"status.json", host="192.0.2.1"), 403)
        self.assertEqual(self.get(service, b"metrics", host="192.0.2.1"), 200)
        self.assertEqual(self.get(self.service(allowRemote=True), b"status", host="192.0.2.1"), 200)

    def test_basicAuth(self) -> None:
        """
        With a user and password, everything but /healthz needs them.
        """
        service = self.service(user="ops", password="s3cret")
        self.assertEqual(self.get(service, b"metrics"), 401)
        self.assertEqual(self.get(service, b"metrics", auth="ops:wrong"), 401)
        self.assertEqual(self.get(service, b"metrics", auth="ops:s3cret"), 200)
        self.assertEqual(self.get(service, b"healthz"), 200)

    def test_observesWhileRunning(self) -> None:
        """
        The service observes its publisher between start and stop.
        """
        publisher = LogPublisher()
        clock = Clock()
        service = OpsService(OpsSettings(), cast(Any, clock), MemoryQueue(clock), FakeScheduler(), publisher)
        log = Logger(observer=publisher)
        service.startService()
        log.info(event="delivery.delivered", agent="a")
        service.stopService()
        log.info(event="delivery.delivered", agent="a")
        value = service.metrics.registry.get_sample_value
        self.assertEqual(value("mailfw_deliveries_total", {"agent": "a", "outcome": "delivered"}), 1)

    def test_settings(self) -> None:
        """
        The section is checked: unknown keys and half a login are refused.
        """
        self.assertEqual(
            OpsSettings.fromSection({"listen": "tcp:9125", "allow_remote": True}),
            OpsSettings(listen="tcp:9125", allowRemote=True),
        )
        self.assertRaises(ConfigError, OpsSettings.fromSection, {"lisen": "tcp:9125"})
        self.assertRaises(ConfigError, OpsSettings.fromSection, {"user": "ops"})


class JSONLogTests(SynchronousTestCase):
    """
    The JSON log and C{mailfw log}.
    """

    def jsonLog(self) -> list[str]:
        from twisted.logger import jsonFileLogObserver

        out = io.StringIO()
        observer = jsonFileLogObserver(out, recordSeparator="")
        for event in sessionEvents():
            observer(event)
        return out.getvalue().splitlines()

    def test_oneObjectALine(self) -> None:
        """
        Each line is one JSON object, read back by L{readEvents}.
        """
        lines = self.jsonLog()
        self.assertEqual(
            next(json.loads(line)["event"] for line in lines if "event" in line), "connection.opened"
        )
        self.assertEqual(len(list(readEvents(["\x1e" + line for line in lines] + ["junk"]))), len(lines))

    def test_history(self) -> None:
        """
        C{mailfw log QUEUEID} prints the message's events, text or fields.
        """
        lines = [
            *self.jsonLog(),
            json.dumps({"event": "delivery.attempt", "queueID": "Q1", "agent": "local", "log_time": 1.0}),
            json.dumps(
                {
                    "event": "delivery.delivered",
                    "queueID": "Q1",
                    "log_format": "{queueID} to {recipient}: {code}",
                    "recipient": "r@x",
                    "code": 250,
                    "worker": 1,
                    "log_time": 2.0,
                }
            ),
        ]
        history = formatHistory("Q1", lines)
        self.assertEqual(
            [h.split(" ")[2] for h in history],
            ["message.received:", "delivery.attempt:", "delivery.delivered"],
        )
        self.assertTrue(history[1].endswith("delivery.attempt: agent=local"))
        self.assertTrue(history[2].endswith("delivery.delivered [worker 1]: Q1 to r@x: 250"))
        self.assertEqual(formatHistory("Q2", lines), [])

    def test_command(self) -> None:
        """
        The command reads C{--log} and fails with one line for an unknown
        queue ID.
        """
        path = Path(self.mktemp())
        path.write_text("\n".join(self.jsonLog()) + "\n")
        self.assertEqual(main(["log", "Q1", "--log", str(path)]), 0)
        self.assertEqual(main(["log", "NOPE", "--log", str(path)]), 1)
        self.assertEqual(main(["log", "Q1", "--log", str(path) + ".missing"]), 1)

    def test_messageEventsCarryQueueID(self) -> None:
        """
        The events about a message that a session emits carry its queue ID.
        """
        for event in sessionEvents():
            if event.get("event") in MESSAGE_EVENTS:
                self.assertTrue(event["queueID"])


class ForwardingTests(SynchronousTestCase):
    """
    Workers forward named events with their fields to the parent.
    """

    def test_relayCarriesFields(self) -> None:
        """
        Through the JSON relay, a named event arrives in the parent with
        its fields and the worker's number, and its text.
        """
        written: list[str] = []
        JSONLineObserver(written.append, lambda: None)(
            {
                "log_format": "hi {queueID}",
                "event": "message.received",
                "queueID": "Q1",
                "size": 3,
                "obj": object(),
            }
        )
        with capturedLogs() as events:
            _WorkerProtocol(cast(Any, None), 1).outReceived(written[0].encode())
        [event] = events
        self.assertEqual(
            (event["event"], event["queueID"], event["size"], event["worker"], event["workerLine"]),
            ("message.received", "Q1", 3, 1, "hi Q1"),
        )
        self.assertNotIn("obj", event)

    def test_directModeUsesMarkedLines(self) -> None:
        """
        Writing its own log lines, a worker sends a named event's fields
        as a marked line on another descriptor; the parent re-emits them
        without a format (no second text line) and still logs other
        standard error lines as errors.
        """
        import os

        read, write = os.pipe()
        self.addCleanup(os.close, read)
        out = os.open(os.devnull, os.O_WRONLY)
        self.addCleanup(os.close, out)
        observer = LineObserver(out, 1, eventsFD=write)
        observer(
            {"log_format": "x", "event": "delivery.delivered", "queueID": "Q1", "log_level": LogLevel.info}
        )
        observer({"log_format": "not forwarded", "log_level": LogLevel.info})
        os.close(write)
        data = os.read(read, 65536)
        self.assertTrue(data.startswith(EVENT_MARK))
        self.assertEqual(data.count(b"\n"), 1)
        protocol = _WorkerProtocol(cast(Any, None), 2)
        with capturedLogs() as events:
            protocol.errReceived(data[:7])
            protocol.errReceived(data[7:] + b"Traceback: boom\n")
        [forwarded, error] = events
        self.assertEqual(
            (forwarded["event"], forwarded["queueID"], forwarded["worker"]), ("delivery.delivered", "Q1", 2)
        )
        self.assertIsNone(forwarded["log_format"])
        self.assertEqual(error["log_level"], LogLevel.error)

    def test_eventFields(self) -> None:
        """
        Only plain values and no C{log_} keys cross.
        """
        self.assertEqual(
            eventFields({"event": "x", "n": 1, "log_time": 2.0, "f": None, "o": object()}),
            {"event": "x", "n": 1, "f": None},
        )


class InterfaceTests(SynchronousTestCase):
    def test_observers(self) -> None:
        """
        The metrics and the board are log observers.
        """
        from twisted.logger import ILogObserver

        self.assertTrue(verifyObject(ILogObserver, Metrics()))
        self.assertTrue(verifyObject(ILogObserver, StatusBoard(Clock().seconds)))


class SlowQueueWatchTests(SynchronousTestCase):
    def test_slowReadsAreSpacedOut(self) -> None:
        """
        After a read that took 2 seconds, the next waits 40 seconds even
        with a 10-second interval.
        """
        clock = Clock()
        reads: list[Deferred[Any]] = []

        class SlowQueue:
            def list(self, selector: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                reads.append(d)
                return d

        watch = QueueWatch(cast(Any, SlowQueue()), clock, 10.0, 10, [])
        watch.current()
        clock.advance(2)
        reads[0].callback([])
        clock.advance(30)
        watch.current()
        self.assertEqual(len(reads), 1)
        clock.advance(11)
        watch.current()
        self.assertEqual(len(reads), 2)


class DashboardTests(SynchronousTestCase):
    def test_dashboardNamesRealMetrics(self) -> None:
        """
        Every metric the Grafana dashboard queries is one the server
        exposes (a renamed metric must not leave an empty panel).
        """
        from mailfw.ops._metrics import _COUNTERS, _HISTOGRAMS

        dashboard = json.loads((DOCS / "grafana-mailfw.json").read_text())
        exposed = (
            {f"{name}_total" for name in _COUNTERS}
            | {f"{name}_bucket" for name in _HISTOGRAMS}
            | {
                "mailfw_connections_open",
                "mailfw_queue_recipients",
                "mailfw_queue_recipients_by_domain",
                "mailfw_queue_oldest_age_seconds",
            }
        )
        used = {
            name
            for panel in dashboard["panels"]
            for target in panel["targets"]
            for name in re.findall(r"mailfw_[a-z_]+", target["expr"])
        }
        self.assertTrue(used)
        self.assertEqual(used - exposed, set())


class EndpointTests(SynchronousTestCase):
    def test_badListen(self) -> None:
        """
        A bad C{listen} description is a configuration error naming it,
        found when the server is built (also by C{mailfw config check}).
        """
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        with self.assertRaises(ConfigError) as caught:
            OpsService(OpsSettings(listen="nonsense:1"), reactor, MemoryQueue(reactor), FakeScheduler())
        self.assertIn("[metrics] listen = 'nonsense:1'", str(caught.exception))

    def test_listens(self) -> None:
        """
        Started, the service listens on its endpoint; stopped, it stops.
        """
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        service = OpsService(
            OpsSettings(listen="tcp:9125:interface=127.0.0.1"), reactor, MemoryQueue(reactor), FakeScheduler()
        )
        service.startService()
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface, factory), (9125, "127.0.0.1", service.site))
        service.stopService()
        self.assertFalse(service.running)
