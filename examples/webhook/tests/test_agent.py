"""
Tests for the C{webhook} delivery agent: what it sends, how each answer
maps to SMTP replies, its configuration, its registration as a plugin,
and the conformance tests every mailfw delivery agent must pass.

No sockets, no real time: requests go to a fake L{IAgent} (or, in
L{WireTests}, a real L{Agent} talking to a real L{Site} through
L{twisted.test.iosim}), and a L{Clock} drives timeouts and the reads of
the message.  Run them with C{python -m pytest tests} in this directory,
with the distribution installed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from mailfw_webhook._agent import WebhookAgent, fromConfig, replyForStatus
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    Agent,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery import DeliveryAgentContractTests, TrackingBody
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory, IMessageBody
from mailfw.plugin import findPlugin

URL = "http://hooks.example.org:8080/inbox?token=s3cret"
MESSAGE = b"From: alice@example.org\r\nSubject: hi\r\n\r\nHello.\r\n.dot\r\n"


@implementer(IConsumer)
class Sink:
    """
    Collects what a body producer writes.
    """

    def __init__(self) -> None:
        self.data = bytearray()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data


@implementer(IResponse)
class FakeResponse:
    """
    An answer with a status code and a short body.
    """

    version = (b"HTTP", 1, 1)
    phrase = b"Whatever"
    length = 6
    request = None
    previousResponse = None

    def __init__(self, code: int) -> None:
        self.code = code
        self.headers = Headers()
        self.bodyRead = False

    def deliverBody(self, protocol: IProtocol) -> None:
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(b"thanks")
        protocol.connectionLost(Failure(ResponseDone()))
        self.bodyRead = True

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


@dataclass
class SentRequest:
    """
    One request the agent made, and what the test did with it.
    """

    method: bytes
    uri: bytes
    headers: Headers
    producer: IBodyProducer | None
    deferred: Deferred[IResponse] = field(default_factory=Deferred)
    producing: bool = False
    cancelled: bool = False
    body: bytes | None = None

    def header(self, name: bytes) -> list[bytes]:
        return list(self.headers.getRawHeaders(name, []))


@implementer(IAgent)
class FakeHTTP:
    """
    An L{IAgent} that records requests; the test reads each body (as a real
    agent would, through the producer) and answers or fails it.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: list[SentRequest] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        sent = SentRequest(method, uri, headers or Headers(), bodyProducer)

        def cancel(d: Deferred[IResponse]) -> None:
            # Like Agent: a body being sent is stopped; one not started yet
            # (still connecting) is left alone.
            sent.cancelled = True
            if sent.producing and bodyProducer is not None:
                bodyProducer.stopProducing()

        sent.deferred = Deferred(cancel)
        self.requests.append(sent)
        return sent.deferred

    def send(self, sent: SentRequest) -> Failure | None:
        """
        Read the whole body from the producer; return the failure if
        producing it failed.
        """
        assert sent.producer is not None
        sink = Sink()
        sent.producing = True
        producing = sent.producer.startProducing(sink)
        outcome: list[Failure | None] = []
        producing.addCallbacks(lambda _: outcome.append(None), outcome.append)
        sent.body = bytes(sink.data)
        assert outcome, "the producer did not finish"
        return outcome[0]

    def respond(self, sent: SentRequest, code: int) -> FakeResponse | None:
        """
        Send the body and answer C{code}; if producing the body failed,
        fail the request instead, as L{twisted.web.client.Agent} does.
        """
        failure = self.send(sent)
        if failure is not None:
            sent.deferred.errback(RequestGenerationFailed([failure]))
            return None
        response = FakeResponse(code)
        sent.deferred.callback(response)
        return response

    def answerAll(self, code: int) -> None:
        for sent in self.requests:
            if not sent.deferred.called:
                self.respond(sent, code)


class BrokenReader(io.BytesIO):
    """
    A reader whose storage fails after the first read.
    """

    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError(5, "Input/output error")
        return super().read(1)


