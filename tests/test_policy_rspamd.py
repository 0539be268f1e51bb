"""
The C{rspamd} policy against a fake rspamd (a twisted.web resource served
in memory by L{treq.testing.StubTreq}): the request it makes, every action,
the C{milter} block, and rspamd that is down, slow or broken.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError
from mailfw.policy._rspamd import RspamdPolicy, fromConfig
from mailfw.policy._streaming import BodyStream
from mailfw.testing import PolicyContractTests
from tests._smtpdoubles import HOSTNAME, PROLOGUE, connect

BODY = b"Subject: hello\r\nFrom: <sender@example.net>\r\nX-Spam: yes\r\n\r\nline one\r\n"
TEMPFAIL = b"451 4.7.1 Service unavailable - try again later"


def answer(action: str = "no action", score: float = 1.5, **extra: Any) -> dict[str, Any]:
    return {"action": action, "score": score, "required_score": 15.0, "symbols": {}, **extra}


class FakeRspamd(Resource):
    """
    rspamd's C{/checkv2}: records each request and answers with
    C{respond(request)}: a JSON-able object, raw bytes, or C{None} for
    "answer nothing".
    """

    isLeaf = True

    def __init__(self, respond: Callable[[Request], Any]) -> None:
        super().__init__()
        self.respond = respond
        self.requests: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = {name: list(values) for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.uri, headers, request.content.read()))
        reply = self.respond(request)
        if reply is None:
            return NOT_DONE_YET
        if isinstance(reply, bytes):
            return reply
        return json.dumps(reply).encode()


def rspamd(
    respond: Callable[[Request], Any], clock: Clock, **kw: Any
) -> tuple[RspamdPolicy, RequestTraversalAgent, FakeRspamd]:
    """
    A policy talking to a L{FakeRspamd} in memory through treq's client;
    C{agent.flush()} moves the bytes.
    """
    fake = FakeRspamd(respond)
    agent = RequestTraversalAgent(fake)
    policy = RspamdPolicy("spam", "http://rspamd.test:11333", HTTPClient(agent), clock, HOSTNAME, **kw)
    return policy, agent, fake


class RspamdTests(SynchronousTestCase):
    def session(
        self, respond: Callable[[Request], Any], body: bytes = BODY, **kw: Any
    ) -> tuple[Any, FakeRspamd]:
        clock = Clock()
        policy, stub, fake = rspamd(respond, clock, **kw)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + body + b".\r\n")
        stub.flush()
        return conn, fake

    def stored(self, conn: Any) -> bytes:
        [(_, incoming)] = conn.queue.committed
        return bytes(incoming.data)

    def test_request(self) -> None:
        """
        The message goes to POST /checkv2, chunked, with the envelope and
        the client in rspamd's request headers; a clean message is
        accepted with the result field.
        """
        conn, fake = self.session(
            lambda r: answer(milter={"remove_headers": {"X-Spam": 0}}), password="sekrit"
        )
        self.assertEqual(conn.lines()[-1][:3], b"250")
        [(uri, headers, body)] = fake.requests
        self.assertEqual(uri, b"/checkv2")
        self.assertEqual(headers[b"Transfer-Encoding"], [b"chunked"])
        self.assertEqual(headers[b"Ip"], [b"192.0.2.1"])
        self.assertEqual(headers[b"Helo"], [b"client.example.net"])
        self.assertEqual(headers[b"From"], [b"<sender@example.net>"])
        self.assertEqual(headers[b"Rcpt"], [b"<rcpt@example.org>"])
        self.assertEqual(headers[b"Mta-Name"], [HOSTNAME.encode()])
        self.assertEqual(headers[b"Password"], [b"sekrit"])
        self.assertNotIn(b"Hostname", headers)
        [(_, incoming)] = conn.queue.committed
        self.assertEqual(headers[b"Queue-Id"], [incoming.queueID.encode()])
        self.assertTrue(body.startswith(b"Received: from client.example.net"), body)
        self.assertTrue(
            body.endswith(b"Subject: hello\r\nFrom: <sender@example.net>\r\nX-Spam: yes\r\n\r\nline one\r\n")
        )
        stored = self.stored(conn)
        self.assertIn(b"X-Spam-Status: No, score=1.50 required=15.00\r\n", stored)
        # rspamd's milter block removed the client's X-Spam.
        self.assertNotIn(b"X-Spam:", stored)

    def test_recipientsAndUser(self) -> None:
        """
        One Rcpt header per recipient; the null sender is <>.
        """
        clock = Clock()
        policy, stub, fake = rspamd(lambda r: answer(), clock)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(
            b"EHLO c.example\r\nMAIL FROM:<>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            + BODY
            + b".\r\n"
        )
        stub.flush()
        [(_, headers, _)] = fake.requests
        self.assertEqual(headers[b"Rcpt"], [b"<a@example.org>", b"<b@example.org>"])
        self.assertEqual(headers[b"From"], [b"<>"])
        self.assertNotIn(b"User", headers)

    def test_reject(self) -> None:
        """
        reject is 550 5.7.1 with rspamd's SMTP message, or a default text.
        """
        conn, _ = self.session(lambda r: answer("reject", 20.0, messages={"smtp_message": "Gtube pattern"}))
        self.assertEqual(conn.lines()[-1], b"550 5.7.1 Gtube pattern")
        self.assertEqual(conn.queue.committed, [])
        conn, _ = self.session(lambda r: answer("reject", 20.0))
        self.assertEqual(conn.lines()[-1], b"550 5.7.1 Spam message rejected")

    def test_softRejectAndGreylist(self) -> None:
        """
        soft reject and greylist are 451 4.7.1.
        """
        conn, _ = self.session(lambda r: answer("soft reject"))
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Try again later")
        conn, _ = self.session(lambda r: answer("greylist"))
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Greylisted, please try again later")
        self.assertEqual(conn.queue.committed, [])

    def test_addHeader(self) -> None:
        """
        add header accepts with X-Spam: Yes and the result field saying Yes.
        """
        conn, _ = self.session(lambda r: answer("add header", 7.25))
        stored = self.stored(conn)
        self.assertIn(b"X-Spam: Yes\r\n", stored)
        self.assertIn(b"X-Spam-Status: Yes, score=7.25 required=15.00\r\n", stored)

    def test_rewriteSubject(self) -> None:
        """
        rewrite subject changes the Subject field.
        """
        conn, _ = self.session(lambda r: answer("rewrite subject", 9.0, subject="*** SPAM *** hello"))
        stored = self.stored(conn)
        self.assertIn(b"Subject: *** SPAM *** hello\r\n", stored)
        self.assertNotIn(b"Subject: hello\r\n", stored)

    def test_milterBlock(self) -> None:
        """
        The milter block's header additions (a value, a value with an
        order, a list) and removals apply; rspamd's own result field
        replaces ours.
        """
        block = {
            "add_headers": {
                "X-Spamd-Bar": "+",
                "X-Rspamd-Server": {"value": "scanner", "order": 1},
                "X-Spam-Status": [{"value": "No, score=1.5", "order": 0}],
            },
            "remove_headers": {"Subject": 1},
        }
        conn, _ = self.session(lambda r: answer(milter=block))
        stored = self.stored(conn)
        self.assertTrue(stored.startswith(b"X-Rspamd-Server: scanner\r\nReceived: "), stored)
        self.assertIn(b"X-Spamd-Bar: +\r\n", stored)
        self.assertIn(b"X-Spam-Status: No, score=1.5\r\n", stored)
        self.assertNotIn(b"required=", stored)
        self.assertNotIn(b"Subject:", stored)

    def test_forgedResultHeaderRemoved(self) -> None:
        """
        A client's own X-Spam-Status does not survive: ours replaces it.
        """
        body = b"Subject: s\r\nX-Spam-Status: No, score=-100\r\n\r\nhi\r\n"
        conn, _ = self.session(lambda r: answer("no action", 3.0), body=body)
        stored = self.stored(conn)
        self.assertNotIn(b"score=-100", stored)
        self.assertIn(b"X-Spam-Status: No, score=3.00 required=15.00\r\n", stored)

    def test_discardAndQuarantine(self) -> None:
        """
        discard accepts and stores nothing; quarantine holds the message.
        """
        conn, _ = self.session(lambda r: answer("discard"))
        self.assertEqual(conn.lines()[-1][:3], b"250")
        self.assertEqual(conn.queue.committed, [])
        conn, _ = self.session(lambda r: answer("quarantine"))
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.hold)

    def test_rspamdDown(self) -> None:
        """
        rspamd that cannot be reached: default action (tempfail, or
        accept, or reject), one log line naming the filter.
        """
        events: list[dict[str, Any]] = []
        self.patch(RspamdPolicy, "log", Logger(observer=events.append))  # type: ignore[arg-type]

        @implementer(IAgent)
        class DownAgent:
            def request(self, *args: object, **kw: object) -> Deferred[Any]:
                return fail(ConnectionRefusedError())

        for action, expected in (("tempfail", TEMPFAIL), ("reject", b"550 5.7.1 Command rejected")):
            clock = Clock()
            policy = RspamdPolicy(
                "spam",
                "http://rspamd.test:11333",
                HTTPClient(DownAgent()),
                clock,
                HOSTNAME,
                defaultAction=action,
            )
            conn = connect(policies=(policy,), clock=clock)
            conn.send(PROLOGUE + BODY + b".\r\n")
            self.assertEqual(conn.lines()[-1], expected)
            self.assertEqual(conn.queue.committed, [])
        self.assertEqual(len(events), 2)
        self.assertEqual(events[0]["policy"], "spam")
        self.assertEqual(events[0]["filter"], "http://rspamd.test:11333")
        self.assertIn("Connection was refused", events[0]["reason"])
        clock = Clock()
        policy = RspamdPolicy(
            "spam",
            "http://rspamd.test:11333",
            HTTPClient(DownAgent()),
            clock,
            HOSTNAME,
            defaultAction="accept",
        )
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        self.assertEqual(conn.lines()[-1][:3], b"250")
        self.assertNotIn(b"X-Spam-Status", self.stored(conn))
        self.flushLoggedErrors()

    def test_badAnswers(self) -> None:
        """
        An HTTP error, an answer that is not JSON, an unknown action, a
        malformed milter block or an oversized answer: default action.
        """

        def status(request: Request) -> bytes:
            request.setResponseCode(500)
            return b"oops"

        for respond in (
            status,
            lambda r: b"not json",
            lambda r: [1, 2],
            lambda r: answer("explode"),
            lambda r: answer(milter={"add_headers": {"Bad Name": "x"}}),
            lambda r: answer(milter={"remove_headers": {"X-Spam": "all"}}),
            lambda r: {**answer(), "score": "lots"},
            lambda r: b"{" + b" " * (3 << 20) + b"}",
        ):
            conn, _ = self.session(respond)
            self.assertEqual(conn.lines()[-1], TEMPFAIL)
            self.assertEqual(conn.queue.committed, [])

    def test_neverAnswers(self) -> None:
        """
        rspamd that takes the message and says nothing: after scan_timeout
        the default action, and the request is dropped.
        """
        clock = Clock()
        policy, stub, _ = rspamd(lambda r: None, clock, scanTimeout=10.0)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        stub.flush()
        self.assertEqual(conn.lines()[-1][:3], b"354")
        clock.advance(10)
        self.assertEqual(conn.lines()[-1], TEMPFAIL)

    def test_closesMidAnswer(self) -> None:
        """
        rspamd that hangs up halfway through its answer: default action.
        """

        def half(request: Request) -> None:
            request.setHeader(b"Content-Length", b"500")
            request.write(b'{"action": "no ac')
            request.channel.transport.loseConnection()  # type: ignore[union-attr]
            return None

        conn, _ = self.session(half)
        self.assertEqual(conn.lines()[-1], TEMPFAIL)
        self.assertEqual(conn.queue.committed, [])

    def test_maxSize(self) -> None:
        """
        A message above max_size is not scanned (the request is dropped
        when the size is passed) and is accepted without the result field;
        one declared larger with SIZE= is not sent at all.
        """
        big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 1
        conn, fake = self.session(lambda r: answer("reject"), body=big * 3, maxSize=2000)
        self.assertEqual(conn.lines()[-1][:3], b"250")
        self.assertNotIn(b"X-Spam-Status", self.stored(conn))
        clock = Clock()
        policy, stub, fake = rspamd(lambda r: answer("reject"), clock, maxSize=2000)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(
            b"EHLO c.example\r\nMAIL FROM:<a@example.net> SIZE=5000\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        conn.send(BODY + b".\r\n")
        stub.flush()
        self.assertEqual(conn.lines()[-1][:3], b"250")
        self.assertEqual(fake.requests, [])

    def test_config(self) -> None:
        """
        fromConfig checks the URL, the default action and the numbers.
        """
        context = ComponentContext(reactor=MemoryReactorClock(), hostname="mx.example.org", dataDir=None)  # type: ignore[arg-type]
        policy = fromConfig(
            context,
            "spam",
            {
                "plugin": "rspamd",
                "url": "http://127.0.0.1:11333",
                "default_action": "accept",
                "max_size": 1000,
            },
        )
        self.assertEqual(
            (policy.url, policy.defaultAction, policy.maxSize), ("http://127.0.0.1:11333", "accept", 1000)
        )
        for bad in (
            {},
            {"url": "127.0.0.1:11333"},
            {"url": "http://127.0.0.1:11333", "default_action": "maybe"},
            {"url": "http://127.0.0.1:11333", "scan_timeout": 0},
            {"url": "http://127.0.0.1:11333", "colour": "red"},
        ):
            with self.assertRaises(ConfigError):
                fromConfig(context, "spam", {"plugin": "rspamd", **bad})


class BodyStreamTests(SynchronousTestCase):
    def test_pacing(self) -> None:
        """
        Writes wait until the consumer is there and while it is paused; the
        request ends once finished and drained.
        """
        stream = BodyStream()
        waited = stream.write(b"one")
        self.assertIsInstance(waited, Deferred)
        self.assertTrue(stream.waiting)
        written: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        done = stream.startProducing(Consumer())  # type: ignore[arg-type]
        self.assertEqual(written, [b"one"])
        assert waited is not None
        self.successResultOf(waited)
        self.assertIsNone(stream.write(b"two"))
        stream.pauseProducing()
        paused = stream.write(b"three")
        assert paused is not None
        self.assertNoResult(paused)
        stream.finish()
        self.assertNoResult(done)
        stream.resumeProducing()
        self.successResultOf(paused)
        self.successResultOf(done)
        self.assertEqual(written, [b"one", b"two", b"three"])

    def test_stopped(self) -> None:
        """
        A stopped stream releases its writers and drops what follows.
        """
        stream = BodyStream()
        waited = stream.write(b"one")
        assert waited is not None
        stream.stopProducing()
        self.successResultOf(waited)
        self.assertIsNone(stream.write(b"two"))


class RspamdContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> RspamdPolicy:
        self.stub: RequestTraversalAgent | None = None
        policy, self.stub, _ = rspamd(lambda r: answer(), Clock())
        return policy

    def resultOf(self, d: Deferred[Any]) -> Any:
        if self.stub is not None:
            self.stub.flush()
        return self.successResultOf(d)
