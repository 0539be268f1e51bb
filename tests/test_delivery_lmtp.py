"""
Tests for L{mailfw.delivery._lmtp} and the body streaming helpers in
L{mailfw.delivery._stream}, against scripted LMTP peers on
L{StringTransport}s (the real Dovecot test is in tests/integration).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._contract import DeliveryAgentContractTests, UnreadableBody
from mailfw.delivery._lmtp import LMTPDeliveryAgent, ProtocolViolation, fromConfig, parseReplyLine
from mailfw.delivery._memory import BytesBody
from mailfw.delivery._stream import DotStuffer
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory
from mailfw.plugin import findPlugin
from mailfw.reply import replyFromPeer as makeReply
from mailfw.testing import FullTransport

ALICE = Address("alice", "example.org")
BOB = Address("bob", "example.org")
CAROL = Address("carol", "example.org")
MESSAGE = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n..two dots\r\n"
STUFFED = b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n...two dots\r\n.\r\n"


def envelopeTo(*addresses: Address, **kwargs: Any) -> Envelope:
    return Envelope(
        sender=Address("sender", "example.net"),
        recipients=tuple(Recipient(a) for a in addresses),
        **kwargs,
    )


class LMTPTransport(FullTransport):
    """
    A transport with flow control that records C{setTcpNoDelay}.
    """

    noDelay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    Connects protocols to L{StringTransport}s, or fails, or never answers.
    """

    def __init__(self) -> None:
        self.transports: list[LMTPTransport] = []
        self.protocols: list[Any] = []
        self.error: Exception | None = None
        self.hang = False

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        if self.hang:
            return Deferred()
        protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        transport = LMTPTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


class Peer:
    """
    The server side of one scripted LMTP session.
    """

    def __init__(self, endpoint: FakeEndpoint) -> None:
        self.transport = endpoint.transports[-1]
        self.protocol = endpoint.protocols[-1]

    def say(self, *lines: bytes) -> None:
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))

    def heard(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def pump(self) -> None:
        """
        Let the client's body producer run to the end, as a draining socket
        would make it.
        """
        for _ in range(100_000):
            producer = self.transport.producer
            if producer is None:
                return
            producer.resumeProducing()
        raise AssertionError("producer never finished")

    def lost(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ConnectionRefusedError()))