class BrokenBody(TrackingBody):
    """
    An L{IMessageBody} whose reads fail part-way (in the reader thread of
    L{TrackingBody.produce}).
    """

    def __init__(self) -> None:
        super().__init__(MESSAGE)
        self.brokenReaders: list[BrokenReader] = []

    def open(self) -> BinaryIO:
        self.checkThread("open")
        reader = BrokenReader(MESSAGE)
        self.brokenReaders.append(reader)
        return reader


def envelope(*localparts: str, sender: Address | None = None, queueID: str = "Q1") -> Envelope:
    return Envelope(
        sender=Address("alice", "example.org") if sender is None else sender,
        recipients=tuple(Recipient(Address(lp, "hooks.example.org")) for lp in localparts),
        queueID=queueID,
    )


class AgentTestMixin(SynchronousTestCase):
    """
    An agent over a L{FakeHTTP}, and helpers to deliver and answer.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = FakeHTTP(self.clock)
        self.agent = WebhookAgent("hook", URL, self.http, self.clock)

    def start(
        self, env: Envelope, body: IMessageBody | None = None
    ) -> tuple[Deferred[Sequence[RecipientOutcome]], SentRequest]:
        d = self.agent.deliver(env, body or TrackingBody(MESSAGE), None)
        [sent] = self.http.requests
        return d, sent

    def outcomesFor(self, code: int, *localparts: str) -> Sequence[RecipientOutcome]:
        d, sent = self.start(envelope(*(localparts or ("bob",))))
        self.http.respond(sent, code)
        return self.successResultOf(d)

    def replies(self, outcomes: Sequence[RecipientOutcome]) -> list[tuple[int, str]]:
        return [(o.reply.code, o.reply.enhanced) for o in outcomes]


class DoublesTests(SynchronousTestCase):
    def test_doublesProvideTheirInterfaces(self) -> None:
        """
        The test doubles provide the interfaces they stand in for.
        """
        self.assertTrue(verifyObject(IAgent, FakeHTTP(Clock())))
        self.assertTrue(verifyObject(IResponse, FakeResponse(200)))
        self.assertTrue(verifyObject(IConsumer, Sink()))
        self.assertTrue(verifyObject(IMessageBody, BrokenBody()))


class RequestTests(AgentTestMixin):
    def test_providesIDeliveryAgent(self) -> None:
        """
        L{WebhookAgent} provides L{IDeliveryAgent}, named after its instance.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent))
        self.assertEqual(self.agent.name, "hook")

    def test_postsTheMessage(self) -> None:
        """
        The message is POSTed to the URL, exactly as queued, with its
        length and the message/rfc822 content type.
        """
        d, sent = self.start(envelope("bob"))
        self.http.respond(sent, 204)
        self.successResultOf(d)
        self.assertEqual(sent.method, b"POST")
        self.assertEqual(sent.uri, URL.encode("ascii"))
        self.assertEqual(sent.body, MESSAGE)
        assert sent.producer is not None
        self.assertEqual(sent.producer.length, len(MESSAGE))
        self.assertEqual(sent.header(b"content-type"), [b"message/rfc822"])

    def test_envelopeHeaders(self) -> None:
        """
        The sender goes in X-Mail-From, each recipient in its own X-Rcpt-To
        line in envelope order, and the queue ID in X-Mail-Queue-ID.
        """
        _d, sent = self.start(envelope("carol", "bob", "dave", queueID="4F2A"))
        self.assertEqual(sent.header(b"x-mail-from"), [b"alice@example.org"])
        self.assertEqual(
            sent.header(b"x-rcpt-to"),
            [b"carol@hooks.example.org", b"bob@hooks.example.org", b"dave@hooks.example.org"],
        )
        self.assertEqual(sent.header(b"x-mail-queue-id"), [b"4F2A"])

    def test_nullSender(self) -> None:
        """
        A bounce's null sender is sent as C{<>}.
        """
        _d, sent = self.start(
            Envelope(sender=None, recipients=(Recipient(Address("bob", "hooks.example.org")),))
        )
        self.assertEqual(sent.header(b"x-mail-from"), [b"<>"])

    def test_noQueueID(self) -> None:
        """
        Without a queue ID there is no X-Mail-Queue-ID header.
        """
        _d, sent = self.start(envelope("bob", queueID=""))
        self.assertEqual(sent.header(b"x-mail-queue-id"), [])

    def test_internationalAddresses(self) -> None:
        """
        Addresses of an SMTPUTF8 message are sent as UTF-8.
        """
        env = Envelope(
            sender=Address("jörg", "example.org"),
            recipients=(Recipient(Address("dörte", "hooks.example.org")),),
            smtputf8=True,
        )
        _d, sent = self.start(env)
        self.assertEqual(sent.header(b"x-mail-from"), ["jörg@example.org".encode()])
        self.assertEqual(sent.header(b"x-rcpt-to"), ["dörte@hooks.example.org".encode()])

    def test_oneRequestPerDelivery(self) -> None:
        """
        All the recipients of one delivery share one request.
        """
        self.agent.deliver(envelope("bob", "carol"), TrackingBody(MESSAGE), None)
        self.assertEqual(len(self.http.requests), 1)

    def test_noRecipientsNoRequest(self) -> None:
        """
        An envelope without recipients sends nothing.
        """
        d = self.agent.deliver(envelope(), TrackingBody(MESSAGE), None)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(self.http.requests, [])

    def test_responseBodyRead(self) -> None:
        """
        The response body is read (and dropped), so the connection can end.
        """
        d, sent = self.start(envelope("bob"))
        response = self.http.respond(sent, 200)
        self.successResultOf(d)
        self.assertTrue(response.bodyRead)


