"""
The C{milter} policy against a scripted filter (tests/_milterpeer.py): the
protocol, each stage, every reply and modification action, and a filter
that is down, slow or broken.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ComponentContext, ConfigError
from mailfw.policy._milter import MilterError, MilterPolicy, fromConfig, packet, parsePackets
from mailfw.testing import PolicyContractTests
from tests._milterpeer import MilterEndpoint, MilterScript, ScriptedMilter
from tests._smtpdoubles import EHLO, HOSTNAME, PROLOGUE, connect

BODY = b"Subject: hello\r\nFrom: <sender@example.net>\r\n\r\nline one\r\n"


def milter(script: MilterScript, clock: Clock, **kw: Any) -> tuple[MilterPolicy, MilterEndpoint]:
    endpoint = MilterEndpoint(script, refuse=kw.pop("refuse", False), hang=kw.pop("hang", False))
    return MilterPolicy("filter", endpoint, clock, HOSTNAME, "inet:test:1", **kw), endpoint


class MilterTests(SynchronousTestCase):
    def session(
        self, script: MilterScript, body: bytes = BODY, **kw: Any
    ) -> tuple[Any, ScriptedMilter | None]:
        clock = Clock()
        policy, endpoint = milter(script, clock, **kw)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + body + b".\r\n")
        return conn, (endpoint.filters[0] if endpoint.filters else None)

    def test_everyStage(self) -> None:
        """
        The filter sees connect, HELO, MAIL, RCPT, DATA, each header field,
        the end of headers, the body and the end of message, with
        Postfix's default macros for each stage.
        """
        conn, peer = self.session(MilterScript())
        assert peer is not None
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(peer.commands(), [b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"L", b"N", b"B", b"E"])
        sent = dict(peer.received)
        self.assertEqual(sent[b"C"], b"unknown\x004" + struct.pack("!H", 40000) + b"192.0.2.1\x00")
        self.assertEqual(sent[b"M"], b"<sender@example.net>\x00")
        self.assertEqual(sent[b"R"], b"<rcpt@example.org>\x00")
        headers = [data for command, data in peer.received if command == b"L"]
        self.assertTrue(headers[0].startswith(b"Received\x00from client.example.net"), headers[0])
        self.assertEqual(headers[1:], [b"Subject\x00hello\x00", b"From\x00<sender@example.net>\x00"])
        self.assertEqual(sent[b"B"], b"line one\r\n")
        self.assertEqual(peer.macros[b"C"]["{client_addr}"], "192.0.2.1")
        self.assertEqual(peer.macros[b"C"]["j"], HOSTNAME)
        self.assertEqual(peer.macros[b"M"]["{mail_addr}"], "sender@example.net")
        self.assertEqual(peer.macros[b"R"]["{rcpt_addr}"], "rcpt@example.org")
        [(_, incoming)] = conn.queue.committed
        self.assertEqual(peer.macros[b"E"]["i"], incoming.queueID)

    def test_skippedSteps(self) -> None:
        """
        Steps the filter does not want are not sent; steps it does not
        answer (no-reply flags) are sent without waiting.
        """
        script = MilterScript(protocol=0x2 | 0x20 | 0x8000 | 0x80000)  # NOHELO, NOHDRS, NR_RCPT, NR_BODY
        conn, peer = self.session(script)
        assert peer is not None
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(peer.commands(), [b"C", b"M", b"R", b"T", b"N", b"B", b"E"])

    def test_macroListsRequested(self) -> None:
        """
        A filter's own macro lists (SETSYMLIST in its negotiation reply)
        replace the defaults.
        """
        symlist = struct.pack("!I", 2) + b"{mail_addr} {auth_authen}\0"
        _, peer = self.session(MilterScript(symlist=symlist))
        assert peer is not None
        self.assertEqual(peer.macros[b"M"], {"{mail_addr}": "sender@example.net"})

    def test_rejectRecipient(self) -> None:
        """
        A reject at RCPT refuses that recipient with 550 5.7.1.
        """
        conn, _ = self.session(MilterScript(replies={b"R": (b"r", b"")}))
        self.assertIn(b"550 5.7.1 Command rejected", conn.lines())
        self.assertEqual(conn.queue.committed, [])

    def test_replyCode(self) -> None:
        """
        A reply code is passed on as the filter wrote it.
        """
        conn, _ = self.session(
            MilterScript(replies={b"M": (b"y", b"451 4.7.0 Greylisted, come back later\0")})
        )
        self.assertIn(b"451 4.7.0 Greylisted, come back later", conn.lines())

    def test_badReplyCodeIsDefault(self) -> None:
        """
        A reply code that is not 4xx or 5xx fails the filter: the default
        action (tempfail) answers.
        """
        conn, _ = self.session(MilterScript(replies={b"M": (b"y", b"250 fine\0")}))
        self.assertIn(b"451 4.7.1 Service unavailable - try again later", conn.lines())

    def test_tempfailAndDiscardAtEnd(self) -> None:
        """
        tempfail at the end of message is 451 4.7.1; discard accepts and
        stores nothing.
        """
        conn, _ = self.session(MilterScript(replies={b"E": (b"t", b"")}))
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Service unavailable - try again later")
        self.assertEqual(conn.queue.committed, [])
        conn, _ = self.session(MilterScript(replies={b"E": (b"d", b"")}))
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(conn.queue.committed, [])

    def test_modifications(self) -> None:
        """
        Every modification action applies to the queued copy: header added,
        inserted, changed and deleted; sender changed; recipient added and
        deleted; body replaced.
        """
        eom = [
            (b"h", b"X-Added\0yes\0"),
            (b"i", struct.pack("!I", 0) + b"X-Top\0first\0"),
            (b"m", struct.pack("!I", 1) + b"Subject\0changed\0"),
            (b"m", struct.pack("!I", 1) + b"From\0\0"),
            (b"e", b"<bounces@example.net>\0"),
            (b"+", b"<archive@example.org>\0"),
            (b"-", b"<rcpt@example.org>\0"),
            (b"b", b"new body\r\n"),
        ]
        conn, _ = self.session(MilterScript(eom=eom))
        self.assertEqual(conn.newCodes()[-1], b"250")
        [(_, incoming)] = conn.queue.committed
        data = incoming.data
        self.assertTrue(data.startswith(b"X-Top: first\r\nReceived: "), data)
        self.assertIn(b"Subject: changed\r\nX-Added: yes\r\n\r\nnew body\r\n", data)
        self.assertNotIn(b"From:", data)
        assert incoming.envelope is not None
        self.assertEqual(str(incoming.envelope.sender), "bounces@example.net")
        self.assertEqual([str(r.address) for r in incoming.envelope.recipients], ["archive@example.org"])

    def test_quarantine(self) -> None:
        """
        Quarantine holds the queued message.
        """
        conn, _ = self.session(MilterScript(eom=[(b"q", b"looks like spam\0")]))
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.hold)

    def test_unnegotiatedModification(self) -> None:
        """
        A modification the filter did not ask for at negotiation fails it.
        """
        conn, _ = self.session(MilterScript(actions=0x1, eom=[(b"-", b"<rcpt@example.org>\0")]))
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Service unavailable - try again later")
        self.assertEqual(conn.queue.committed, [])

    def test_filterDown(self) -> None:
        """
        A filter that cannot be reached: the session goes on, and its
        transactions get the default action (tempfail, or accept).
        """
        conn, peer = self.session(MilterScript(), refuse=True)
        self.assertIsNone(peer)
        self.assertIn(b"451 4.7.1 Service unavailable - try again later", conn.lines())
        self.assertEqual(conn.queue.committed, [])
        conn, _ = self.session(MilterScript(), refuse=True, defaultAction="accept")
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(len(conn.queue.committed), 1)

    def test_connectTimeout(self) -> None:
        """
        A connection that does not complete in time fails the filter.
        """
        clock = Clock()
        policy, _ = milter(MilterScript(), clock, hang=True, connectTimeout=5.0)
        conn = connect(policies=(policy,), clock=clock, greet=False)
        self.assertEqual(conn.lines(), [])
        clock.advance(5)
        self.assertEqual(conn.lines(), [b"220 mx.example.org ESMTP"])
        conn.send(EHLO + b"MAIL FROM:<a@example.net>\r\n")
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Service unavailable - try again later")

    def test_filterNeverAnswers(self) -> None:
        """
        A filter that does not answer within command_timeout fails; the
        session gets the default action and goes on.
        """
        clock = Clock()
        policy, endpoint = milter(MilterScript(replies={b"M": "silent"}), clock, commandTimeout=10.0)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(EHLO + b"MAIL FROM:<a@example.net>\r\n")
        self.assertEqual(conn.newCodes(), [b"250"])
        clock.advance(10)
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Service unavailable - try again later")
        self.assertTrue(endpoint.filters[0].closed)

    def test_filterClosesMidExchange(self) -> None:
        """
        A filter that hangs up before answering the end of message: default
        action, never a traceback.
        """
        clock = Clock()
        policy, endpoint = milter(MilterScript(replies={b"E": "hold"}), clock)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        peer = endpoint.filters[0]
        assert peer.transport is not None
        peer.transport.loseConnection()
        self.assertEqual(conn.lines()[-1], b"451 4.7.1 Service unavailable - try again later")

    def test_malformedPackets(self) -> None:
        """
        An oversized, empty or unknown packet fails the filter.
        """
        for raw in (struct.pack("!I", 1 << 30), struct.pack("!I", 0), packet(b"Z")):
            conn, _ = self.session(MilterScript(replies={b"M": raw}))
            self.assertIn(b"451 4.7.1 Service unavailable - try again later", conn.lines(), raw)

    def test_bodyInChunksWithFlowControl(self) -> None:
        """
        The body goes in chunks of at most 64 KiB, each after the previous
        one is answered; meanwhile the session stops reading.
        """
        clock = Clock()
        policy, endpoint = milter(MilterScript(replies={b"B": "hold"}), clock)
        conn = connect(policies=(policy,), clock=clock)
        body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
        conn.send(PROLOGUE + body + (b"y" * 998 + b"\r\n") * 150)
        peer = endpoint.filters[0]
        self.assertEqual(conn.transport.producerState, "paused")
        while peer.held:
            peer.release()
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(b".\r\n")
        while peer.held:
            peer.release()
        self.assertEqual(conn.newCodes()[-1], b"250")
        chunks = [data for command, data in peer.received if command == b"B"]
        self.assertTrue(all(len(chunk) <= 65535 for chunk in chunks))
        self.assertEqual(sum(len(chunk) for chunk in chunks), 1000 * 151)

    def test_skipBody(self) -> None:
        """
        After SKIP no more body chunks are sent.
        """
        body = b"Subject: s\r\n\r\n" + (b"z" * 998 + b"\r\n") * 200
        conn, peer = self.session(MilterScript(replies={b"B": (b"s", b"")}), body=body)
        assert peer is not None
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(peer.commands().count(b"B"), 1)

    def test_abortAndQuit(self) -> None:
        """
        RSET after DATA started tells the filter to abort the message; the
        end of the session says QUIT.
        """
        clock = Clock()
        policy, endpoint = milter(MilterScript(), clock)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + BODY)
        conn.proto.connectionLost()
        peer = endpoint.filters[0]
        self.assertEqual(peer.commands()[-2:], [b"A", b"Q"])
        self.assertTrue(peer.closed)

    def test_acceptStopsAsking(self) -> None:
        """
        accept at connect leaves the filter out of the session.
        """
        conn, peer = self.session(MilterScript(replies={b"C": (b"a", b"")}))
        assert peer is not None
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(peer.commands(), [b"C"])

    def test_packets(self) -> None:
        """
        The packet reader takes complete packets and leaves the rest.
        """
        buffer = bytearray(packet(b"c") + packet(b"h", b"a\0b\0")[:-1])
        self.assertEqual(parsePackets(buffer), [(b"c", b"")])
        buffer += b"\0"
        self.assertEqual(parsePackets(buffer), [(b"h", b"a\0b\0")])
        with self.assertRaises(MilterError):
            parsePackets(bytearray(struct.pack("!I", 0)))

    def test_config(self) -> None:
        """
        fromConfig checks the address, the default action and the macro
        stages.
        """
        context = ComponentContext(reactor=MemoryReactorClock(), hostname="mx.example.org", dataDir=None)  # type: ignore[arg-type]
        policy = fromConfig(
            context, "f", {"plugin": "milter", "address": "inet:127.0.0.1:8891", "default_action": "accept"}
        )
        self.assertEqual(policy.defaultAction, "accept")
        for bad in (
            {"address": "inet:nope"},
            {"address": "unix:/x", "macros": {"later": ["i"]}},
            {"address": "unix:/x", "default_action": "maybe"},
        ):
            with self.assertRaises(ConfigError):
                fromConfig(context, "f", {"plugin": "milter", **bad})


class MilterContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> MilterPolicy:
        return milter(MilterScript(), Clock())[0]


class MilterReaderPropertyTests(SynchronousTestCase):
    """
    Whatever a filter sends, the reader either hands the session a reply,
    or fails the filter with one reason: never an exception, never a hang.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=8), st.sampled_from([b"M", b"E", b"B"]))
    def test_anyBytes(self, pieces: list[bytes], stage: bytes) -> None:
        clock = Clock()
        policy, endpoint = milter(MilterScript(replies={stage: "hold"}), clock)
        conn = connect(policies=(policy,), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        [peer] = endpoint.filters
        assert peer.transport is not None
        for piece in pieces:
            peer.transport.write(piece)
        clock.advance(60)
        # Every command got an answer: the session ended its transaction.
        self.assertIn(conn.lines()[-1][:1], (b"2", b"4", b"5"))
        self.assertEqual(self.flushLoggedErrors(), [])