class Session(SynchronousTestCase):
    """
    Shared set-up: an agent on a fake endpoint and a clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.agent = LMTPDeliveryAgent("lmtp", self.endpoint, self.clock, "mx.example")

    def start(
        self, *addresses: Address, body: Any = None, **kwargs: Any
    ) -> tuple[Deferred[Sequence[RecipientOutcome]], Peer]:
        d = self.agent.deliver(envelopeTo(*addresses, **kwargs), body or BytesBody(MESSAGE), None)
        return d, Peer(self.endpoint)

    def toMail(self, peer: Peer, extensions: Sequence[bytes] = (b"PIPELINING",)) -> None:
        peer.say(b"220 lmtp.example LMTP ready")
        self.assertEqual(peer.heard(), b"LHLO mx.example\r\n")
        lines = [b"250-lmtp.example", *(b"250-" + e for e in extensions[:-1])]
        lines.append(b"250 " + extensions[-1])
        peer.say(*lines)

    def codes(self, d: Deferred[Sequence[RecipientOutcome]]) -> list[tuple[int, str]]:
        return [(o.reply.code, o.reply.enhanced) for o in self.successResultOf(d)]


class TransactionTests(Session):
    """
    Whole LMTP transactions.
    """

    def test_noDelayAndEndWithLastChunk(self) -> None:
        """
        The connection turns off Nagle's algorithm, and the final dot goes
        out in the same write as the end of the body.
        """
        body = b"Subject: big\r\n\r\n" + b"x" * 200_000 + b"\r\nlast\r\n"
        d, peer = self.start(ALICE, body=BytesBody(body))
        self.assertIs(peer.transport.noDelay, True)
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK")
        peer.heard()
        writes: list[bytes] = []
        write = peer.transport.write

        def recording(data: bytes) -> None:
            writes.append(data)
            write(data)

        peer.transport.write = recording  # type: ignore[method-assign]
        peer.say(b"354 go")
        peer.pump()
        self.assertGreater(len(writes), 1)
        self.assertTrue(writes[-1].endswith(b"x\r\nlast\r\n.\r\n"), writes[-1][-20:])
        self.assertEqual(peer.heard(), body + b".\r\n")
        peer.say(b"250 2.0.0 ok")
        self.assertEqual(self.codes(d), [(250, "2.0.0")])

    def test_perRecipientReplies(self) -> None:
        """
        RCPT refusals and the per-recipient replies after the final dot map
        to the right recipients, in envelope order.
        """
        d, peer = self.start(ALICE, BOB, CAROL)
        self.toMail(peer)
        self.assertEqual(peer.heard(), b"MAIL FROM:<sender@example.net>\r\n")
        peer.say(b"250 2.1.0 OK")
        self.assertEqual(peer.heard(), b"RCPT TO:<alice@example.org>\r\n")
        peer.say(b"250 2.1.5 OK")
        self.assertEqual(peer.heard(), b"RCPT TO:<bob@example.org>\r\n")
        peer.say(b"550 5.1.1 <bob@example.org> User doesn't exist")
        self.assertEqual(peer.heard(), b"RCPT TO:<carol@example.org>\r\n")
        peer.say(b"250 2.1.5 OK")
        self.assertEqual(peer.heard(), b"DATA\r\n")
        peer.say(b"354 OK")
        peer.pump()
        self.assertEqual(peer.heard(), STUFFED)
        peer.say(b"250 2.0.0 <alice@example.org> Saved")
        self.assertNoResult(d)
        peer.say(b"452 4.2.2 <carol@example.org> Mailbox full")
        outcomes = self.successResultOf(d)
        self.assertEqual(
            [(o.recipient.address, o.reply.code, o.reply.enhanced) for o in outcomes],
            [(ALICE, 250, "2.0.0"), (BOB, 550, "5.1.1"), (CAROL, 452, "4.2.2")],
        )
        self.assertEqual(outcomes[1].reply.text, "<bob@example.org> User doesn't exist")
        self.assertEqual({o.remoteMTA for o in outcomes}, {"lmtp.example"})
        self.assertEqual(peer.heard(), b"QUIT\r\n")
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mailParameters(self) -> None:
        """
        BODY=8BITMIME and SMTPUTF8 are sent when the message needs them and
        the server offers them, and not otherwise.
        """
        self.agent.deliver(envelopeTo(ALICE, smtputf8=True), BytesBody(MESSAGE), None)
        peer = Peer(self.endpoint)
        self.toMail(peer, [b"8BITMIME", b"SMTPUTF8"])
        self.assertEqual(peer.heard(), b"MAIL FROM:<sender@example.net> SMTPUTF8\r\n")
        envelope = envelopeTo(ALICE, body="8BITMIME", smtputf8=True)
        self.agent.deliver(envelope, BytesBody(MESSAGE), None)
        peer = Peer(self.endpoint)
        self.toMail(peer, [b"8BITMIME", b"ENHANCEDSTATUSCODES"])
        self.assertEqual(peer.heard(), b"MAIL FROM:<sender@example.net> BODY=8BITMIME\r\n")
        self.agent.deliver(envelopeTo(ALICE, body="8BITMIME"), BytesBody(MESSAGE), None)
        peer = Peer(self.endpoint)
        self.toMail(peer, [b"PIPELINING"])
        self.assertEqual(peer.heard(), b"MAIL FROM:<sender@example.net>\r\n")

    def test_nullSenderAndUTF8(self) -> None:
        """
        The null sender is sent as C{<>} and UTF-8 addresses as UTF-8.
        """
        envelope = Envelope(sender=None, recipients=(Recipient(Address("jürgen", "example.org")),))
        self.agent.deliver(envelope, BytesBody(MESSAGE), None)
        peer = Peer(self.endpoint)
        self.toMail(peer)
        self.assertEqual(peer.heard(), b"MAIL FROM:<>\r\n")
        peer.say(b"250 OK")
        self.assertEqual(peer.heard(), "RCPT TO:<jürgen@example.org>\r\n".encode())

    def test_allRecipientsRefused(self) -> None:
        """
        When no RCPT is accepted, no DATA is sent and the session ends.
        """
        d, peer = self.start(ALICE, BOB)
        self.toMail(peer)
        peer.say(b"250 OK", b"550 5.1.1 no", b"450 4.2.1 later")
        self.assertEqual(self.codes(d), [(550, "5.1.1"), (450, "4.2.1")])
        self.assertEqual(
            peer.heard(),
            b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\nQUIT\r\n",
        )

    def test_mailRefused(self) -> None:
        """
        A refused MAIL gives its reply to every recipient, 4xx and 5xx alike.
        """
        for line, expected in [(b"550 5.1.8 bad sender", (550, "5.1.8")), (b"451 busy", (451, "4.0.0"))]:
            d, peer = self.start(ALICE, BOB)
            self.toMail(peer)
            peer.say(line)
            self.assertEqual(self.codes(d), [expected, expected])

    def test_dataRefused(self) -> None:
        """
        A refused DATA applies to the accepted recipients; refused ones keep
        their RCPT reply.
        """
        d, peer = self.start(ALICE, BOB)
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"550 5.1.1 no", b"554 5.3.4 too big")
        self.assertEqual(self.codes(d), [(554, "5.3.4"), (550, "5.1.1")])

    def test_emptyMessageAndMissingFinalCRLF(self) -> None:
        """
        A body not ending in CRLF gets one before the final dot; an empty
        one is just the dot.
        """
        for body, sent in [(b"", b".\r\n"), (b"x\r\n.", b"x\r\n..\r\n.\r\n")]:
            d, peer = self.start(ALICE, body=BytesBody(body))
            self.toMail(peer)
            peer.say(b"250 OK", b"250 OK")
            peer.heard()
            peer.say(b"354 go")
            peer.pump()
            self.assertEqual(peer.heard(), sent)
            peer.say(b"250 2.0.0 ok")
            self.assertEqual(self.codes(d), [(250, "2.0.0")])

    def test_noRecipients(self) -> None:
        """
        No recipients: no connection, an empty result.
        """
        d = self.agent.deliver(envelopeTo(), BytesBody(b""), None)
        outcomes = self.successResultOf(d)
        self.assertEqual(list(outcomes), [])
        self.assertEqual(self.endpoint.transports, [])


class FailureTests(Session):
    """
    Everything that can go wrong gives each recipient a reply.
    """

    def test_connectionRefused(self) -> None:
        """
        No connection: 451 4.4.1 for everyone.
        """
        self.endpoint.error = ConnectionRefusedError()
        d = self.agent.deliver(envelopeTo(ALICE, BOB), BytesBody(MESSAGE), None)
        self.assertEqual(self.codes(d), [(451, "4.4.1")] * 2)

    def test_connectTimeout(self) -> None:
        """
        A connection attempt that hangs is given up after C{connectTimeout}.
        """
        self.endpoint.hang = True
        d = self.agent.deliver(envelopeTo(ALICE), BytesBody(MESSAGE), None)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.codes(d), [(451, "4.4.1")])

    def test_greetingRefused(self) -> None:
        """
        A refusing greeting defers everyone (never bounces) and drops the
        connection.
        """
        d, peer = self.start(ALICE, BOB)
        peer.say(b"554 5.3.2 go away")
        self.assertEqual(self.codes(d), [(451, "4.4.0")] * 2)
        self.assertTrue(peer.transport.disconnected)

    def test_lhloRefused(self) -> None:
        """
        A refused LHLO defers everyone.
        """
        d, peer = self.start(ALICE)
        peer.say(b"220 hi")
        peer.say(b"500 5.5.1 what")
        self.assertEqual(self.codes(d), [(451, "4.4.0")])

    def test_lostAfterFinalDot(self) -> None:
        """
        A connection lost after some per-recipient replies keeps those and
        defers the rest with 451 4.4.2.
        """
        d, peer = self.start(ALICE, BOB)
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"250 OK", b"354 go")
        peer.pump()
        peer.say(b"250 2.0.0 saved")
        peer.lost()
        self.assertEqual(self.codes(d), [(250, "2.0.0"), (451, "4.4.2")])

    def test_lostWhileSendingBody(self) -> None:
        """
        A connection lost in the middle of the body defers every recipient.
        """
        d, peer = self.start(ALICE, body=BytesBody(b"x" * 1_000_000))
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"354 go")
        producer: Any = peer.transport.producer
        producer.resumeProducing()
        producer.stopProducing()
        peer.lost()
        self.assertEqual(self.codes(d), [(451, "4.4.2")])

    def test_garbage(self) -> None:
        """
        A line that is not a reply is a protocol violation: 451 4.5.0, and the
        connection is dropped.
        """
        d, peer = self.start(ALICE)
        peer.say(b"HELLO THERE")
        self.assertEqual(self.codes(d), [(451, "4.5.0")])
        self.assertTrue(peer.transport.disconnected)

    def test_unexpectedReplyWhileSending(self) -> None:
        """
        A reply arriving while the body is still being sent is a violation.
        """
        d, peer = self.start(ALICE, body=BytesBody(b"x" * 1_000_000))
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"354 go")
        peer.say(b"421 4.3.2 shutting down")
        self.assertEqual(self.codes(d), [(451, "4.5.0")])

    def test_wrongSuccessCodes(self) -> None:
        """
        A 2xx other than 354 after DATA, or a 3xx after the dot, is a
        violation.
        """
        d, peer = self.start(ALICE)
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"250 OK")
        self.assertEqual(self.codes(d), [(451, "4.5.0")])
        d, peer = self.start(ALICE)
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"354 go")
        peer.pump()
        peer.say(b"354 again")
        self.assertEqual(self.codes(d), [(451, "4.5.0")])

    def test_tooLongLine(self) -> None:
        """
        An endless reply line is a violation, not a memory hog.
        """
        d, peer = self.start(ALICE)
        peer.protocol.dataReceived(b"220 " + b"x" * 10_000)
        self.assertEqual(self.codes(d), [(451, "4.5.0")])

    def test_commandTimeout(self) -> None:
        """
        A server that stops answering is given up after the command timeout.
        """
        d, peer = self.start(ALICE)
        self.toMail(peer)
        self.clock.advance(299)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.codes(d), [(451, "4.4.2")])
        self.assertTrue(peer.transport.disconnected)

    def test_dataTimeout(self) -> None:
        """
        After the final dot the client waits the data timeout for each reply.
        """
        d, peer = self.start(ALICE, BOB)
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"250 OK", b"354 go")
        peer.pump()
        self.clock.advance(599)
        peer.say(b"250 2.0.0 one")
        self.clock.advance(599)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.codes(d), [(250, "2.0.0"), (451, "4.4.2")])

    def test_sendTimeoutResetByProgress(self) -> None:
        """
        While the body is sent, each chunk restarts the command timeout, and
        a stalled consumer ends the session at the timeout.
        """
        d, peer = self.start(ALICE, body=BytesBody(b"x" * 1_000_000))
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"354 go")
        producer: Any = peer.transport.producer
        for _ in range(3):
            self.clock.advance(200)
            producer.resumeProducing()
        self.assertNoResult(d)
        self.clock.advance(300)
        self.assertEqual(self.codes(d), [(451, "4.4.2")])

    def test_unreadableBody(self) -> None:
        """
        A body that cannot be opened at DATA time defers without a final dot.
        """
        d, peer = self.start(ALICE, body=UnreadableBody())
        self.toMail(peer)
        peer.say(b"250 OK", b"250 OK", b"354 go")
        self.assertEqual(self.codes(d), [(451, "4.3.0")])
        self.assertNotIn(b"\r\n.\r\n", peer.heard())
        self.assertTrue(peer.transport.disconnected)


class ReplyParsingTests(SynchronousTestCase):
    """
    Reply lines and enhanced status codes.
    """

    def test_lines(self) -> None:
        """
        Codes, continuation marks and texts are split; malformed lines raise.
        """
        self.assertEqual(parseReplyLine(b"250-PIPELINING"), (250, True, "PIPELINING"))
        self.assertEqual(parseReplyLine(b"250 OK"), (250, False, "OK"))
        self.assertEqual(parseReplyLine(b"250"), (250, False, ""))
        for bad in [b"", b"25", b"abc OK", b"250xOK", b"199 low", b"600 high"]:
            self.assertRaises(ProtocolViolation, parseReplyLine, bad)

    def test_enhanced(self) -> None:
        """
        The enhanced code is taken from the text when its class matches the
        reply, and otherwise made up as X.0.0; text is kept printable.
        """
        self.assertEqual(makeReply(550, "5.1.1 <b> unknown"), makeReply(550, "5.1.1   <b> unknown"))
        reply = makeReply(550, "5.1.1 <b> unknown")
        self.assertEqual((reply.enhanced, reply.text), ("5.1.1", "<b> unknown"))
        self.assertEqual(makeReply(451, "2.0.0 odd").enhanced, "4.0.0")
        self.assertEqual(makeReply(250, "").text, "(no text)")
        self.assertEqual(makeReply(250, "a\x00b").text, "a?b")
        self.assertEqual(len(makeReply(250, "x" * 1000).text), 200)


def drain(transport: Any) -> None:
    """
    Run a registered pull producer until it unregisters.
    """
    for _ in range(100_000):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("producer never finished")


def referenceStuffing(message: bytes) -> bytes:
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1] if message else []
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


class StreamTests(SynchronousTestCase):
    """
    Dot-stuffing and body streaming.
    """

    @given(
        st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n.", b".."]), max_size=30),
        st.lists(st.integers(min_value=0, max_value=60), max_size=8),
    )
    def test_stuffingIgnoresChunking(self, pieces: list[bytes], cuts: list[int]) -> None:
        """
        However a message is cut into chunks, the stuffed output equals
        stuffing it whole, line by line.
        """
        message = b"".join(pieces)
        if b"\n" in message.replace(b"\r\n", b"") or b"\r" in message.replace(b"\r\n", b""):
            # Stored bodies have only CRLF line ends; check against the
            # line-based reference only for those.
            message = message.replace(b"\r\n", b"\x00").replace(b"\r", b"").replace(b"\n", b"")
            message = message.replace(b"\x00", b"\r\n")
        stuffer = DotStuffer()
        positions = sorted({min(c, len(message)) for c in cuts} | {0, len(message)})
        out = b"".join(stuffer(message[a:b]) for a, b in itertools.pairwise(positions))
        self.assertEqual(out + stuffer.end(), referenceStuffing(message))


class LMTPContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    The LMTP agent, against a peer that accepts everything, satisfies the
    delivery agent contract.
    """

    def makeAgent(self) -> IDeliveryAgent:
        self.endpoint = FakeEndpoint()
        self.stored: dict[str, bytes] = {}
        return LMTPDeliveryAgent("lmtp", self.endpoint, Clock(), "mx.example")

    def resultOf(
        self, agent: IDeliveryAgent, deferred: Deferred[Sequence[RecipientOutcome]]
    ) -> Sequence[RecipientOutcome]:
        for transport, protocol in zip(self.endpoint.transports, self.endpoint.protocols, strict=False):
            self._serve(transport, protocol)
        self.endpoint.transports.clear()
        self.endpoint.protocols.clear()
        return self.successResultOf(deferred)

    def _serve(self, transport: StringTransport, protocol: Any) -> None:
        """
        Answer a whole session: accept every recipient, store the message.
        """
        recipients: list[str] = []
        protocol.dataReceived(b"220 fake ready\r\n")
        buffer = b""
        for _ in range(1000):
            drain(transport)
            buffer += transport.value()
            transport.clear()
            if b"\r\n" not in buffer:
                return
            line, buffer = buffer.split(b"\r\n", 1)
            if line.startswith(b"LHLO"):
                protocol.dataReceived(b"250 fake\r\n")
            elif line.startswith(b"MAIL"):
                protocol.dataReceived(b"250 2.1.0 ok\r\n")
            elif line.startswith(b"RCPT"):
                recipients.append(line[9:-1].decode())
                protocol.dataReceived(b"250 2.1.5 ok\r\n")
            elif line == b"DATA":
                protocol.dataReceived(b"354 go\r\n")
                drain(transport)
                buffer += transport.value()
                transport.clear()
                data, buffer = buffer.split(b"\r\n.\r\n", 1) if b"\r\n.\r\n" in buffer else (b"", buffer[3:])
                message = (
                    b"".join(
                        line[1:] + b"\r\n" if line.startswith(b".") else line + b"\r\n"
                        for line in data.split(b"\r\n")
                    )
                    if data
                    else b""
                )
                for recipient in recipients:
                    self.stored[recipient] = message
                    protocol.dataReceived(b"250 2.0.0 saved\r\n")
            elif line == b"QUIT":
                return
        raise AssertionError("session did not end")

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        return self.stored.get(str(recipient))