class StatusTests(AgentTestMixin):
    def test_success(self) -> None:
        """
        Any 2xx answer delivers every recipient with 250 2.0.0, naming the
        webhook's host as the remote MTA.
        """
        for code in (200, 201, 202, 204, 299):
            outcomes = self.outcomesFor(code, "bob", "carol")
            self.assertEqual(self.replies(outcomes), [(250, "2.0.0")] * 2, code)
            self.assertEqual([o.remoteMTA for o in outcomes], ["hooks.example.org"] * 2)
            self.http.requests.clear()

    def test_refused(self) -> None:
        """
        A 4xx answer (other than 408, 413 and 429) fails every recipient
        permanently with 554 5.0.0.
        """
        for code in (400, 401, 403, 404, 405, 409, 415, 422, 499):
            outcomes = self.outcomesFor(code, "bob", "carol")
            self.assertEqual(self.replies(outcomes), [(554, "5.0.0")] * 2, code)
            self.assertTrue(all(o.failed for o in outcomes))
            self.http.requests.clear()

    def test_tooLarge(self) -> None:
        """
        413 fails permanently as too large for the destination, 552 5.3.4.
        """
        self.assertEqual(self.replies(self.outcomesFor(413)), [(552, "5.3.4")])

    def test_requestTimeout(self) -> None:
        """
        408 (the webhook gave up reading) is transient: 451 4.4.2.
        """
        self.assertEqual(self.replies(self.outcomesFor(408)), [(451, "4.4.2")])

    def test_tooManyRequests(self) -> None:
        """
        429 is congestion, transient: 451 4.4.5.
        """
        self.assertEqual(self.replies(self.outcomesFor(429)), [(451, "4.4.5")])

    def test_serverError(self) -> None:
        """
        A 5xx answer defers every recipient with 451 4.4.0.
        """
        for code in (500, 502, 503, 504, 599):
            outcomes = self.outcomesFor(code, "bob", "carol")
            self.assertEqual(self.replies(outcomes), [(451, "4.4.0")] * 2, code)
            self.assertTrue(all(o.deferred for o in outcomes))
            self.http.requests.clear()

    def test_redirectDefers(self) -> None:
        """
        A redirect is not followed; the mail waits (451 4.4.0) rather than
        bouncing while the URL is wrong.
        """
        for code in (301, 302, 307, 308):
            self.assertEqual(self.replies(self.outcomesFor(code)), [(451, "4.4.0")], code)
            self.http.requests.clear()

    def test_everyStatusClassified(self) -> None:
        """
        Exactly 2xx delivers; a 4xx other than 408 and 429 fails; every
        other status defers.
        """
        for status in range(100, 600):
            reply = replyForStatus(status)
            if 200 <= status < 300:
                self.assertEqual(reply.code, 250, status)
            elif 400 <= status < 500 and status not in (408, 429):
                self.assertTrue(reply.isPermanent, status)
            else:
                self.assertTrue(reply.isTransient, status)


class FailureTests(AgentTestMixin):
    def test_timeout(self) -> None:
        """
        Without an answer within 30 seconds the request is cancelled and
        every recipient deferred with 451 4.4.2; no reader is left open.
        """
        body = TrackingBody(MESSAGE)
        d, sent = self.start(envelope("bob", "carol"), body)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertTrue(sent.cancelled)
        self.assertEqual(self.replies(self.successResultOf(d)), [(451, "4.4.2")] * 2)
        self.assertEqual([r for r in body.readers if not r.closed], [])

    def test_configuredTimeout(self) -> None:
        """
        The timeout is the agent's C{timeout}.
        """
        agent = WebhookAgent("hook", URL, self.http, self.clock, timeout=5)
        d = agent.deliver(envelope("bob"), TrackingBody(MESSAGE), None)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.replies(self.successResultOf(d)), [(451, "4.4.2")])

    def test_connectionRefused(self) -> None:
        """
        A refused connection or a failed DNS lookup defers with 451 4.4.1.
        """
        for error in (ConnectionRefusedError(), DNSLookupError("hooks.example.org")):
            d, sent = self.start(envelope("bob"))
            sent.deferred.errback(error)
            self.assertEqual(self.replies(self.successResultOf(d)), [(451, "4.4.1")], error)
            self.http.requests.clear()

    def test_connectionLost(self) -> None:
        """
        A connection lost while sending or before the answer defers with
        451 4.4.2, and the remote MTA is unknown.
        """
        lost = [Failure(ConnectionDone())]
        for error in (
            ResponseNeverReceived(lost),
            RequestTransmissionFailed(lost),
            ResponseFailed(lost),
        ):
            d, sent = self.start(envelope("bob"))
            sent.deferred.errback(error)
            [outcome] = self.successResultOf(d)
            self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.4.2"), error)
            self.assertIsNone(outcome.remoteMTA)
            self.http.requests.clear()

    def test_readFailsPartWay(self) -> None:
        """
        A read error while streaming the message is a local fault: 451
        4.3.0, never a bounce, and the reader is closed.
        """
        body = BrokenBody()
        d, sent = self.start(envelope("bob"), body)
        failure = self.http.send(sent)
        assert failure is not None
        self.assertTrue(failure.check(OSError))
        # What twisted.web.client.Agent does when the producer fails:
        sent.deferred.errback(RequestGenerationFailed([failure]))
        self.assertEqual(self.replies(self.successResultOf(d)), [(451, "4.3.0")])
        self.assertTrue(body.brokenReaders[0].closed)

    def test_unexpectedErrorIsABug(self) -> None:
        """
        An exception the agent does not expect fails the result (the
        scheduler then defers the recipients and logs the bug), and no
        reader is left open.
        """
        body = TrackingBody(MESSAGE)
        d, sent = self.start(envelope("bob"), body)
        sent.deferred.errback(ZeroDivisionError())
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual([r for r in body.readers if not r.closed], [])

    def test_urlNotLogged(self) -> None:
        """
        Log events name the agent, recipient and status but never the URL,
        whose query may hold a token.
        """
        with capturedLogs() as events:
            d, sent = self.start(envelope("bob"))
            self.http.respond(sent, 404)
            self.successResultOf(d)
            self.http.requests.clear()
            d, sent = self.start(envelope("bob"))
            sent.deferred.errback(ResponseNeverReceived([Failure(ConnectionDone())]))
            self.successResultOf(d)
        texts = [formatEvent(e) for e in events]
        self.assertIn("hook: bob@hooks.example.org from alice@example.org: 554 5.0.0 (HTTP 404)", texts)
        self.assertEqual(len(texts), 3)
        for event in events:
            self.assertNotIn("s3cret", repr(event))
            self.assertNotIn("s3cret", formatEvent(event))

    def test_callerCancels(self) -> None:
        """
        Cancelling the delivery cancels the request.
        """
        d, sent = self.start(envelope("bob"))
        d.cancel()
        self.assertTrue(sent.cancelled)
        self.failureResultOf(d, CancelledError)