class FromConfigTests(SynchronousTestCase):
    """
    Building the agent from C{[delivery.NAME]}.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.context = ComponentContext(reactor=self.reactor, hostname="mx.example", dataDir=Path("."))

    def test_unixEndpoint(self) -> None:
        """
        A C{unix:} endpoint connects to that socket; LHLO defaults to the
        server's hostname.
        """
        agent: Any = findPlugin(IDeliveryAgentFactory, "lmtp").fromConfig(
            self.context, "dovecot", {"plugin": "lmtp", "endpoint": "unix:/run/dovecot/lmtp"}
        )
        self.assertIsInstance(agent, LMTPDeliveryAgent)
        self.assertEqual((agent.name, agent.lhlo), ("dovecot", "mx.example"))
        agent.deliver(envelopeTo(ALICE), BytesBody(MESSAGE), None)
        [(address, _factory, _timeout, _checkPID)] = self.reactor.unixClients
        self.assertEqual(address, "/run/dovecot/lmtp")

    def test_tcpEndpointAndTimeouts(self) -> None:
        """
        A C{tcp:} endpoint and every timeout option are used.
        """
        agent = fromConfig(
            self.context,
            "cyrus",
            {
                "endpoint": "tcp:host=127.0.0.1:port=2424",
                "lhlo": "relay.example",
                "connect_timeout": 5,
                "command_timeout": 60,
                "data_timeout": 120.5,
            },
        )
        self.assertEqual(
            (agent.lhlo, agent.connectTimeout, agent.commandTimeout, agent.dataTimeout),
            ("relay.example", 5.0, 60.0, 120.5),
        )
        agent.deliver(envelopeTo(ALICE), BytesBody(MESSAGE), None)
        [(host, port, *_)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 2424))

    def test_errors(self) -> None:
        """
        Missing or unparsable endpoints, bad values and unknown keys are
        refused at start-up.
        """
        optionSets: list[dict[str, object]] = [
            {},
            {"endpoint": "nonsense:x"},
            {"endpoint": "tcp:host=h"},
            {"endpoint": "unix:/x", "lhlo": "two words"},
            {"endpoint": "unix:/x", "data_timeout": 0},
            {"endpoint": "unix:/x", "port": 24},
        ]
        for options in optionSets:
            with self.assertRaises(ConfigError, msg=repr(options)) as raised:
                fromConfig(self.context, "lmtp", options)
            self.assertIn("[delivery.lmtp]", str(raised.exception))