class Recorder(Resource):
    """
    An HTTP endpoint that records what is POSTed to it.
    """

    isLeaf = True

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code
        self.received: list[tuple[bytes, Headers, bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.received.append((request.uri, request.requestHeaders, request.content.read()))
        request.setResponseCode(self.code)
        return b"recorded\n"


@implementer(IStreamClientEndpoint)
class _LoopbackEndpoint:
    def __init__(self, owner: Loopback) -> None:
        self._owner = owner

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        address = IPv4Address("TCP", "127.0.0.1", 8080)
        client = factory.buildProtocol(address)
        server = self._owner.site.buildProtocol(address)
        assert client is not None and server is not None
        self._owner.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
            )
        )
        return succeed(client)


@implementer(IAgentEndpointFactory)
class Loopback:
    """
    Connects every request of an L{Agent} to C{site} in memory.
    """

    def __init__(self, site: Site) -> None:
        self.site = site
        self.pumps: list[iosim.IOPump] = []

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return _LoopbackEndpoint(self)


class WireTests(SynchronousTestCase):
    """
    The agent with Twisted's real HTTP client and server, connected in
    memory: what actually goes over the wire.
    """

    def deliverTo(self, code: int) -> tuple[Recorder, Sequence[RecipientOutcome]]:
        clock = Clock()
        recorder = Recorder(code)
        loopback = Loopback(Site(recorder, reactor=clock))
        agent = WebhookAgent("hook", URL, Agent.usingEndpointFactory(clock, loopback), clock)
        self.assertTrue(verifyObject(IAgentEndpointFactory, loopback))
        d = agent.deliver(envelope("bob", "carol"), TrackingBody(MESSAGE), None)
        for _ in range(200):
            if d.called:
                break
            clock.advance(0)
            for pump in loopback.pumps:
                pump.pump()
        return recorder, self.successResultOf(d)

    def test_onTheWire(self) -> None:
        """
        A real HTTP server receives the message and one X-Rcpt-To line per
        recipient, and its 200 delivers both recipients.
        """
        recorder, outcomes = self.deliverTo(200)
        [(uri, headers, body)] = recorder.received
        self.assertEqual(uri, b"/inbox?token=s3cret")
        self.assertEqual(body, MESSAGE)
        self.assertEqual(headers.getRawHeaders(b"content-length"), [str(len(MESSAGE)).encode()])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"message/rfc822"])
        self.assertEqual(
            headers.getRawHeaders(b"x-rcpt-to"),
            [b"bob@hooks.example.org", b"carol@hooks.example.org"],
        )
        self.assertEqual([o.reply.code for o in outcomes], [250, 250])

    def test_serverErrorOnTheWire(self) -> None:
        """
        A real 503 defers both recipients.
        """
        recorder, outcomes = self.deliverTo(503)
        self.assertEqual(len(recorder.received), 1)
        self.assertEqual([o.reply.code for o in outcomes], [451, 451])


class FromConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        self.reactor = MemoryReactorClock()
        return ComponentContext(reactor=self.reactor, hostname="mx.test", dataDir=Path("/nonexistent"))

    def build(self, **options: object) -> WebhookAgent:
        return fromConfig(self.context(), "hook", {"plugin": "webhook", **options})

    def refused(self, **options: object) -> str:
        return str(self.assertRaises(ConfigError, self.build, **options))

    def test_minimal(self) -> None:
        """
        A URL is all it needs; the agent is named after its instance.
        """
        agent = self.build(url="http://127.0.0.1:8080/inbox")
        self.assertTrue(verifyObject(IDeliveryAgent, agent))
        self.assertEqual(agent.name, "hook")

    def test_defaultTimeout(self) -> None:
        """
        Without C{timeout}, requests time out after 30 seconds on the
        reactor's clock.
        """
        agent = self.build(url="http://127.0.0.1:8080/inbox")
        agent.deliver(envelope("bob"), TrackingBody(MESSAGE), None)
        self.assertIn(30.0, [call.getTime() for call in self.reactor.getDelayedCalls()])

    def test_timeout(self) -> None:
        """
        C{timeout} sets the request timeout in seconds.
        """
        agent = self.build(url="https://hooks.example.org/inbox", timeout=7.5)
        agent.deliver(envelope("bob"), TrackingBody(MESSAGE), None)
        self.assertIn(7.5, [call.getTime() for call in self.reactor.getDelayedCalls()])

    def test_urlRequired(self) -> None:
        """
        Without C{url} the section is refused, naming it.
        """
        self.assertEqual(self.refused(), "[delivery.hook] needs 'url'")

    def test_badURLs(self) -> None:
        """
        URLs that cannot work are refused at start-up: other schemes, no
        scheme, no host, credentials, non-ASCII, spaces, a bad port.
        """
        for url, reason in [
            ("ftp://hooks.example.org/in", "http:// or https://"),
            ("hooks.example.org/in", "http:// or https://"),
            ("http:///in", "names no host"),
            ("http://user:pw@hooks.example.org/in", "not supported"),
            ("http://bücher.example/in", "ASCII"),
            ("http://hooks.example.org/a b", "ASCII"),
            ("http://hooks.example.org:99999/in", "bad port"),
        ]:
            message = self.refused(url=url)
            self.assertIn("[delivery.hook] url:", message)
            self.assertIn(reason, message, url)

    def test_badTimeouts(self) -> None:
        """
        A timeout must be a number of at least one second.
        """
        for timeout in (0, 0.5, "30", True):
            self.assertIn("timeout", self.refused(url="http://h.example/", timeout=timeout))

    def test_unknownOption(self) -> None:
        """
        A misspelt option is refused rather than ignored.
        """
        message = self.refused(url="http://h.example/", timout=5)
        self.assertIn("unknown option 'timout'", message)


class PluginTests(SynchronousTestCase):
    def test_foundByName(self) -> None:
        """
        With the distribution installed, mailfw finds the plugin by the name
        C{webhook}, and it builds a L{WebhookAgent}.
        """
        plugin = findPlugin(IDeliveryAgentFactory, "webhook")
        context = ComponentContext(
            reactor=MemoryReactorClock(), hostname="mx.test", dataDir=Path("/nonexistent")
        )
        options = {"plugin": "webhook", "url": "http://h.example/"}
        agent = plugin.fromConfig(context, "hook", options)
        self.assertIsInstance(agent, WebhookAgent)


class WebhookAgentContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    The conformance tests every mailfw delivery agent passes.
    """

    def makeAgent(self) -> IDeliveryAgent:
        self.clock = Clock()
        self.http = FakeHTTP(self.clock)
        return WebhookAgent("hook", URL, self.http, self.clock)

    def resultOf(
        self, agent: IDeliveryAgent, deferred: Deferred[Sequence[RecipientOutcome]]
    ) -> Sequence[RecipientOutcome]:
        self.http.answerAll(200)
        return self.successResultOf(deferred)

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        for sent in reversed(self.http.requests):
            if str(recipient).encode("utf-8") in sent.header(b"x-rcpt-to"):
                return sent.body
        return None
