"""
Tests for L{mailfw.smtp._client}: the outbound ESMTP client, driven over a
L{StringTransport} with a L{Clock}.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.delivery._contract import SAMPLE, TrackingBody, UnreadableBody
from mailfw.envelope import Envelope, Recipient
from mailfw.reply import SMTPReply
from mailfw.smtp._client import (
    Capabilities,
    ClientOptions,
    HostFailure,
    Response,
    SMTPClient,
    Timeouts,
    TLSFailure,
    xtext,
)
from mailfw.testing import FullTransport


class TLSStringTransport(FullTransport):
    """
    A L{StringTransport} that records C{startTLS} and C{setTcpNoDelay}, and
    has flow control when C{full} is set.
    """

    full = False
    tlsContext: Any = None
    noDelay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def startTLS(self, contextFactory: Any) -> None:
        self.tlsContext = contextFactory


def contextFor(host: str, level: str) -> tuple[str, str]:
    return ("context", host, level)  # type: ignore[return-value]


def connect(**kw: Any) -> tuple[SMTPClient, TLSStringTransport, Clock]:
    clock = Clock()
    useTLS = kw.pop("useTLS", True)
    options = ClientOptions(helo="relay.example.org", tlsContext=contextFor, **kw)
    proto = SMTPClient(options, clock, "mx.example.net", "192.0.2.1", useTLS=useTLS)
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def serve(proto: SMTPClient, *lines: str) -> None:
    proto.dataReceived(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))


def sent(transport: StringTransport) -> list[bytes]:
    value: bytes = transport.value()
    transport.clear()
    return value.split(b"\r\n")[:-1]


def drain(transport: StringTransport) -> None:
    """
    Let a registered pull producer write everything.
    """
    for _ in range(10_000):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("producer never finished")


EHLO_BASIC = ("250-mx.example.net hello", "250-SIZE 1000000", "250 8BITMIME")
EHLO_FULL = (
    "250-mx.example.net hello",
    "250-PIPELINING",
    "250-SIZE 1000000",
    "250-8BITMIME",
    "250-SMTPUTF8",
    "250-DSN",
    "250-ENHANCEDSTATUSCODES",
    "250 STARTTLS",
)


def ready(caps: Sequence[str] = EHLO_BASIC, **kw: Any) -> tuple[SMTPClient, TLSStringTransport, Clock]:
    """
    A client past its handshake with a server announcing C{caps}.
    """
    proto, transport, clock = connect(tls="none", **kw)
    d = proto.handshake()
    serve(proto, "220 mx.example.net ESMTP")
    serve(proto, *caps)
    SynchronousTestCase().successResultOf(d)
    transport.clear()
    return proto, transport, clock


def envelope(*recipients: str, sender: str | None = "sender@example.org", **kw: Any) -> Envelope:
    return Envelope(
        sender=None if sender is None else Address.parse(sender, utf8=True),
        recipients=tuple(Recipient(Address.parse(r, utf8=True)) for r in recipients),
        **kw,
    )


def codes(replies: list[SMTPReply]) -> list[tuple[int, str]]:
    return [(r.code, r.enhanced) for r in replies]


class ResponseTests(SynchronousTestCase):
    def test_enhancedCode(self) -> None:
        """
        The enhanced status code is taken from the text when its class
        matches the reply code, else a generic one is made up.
        """
        self.assertEqual(
            Response(550, ("5.1.1 No such user",)).reply(),
            SMTPReply(550, "5.1.1", "No such user"),
        )
        self.assertEqual(Response(550, ("No such user",)).reply(), SMTPReply(550, "5.0.0", "No such user"))
        self.assertEqual(
            Response(450, ("5.1.1 confused",)).reply(), SMTPReply(450, "4.0.0", "5.1.1 confused")
        )
        self.assertEqual(
            Response(250, ("2.0.0 Ok: queued", "as ABC")).reply(),
            SMTPReply(250, "2.0.0", "Ok: queued as ABC"),
        )

    def test_capabilities(self) -> None:
        """
        EHLO keywords are parsed with their parameters, old C{AUTH=} too.
        """
        caps = Capabilities.fromEHLO(
            Response(250, ("hi", "size 2048", "AUTH plain LOGIN", "AUTH=CRAM-MD5", "PIPELINING"))
        )
        self.assertEqual(caps.sizeLimit, 2048)
        self.assertTrue(caps.has("PIPELINING"))
        self.assertEqual(caps.authMechanisms, ("CRAM-MD5",))
        self.assertIsNone(Capabilities.fromEHLO(Response(250, ("hi", "SIZE 0"))).sizeLimit)
        self.assertIsNone(Capabilities.fromEHLO(Response(250, ("hi", "SIZE"))).sizeLimit)

    def test_xtext(self) -> None:
        """
        xtext encodes C{+}, C{=}, controls, spaces and non-ASCII as C{+HH}.
        """
        self.assertEqual(xtext("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(xtext("ü"), "+C3+BC")


class PeerTextTests(SynchronousTestCase):
    def test_bareLineBreaksAndControls(self) -> None:
        """
        A reply whose text holds a bare CR or LF or other control characters
        becomes a valid reply (they are replaced), so a transaction the peer
        accepted is not turned into a local error and sent again.
        """
        reply = Response(250, ("2.0.0 queued as X\rY\nZ\x00",)).reply()
        self.assertEqual(reply, SMTPReply(250, "2.0.0", "queued as X?Y?Z?"))


class HandshakeTests(SynchronousTestCase):
    def test_ehlo(self) -> None:
        """
        After a 220 greeting the client says EHLO with its name and learns
        the capabilities.
        """
        proto, transport, _ = connect(tls="none")
        d = proto.handshake()
        self.assertEqual(transport.value(), b"")
        serve(proto, "220 mx.example.net ESMTP")
        self.assertEqual(sent(transport), [b"EHLO relay.example.org"])
        serve(proto, *EHLO_BASIC)
        caps = self.successResultOf(d)
        self.assertTrue(caps.esmtp)
        self.assertEqual(caps.sizeLimit, 1000000)
        self.assertFalse(proto.tls)

    def test_heloFallback(self) -> None:
        """
        When EHLO is refused the client falls back to HELO.
        """
        proto, transport, _ = connect(tls="none")
        d = proto.handshake()
        serve(proto, "220 old.example")
        serve(proto, "502 Command not implemented")
        self.assertEqual(sent(transport), [b"EHLO relay.example.org", b"HELO relay.example.org"])
        serve(proto, "250 old.example")
        self.assertFalse(self.successResultOf(d).esmtp)

    def test_heloRefused(self) -> None:
        """
        If HELO is refused too, the host fails.
        """
        proto, _transport, _ = connect(tls="none")
        d = proto.handshake()
        serve(proto, "220 old.example", "502 no", "550 go away")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.reply.code, 550)

    def test_greetingRefused(self) -> None:
        """
        A 4xx or 5xx greeting fails the host with that reply, without EHLO.
        """
        for line, code in (("421 4.3.2 busy", 421), ("554 no service", 554)):
            proto, transport, _ = connect(tls="none")
            d = proto.handshake()
            serve(proto, line)
            failure = self.failureResultOf(d, HostFailure)
            self.assertEqual((failure.value.reply.code, failure.value.stage), (code, "greeting"))
            self.assertEqual(transport.value(), b"")

    def test_greetingTimeout(self) -> None:
        """
        Without a greeting within the command timeout, the client hangs up
        and the host fails with a transient reply.
        """
        proto, transport, clock = connect(tls="none", timeouts=Timeouts(command=300))
        d = proto.handshake()
        clock.advance(299)
        self.assertNoResult(d)
        clock.advance(1)
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.reply.enhanced, "4.4.2")
        self.assertTrue(transport.disconnecting)

    def test_lostDuringEHLO(self) -> None:
        """
        A connection lost while waiting is a transient host failure.
        """
        proto, _transport, _ = connect(tls="none")
        d = proto.handshake()
        serve(proto, "220 hi")
        proto.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, HostFailure)
        self.assertTrue(failure.value.reply.isTransient)

    def test_malformedReply(self) -> None:
        """
        A reply that is not SMTP is a transient protocol error and the
        client hangs up.
        """
        proto, transport, _ = connect(tls="none")
        d = proto.handshake()
        serve(proto, "HTTP/1.1 400 Bad Request")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.reply.enhanced, "4.5.0")
        self.assertTrue(transport.disconnecting)

    def test_mixedCodesInReply(self) -> None:
        """
        A multi-line reply whose lines disagree on the code is refused.
        """
        proto, _transport, _ = connect(tls="none")
        d = proto.handshake()
        serve(proto, "220-hi", "250 there")
        self.failureResultOf(d, HostFailure)


class TLSTests(SynchronousTestCase):
    def test_opportunistic(self) -> None:
        """
        With level C{may}, an offered STARTTLS is used: the context is made
        for the host name, EHLO is repeated and its capabilities replace the
        plaintext ones.
        """
        proto, transport, _ = connect(tls="may")
        d = proto.handshake()
        serve(proto, "220 hi")
        serve(proto, "250-hi", "250-STARTTLS", "250 SIZE 10")
        self.assertEqual(sent(transport), [b"EHLO relay.example.org", b"STARTTLS"])
        serve(proto, "220 2.0.0 go ahead")
        self.assertEqual(transport.tlsContext, ("context", "mx.example.net", "may"))
        self.assertEqual(sent(transport), [b"EHLO relay.example.org"])
        serve(proto, "250-hi", "250 SIZE 20")
        caps = self.successResultOf(d)
        self.assertEqual(caps.sizeLimit, 20)
        self.assertTrue(proto.tls)

    def test_noneLevel(self) -> None:
        """
        With level C{none}, STARTTLS is never sent.
        """
        proto, transport, _ = connect(tls="none")
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS")
        self.successResultOf(d)
        self.assertEqual(sent(transport), [b"EHLO relay.example.org"])

    def test_plaintextRetry(self) -> None:
        """
        A client made with C{useTLS=False} (the retry after a failed
        handshake) does not try STARTTLS.
        """
        proto, _transport, _ = connect(tls="may", useTLS=False)
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS")
        self.successResultOf(d)
        self.assertFalse(proto.tls)

    def test_refusedMay(self) -> None:
        """
        A refused STARTTLS at level C{may} continues in plaintext.
        """
        proto, _transport, _ = connect(tls="may")
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS", "454 4.7.0 TLS not available")
        self.successResultOf(d)
        self.assertFalse(proto.tls)

    def test_refusedRequired(self) -> None:
        """
        A refused STARTTLS at level C{encrypt} fails the host transiently.
        """
        proto, _transport, _ = connect(tls="encrypt")
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS", "454 4.7.0 TLS not available")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.reply.code, 454)

    def test_notOfferedRequired(self) -> None:
        """
        Without STARTTLS on offer, levels C{encrypt} and C{verify} fail the
        host with 4.7.10 and no mail is sent.
        """
        for level in ("encrypt", "verify"):
            proto, _transport, _ = connect(tls=level)
            d = proto.handshake()
            serve(proto, "220 hi", "250-hi", "250 SIZE 10")
            failure = self.failureResultOf(d, HostFailure)
            self.assertEqual(failure.value.reply.enhanced, "4.7.10")
            self.assertTrue(failure.value.reply.isTransient)

    def test_handshakeFailure(self) -> None:
        """
        A connection lost during the TLS handshake (a certificate that does
        not verify) is a L{TLSFailure} naming the cause.
        """
        proto, _transport, _ = connect(tls="verify")
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS", "220 go ahead")
        proto.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
        failure = self.failureResultOf(d, TLSFailure)
        self.assertEqual(failure.value.reply.enhanced, "4.7.5")
        self.assertIn("certificate verify failed", failure.value.reply.text)


class AuthTests(SynchronousTestCase):
    def tlsHandshake(
        self, mechanisms: str = "PLAIN LOGIN"
    ) -> tuple[SMTPClient, TLSStringTransport, Deferred[Capabilities]]:
        proto, transport, _ = connect(tls="encrypt", credentials=("user", "sécret"))
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS", "220 go")
        transport.clear()
        serve(proto, "250-hi", f"250 AUTH {mechanisms}")
        return proto, transport, d

    def test_plain(self) -> None:
        """
        AUTH PLAIN sends the credentials after TLS, in one line.
        """
        proto, transport, d = self.tlsHandshake()
        token = base64.b64encode("\0user\0sécret".encode())
        self.assertEqual(sent(transport), [b"AUTH PLAIN " + token])
        serve(proto, "235 2.7.0 ok")
        self.successResultOf(d)

    def test_login(self) -> None:
        """
        AUTH LOGIN is used when PLAIN is not offered.
        """
        proto, transport, d = self.tlsHandshake("LOGIN")
        self.assertEqual(sent(transport), [b"AUTH LOGIN"])
        serve(proto, "334 VXNlcm5hbWU6")
        self.assertEqual(sent(transport), [base64.b64encode(b"user")])
        serve(proto, "334 UGFzc3dvcmQ6")
        self.assertEqual(sent(transport), [base64.b64encode("sécret".encode())])
        serve(proto, "235 ok")
        self.successResultOf(d)

    def test_refused(self) -> None:
        """
        Refused credentials defer (4.7.8): an operator must fix them.
        """
        proto, _transport, d = self.tlsHandshake()
        serve(proto, "535 5.7.8 bad credentials")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual((failure.value.reply.code, failure.value.reply.enhanced), (451, "4.7.8"))

    def test_noMechanism(self) -> None:
        """
        Without a usable mechanism the host fails transiently.
        """
        _proto, _transport, d = self.tlsHandshake("CRAM-MD5")
        self.assertTrue(self.failureResultOf(d, HostFailure).value.reply.isTransient)

    def test_neverWithoutTLS(self) -> None:
        """
        Credentials are never sent in plaintext, even at level C{may}.
        """
        proto, transport, _ = connect(tls="may", credentials=("user", "secret"))
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 AUTH PLAIN")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.reply.enhanced, "4.7.10")
        self.assertNotIn(b"AUTH", transport.value())


class TransactionTests(SynchronousTestCase):
    def test_pipelined(self) -> None:
        """
        With PIPELINING, MAIL, every RCPT and DATA go out in one write; each
        recipient gets its own RCPT reply or the final one; the body is
        dot-stuffed and ends with CRLF.CRLF.
        """
        proto, transport, _ = ready(EHLO_FULL)
        env = envelope("a@example.net", "b@example.net", "c@example.net")
        d = proto.transaction(env, TrackingBody())
        self.assertEqual(
            sent(transport),
            [
                b"MAIL FROM:<sender@example.org> SIZE=%d" % len(SAMPLE),
                b"RCPT TO:<a@example.net>",
                b"RCPT TO:<b@example.net>",
                b"RCPT TO:<c@example.net>",
                b"DATA",
            ],
        )
        serve(proto, "250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "250 ok", "354 go")
        drain(transport)
        data = transport.value()
        self.assertEqual(data, SAMPLE.replace(b"\r\n.a line", b"\r\n..a line") + b".\r\n")
        self.assertNoResult(d)
        serve(proto, "250 2.0.0 queued as X")
        self.assertEqual(
            codes(self.successResultOf(d)),
            [(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")],
        )

    def test_sequential(self) -> None:
        """
        Without PIPELINING each command waits for the previous reply.
        """
        proto, transport, _ = ready()
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        self.assertEqual(sent(transport), [b"MAIL FROM:<sender@example.org> SIZE=%d" % len(SAMPLE)])
        serve(proto, "250 ok")
        self.assertEqual(sent(transport), [b"RCPT TO:<a@example.net>"])
        serve(proto, "450 4.2.0 greylisted")
        self.assertEqual(sent(transport), [b"RCPT TO:<b@example.net>"])
        serve(proto, "250 ok")
        self.assertEqual(sent(transport), [b"DATA"])
        serve(proto, "354 go")
        drain(transport)
        transport.clear()
        serve(proto, "250 ok")
        self.assertEqual(codes(self.successResultOf(d)), [(450, "4.2.0"), (250, "2.0.0")])

    def test_nullSender(self) -> None:
        """
        A bounce goes out with C{MAIL FROM:<>}.
        """
        proto, transport, _ = ready(("250-hi", "250 8BITMIME"))
        proto.transaction(envelope("a@example.net", sender=None), TrackingBody())
        self.assertEqual(sent(transport), [b"MAIL FROM:<>"])

    def test_allRecipientsRefusedSequential(self) -> None:
        """
        When every RCPT is refused, no DATA is sent (RSET instead) and each
        recipient gets its refusal.
        """
        proto, transport, _ = ready()
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        serve(proto, "250 ok", "550 5.1.1 unknown")
        self.assertEqual(codes(self.successResultOf(d)), [(550, "5.1.1")])
        self.assertEqual(sent(transport)[-1], b"RSET")

    def test_allRecipientsRefusedPipelined(self) -> None:
        """
        Pipelined: if every RCPT failed and DATA got 354 anyway, a lone dot
        ends the empty message (RFC 2920); the refusals stand.
        """
        proto, transport, _ = ready(EHLO_FULL)
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        transport.clear()
        serve(proto, "250 ok", "550 5.1.1 unknown", "354 go")
        self.assertEqual(sent(transport), [b"."])
        serve(proto, "554 5.5.1 no valid recipients")
        self.assertEqual(codes(self.successResultOf(d)), [(550, "5.1.1")])

    def test_allRecipientsRefusedPipelinedDataRefused(self) -> None:
        """
        Pipelined: a refused DATA after refused RCPTs keeps the RCPT replies.
        """
        proto, _transport, _ = ready(EHLO_FULL)
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        serve(proto, "250 ok", "550 5.1.1 unknown", "451 4.3.0 later", "554 5.5.1 no valid recipients")
        self.assertEqual(codes(self.successResultOf(d)), [(550, "5.1.1"), (451, "4.3.0")])

    def test_mailRefusedTransient(self) -> None:
        """
        A 4xx to MAIL is a host failure that another host may not share.
        """
        proto, _transport, _ = ready()
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        serve(proto, "451 4.3.0 try later")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual((failure.value.reply.code, failure.value.permanent), (451, False))

    def test_mailRefusedPermanentPipelined(self) -> None:
        """
        A 5xx to MAIL is permanent; pipelined replies are consumed.
        """
        proto, _transport, _ = ready(EHLO_FULL)
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        serve(proto, "553 5.1.8 bad sender", "503 5.5.1 need MAIL", "503 5.5.1 need RCPT")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual((failure.value.reply.code, failure.value.permanent), (553, True))

    def test_dataRefused(self) -> None:
        """
        A refused DATA applies to every accepted recipient.
        """
        proto, _transport, _ = ready()
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        serve(proto, "250 ok", "250 ok", "550 5.1.1 no", "451 4.3.1 disk full")
        self.assertEqual(codes(self.successResultOf(d)), [(451, "4.3.1"), (550, "5.1.1")])

    def test_finalReplies(self) -> None:
        """
        The reply to the final dot decides for every accepted recipient:
        4xx deferred, 5xx failed.
        """
        for line, expected in (("452 4.3.1 full", (452, "4.3.1")), ("554 5.7.1 spam", (554, "5.7.1"))):
            proto, transport, _ = ready()
            d = proto.transaction(envelope("a@example.net"), TrackingBody())
            serve(proto, "250 ok", "250 ok", "354 go")
            drain(transport)
            serve(proto, line)
            self.assertEqual(codes(self.successResultOf(d)), [expected])

    def test_finalTimeout(self) -> None:
        """
        No reply to the final dot within its timeout defers the accepted
        recipients (the message may or may not have been taken) and keeps
        refusals.
        """
        proto, transport, clock = ready(timeouts=Timeouts(dataDone=600))
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        serve(proto, "250 ok", "250 ok", "550 5.1.1 no", "354 go")
        drain(transport)
        clock.advance(599)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual(codes(self.successResultOf(d)), [(421, "4.4.2"), (550, "5.1.1")])
        self.assertTrue(transport.disconnecting)

    def test_lostAfterData(self) -> None:
        """
        A connection lost after the body defers the accepted recipients.
        """
        proto, transport, _ = ready()
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        serve(proto, "250 ok", "250 ok", "354 go")
        drain(transport)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(codes(self.successResultOf(d)), [(421, "4.4.2")])

    def test_lostBeforeRecipients(self) -> None:
        """
        A connection lost before any recipient was decided is a host failure.
        """
        proto, _transport, _ = ready()
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(self.failureResultOf(d, HostFailure).value.permanent)

    def test_lostAfterSomeRecipients(self) -> None:
        """
        A connection lost after some RCPT replies keeps them and defers the
        rest.
        """
        proto, _transport, _ = ready()
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        serve(proto, "250 ok", "550 5.1.1 no")
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(codes(self.successResultOf(d)), [(550, "5.1.1"), (421, "4.4.2")])

    def test_timeoutPerReply(self) -> None:
        """
        Pipelined replies each get the full command timeout, counted from
        the previous reply, not from when the commands were sent.
        """
        proto, transport, clock = ready(EHLO_FULL, timeouts=Timeouts(command=300))
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        clock.advance(290)
        serve(proto, "250 ok")
        clock.advance(290)
        serve(proto, "250 ok")
        clock.advance(290)
        serve(proto, "250 ok")
        self.assertFalse(transport.disconnecting)
        self.assertNoResult(d)

    def test_transferStall(self) -> None:
        """
        A body transfer that makes no progress for the transfer timeout
        aborts the connection and defers the recipients.
        """
        proto, transport, clock = ready(timeouts=Timeouts(transfer=180))
        transport.full = True
        d = proto.transaction(envelope("a@example.net"), TrackingBody(SAMPLE * 5000))
        serve(proto, "250 ok", "250 ok", "354 go")
        assert transport.producer is not None
        transport.producer.resumeProducing()
        clock.advance(179)
        self.assertFalse(transport.disconnecting)
        transport.producer.resumeProducing()
        clock.advance(179)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        # The transport tells its producer, then the protocol.
        transport.producer.stopProducing()
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(codes(self.successResultOf(d)), [(421, "4.4.2")])

    def test_unreadableBody(self) -> None:
        """
        A body that cannot be read defers the recipients (never 5xx).
        """
        proto, transport, _ = ready()
        d = proto.transaction(envelope("a@example.net"), UnreadableBody())
        serve(proto, "250 ok", "250 ok", "354 go")
        [reply] = self.successResultOf(d)
        self.assertTrue(reply.isTransient)
        self.assertTrue(transport.disconnecting)

    def test_readerClosed(self) -> None:
        """
        The body reader is closed after the transfer.
        """
        proto, transport, _ = ready()
        body = TrackingBody()
        proto.transaction(envelope("a@example.net"), body)
        serve(proto, "250 ok", "250 ok", "354 go")
        drain(transport)
        self.assertEqual([r.closed for r in body.readers], [True])

    def test_endOfDataWithLastChunk(self) -> None:
        """
        The final dot goes out in the same write as the end of the body, so
        it never waits alone for the peer's delayed ACK; earlier chunks go
        out as they are read.
        """
        proto, transport, _ = ready()
        message = SAMPLE * 2000
        d = proto.transaction(envelope("a@example.net"), TrackingBody(message))
        serve(proto, "250 ok", "250 ok")
        self.assertEqual(sent(transport)[-1:], [b"DATA"])
        bodyWrites: list[bytes] = []
        transport.write = bodyWrites.append  # type: ignore[method-assign, assignment]
        serve(proto, "354 go")
        self.assertGreater(len(bodyWrites), 1)
        self.assertTrue(bodyWrites[-1].endswith(b"last line\r\n.\r\n"), bodyWrites[-1][-40:])
        self.assertGreater(len(bodyWrites[-1]), len(b".\r\n"))
        stuffed = message.replace(b"\r\n.", b"\r\n..")
        self.assertEqual(b"".join(bodyWrites), stuffed + b".\r\n")
        serve(proto, "250 ok")
        self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0")])

    def test_noDelay(self) -> None:
        """
        The connection turns off Nagle's algorithm as soon as it is made.
        """
        _, transport, _ = connect()
        self.assertIs(transport.noDelay, True)

    def test_pausedGetsNoWrites(self) -> None:
        """
        While the transport has paused the body's producer, nothing more of
        the body is written; resuming lets it go on to the end.
        """
        proto, transport, _ = ready()
        transport.full = True
        message = SAMPLE * 5000
        d = proto.transaction(envelope("a@example.net"), TrackingBody(message))
        serve(proto, "250 ok", "250 ok", "354 go")
        before = len(transport.value())
        producer = transport.producer
        assert producer is not None
        self.assertLess(before, len(message))
        producer.resumeProducing()
        # One more chunk (64 KiB, a little more once dot-stuffed), no more.
        self.assertTrue(before < len(transport.value()) <= before + 66 * 1024)
        transport.drain()
        serve(proto, "250 ok")
        self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0")])
        self.assertTrue(transport.value().endswith(b"last line\r\n.\r\n"))

    def test_twoTransactions(self) -> None:
        """
        A second message can follow on the same connection.
        """
        proto, transport, _ = ready()
        for _ in range(2):
            d = proto.transaction(envelope("a@example.net"), TrackingBody())
            serve(proto, "250 ok", "250 ok", "354 go")
            drain(transport)
            serve(proto, "250 ok")
            self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0")])
            transport.clear()

    def test_quit(self) -> None:
        """
        C{quit} sends QUIT and closes once answered.
        """
        proto, transport, _ = ready()
        d = proto.quit()
        self.assertEqual(sent(transport), [b"QUIT"])
        serve(proto, "221 bye")
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)

    def test_quitTimeout(self) -> None:
        """
        C{quit} does not wait forever for a reply.
        """
        proto, transport, clock = ready(timeouts=Timeouts(quit=30))
        d = proto.quit()
        clock.advance(30)
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)


class ExtensionTests(SynchronousTestCase):
    def test_sizeTooBig(self) -> None:
        """
        A message larger than the announced SIZE is refused permanently
        (552 5.3.4) before MAIL is sent.
        """
        proto, transport, _ = ready(("250-hi", "250 SIZE 10"))
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual((failure.value.reply.code, failure.value.reply.enhanced), (552, "5.3.4"))
        self.assertTrue(failure.value.permanent)
        self.assertEqual(transport.value(), b"")

    def test_noSizeParameterWithoutExtension(self) -> None:
        """
        SIZE= is only sent to servers announcing SIZE.
        """
        proto, transport, _ = ready(("250-hi", "250 PIPELINING"))
        proto.transaction(envelope("a@example.net"), TrackingBody())
        self.assertEqual(sent(transport)[0], b"MAIL FROM:<sender@example.org>")

    def test_8bitmime(self) -> None:
        """
        BODY=8BITMIME is passed on when offered, dropped otherwise.
        """
        proto, transport, _ = ready(("250-hi", "250 8BITMIME"))
        proto.transaction(envelope("a@example.net", body="8BITMIME"), TrackingBody())
        self.assertEqual(sent(transport)[0], b"MAIL FROM:<sender@example.org> BODY=8BITMIME")
        proto, transport, _ = ready(("250-hi", "250 HELP"))
        proto.transaction(envelope("a@example.net", body="8BITMIME"), TrackingBody())
        self.assertEqual(sent(transport)[0], b"MAIL FROM:<sender@example.org>")

    def test_binaryMime(self) -> None:
        """
        BINARYMIME cannot be relayed (no CHUNKING): permanent 5.6.3.
        """
        proto, _transport, _ = ready(EHLO_FULL)
        d = proto.transaction(envelope("a@example.net", body="BINARYMIME"), TrackingBody())
        self.assertEqual(self.failureResultOf(d, HostFailure).value.reply.enhanced, "5.6.3")

    def test_smtputf8Offered(self) -> None:
        """
        Non-ASCII addresses go out with the SMTPUTF8 parameter, UTF-8 encoded.
        """
        proto, transport, _ = ready(("250-hi", "250 SMTPUTF8"))
        proto.transaction(envelope("jürgen@example.net"), TrackingBody())
        lines = sent(transport)
        self.assertEqual(lines[0], b"MAIL FROM:<sender@example.org> SMTPUTF8")
        serve(proto, "250 ok")
        self.assertEqual(sent(transport), ["RCPT TO:<jürgen@example.net>".encode()])

    def test_smtputf8Missing(self) -> None:
        """
        Without SMTPUTF8, a non-ASCII recipient fails with 553 5.6.7 and the
        ASCII ones are still delivered.
        """
        proto, transport, _ = ready()
        d = proto.transaction(envelope("jürgen@example.net", "ann@example.net"), TrackingBody())
        self.assertEqual(sent(transport)[0], b"MAIL FROM:<sender@example.org> SIZE=%d" % len(SAMPLE))
        serve(proto, "250 ok")
        self.assertEqual(sent(transport), [b"RCPT TO:<ann@example.net>"])
        serve(proto, "250 ok", "354 go")
        drain(transport)
        serve(proto, "250 ok")
        self.assertEqual(codes(self.successResultOf(d)), [(553, "5.6.7"), (250, "2.0.0")])

    def test_smtputf8MissingAllRecipients(self) -> None:
        """
        If no recipient can be sent, nothing is sent at all.
        """
        proto, transport, _ = ready()
        d = proto.transaction(envelope("jürgen@example.net"), TrackingBody())
        self.assertEqual(codes(self.successResultOf(d)), [(553, "5.6.7")])
        self.assertEqual(transport.value(), b"")

    def test_smtputf8MissingSender(self) -> None:
        """
        A non-ASCII sender to a server without SMTPUTF8 fails permanently.
        """
        proto, _transport, _ = ready()
        d = proto.transaction(envelope("a@example.net", sender="jürgen@example.org"), TrackingBody())
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual((failure.value.reply.enhanced, failure.value.permanent), ("5.6.7", True))

    def test_dsnParameters(self) -> None:
        """
        RET, ENVID, NOTIFY and ORCPT are passed on when DSN is offered.
        """
        proto, transport, _ = ready(("250-hi", "250-DSN", "250 PIPELINING"))
        env = Envelope(
            sender=Address("s", "example.org"),
            recipients=(
                Recipient(
                    Address("a", "example.net"), frozenset({"DELAY", "FAILURE"}), "rfc822;a+b@example.net"
                ),
                Recipient(Address("b", "example.net"), frozenset({"NEVER"})),
                Recipient(Address("c", "example.net")),
            ),
            ret="HDRS",
            envid="id=1",
        )
        proto.transaction(env, TrackingBody())
        self.assertEqual(
            sent(transport),
            [
                b"MAIL FROM:<s@example.org> RET=HDRS ENVID=id+3D1",
                b"RCPT TO:<a@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;a+2Bb@example.net",
                b"RCPT TO:<b@example.net> NOTIFY=NEVER",
                b"RCPT TO:<c@example.net>",
                b"DATA",
            ],
        )

    def test_noDsnParametersWithoutExtension(self) -> None:
        """
        DSN parameters are dropped for servers without DSN.
        """
        proto, transport, _ = ready(("250-hi", "250 PIPELINING"))
        env = Envelope(
            sender=Address("s", "example.org"),
            recipients=(
                Recipient(Address("a", "example.net"), frozenset({"NEVER"}), "rfc822;a@example.net"),
            ),
            ret="FULL",
            envid="x",
        )
        proto.transaction(env, TrackingBody())
        self.assertEqual(sent(transport)[:2], [b"MAIL FROM:<s@example.org>", b"RCPT TO:<a@example.net>"])

    def test_unsolicited421(self) -> None:
        """
        A 421 nobody asked for closes the connection.
        """
        proto, transport, _ = ready()
        serve(proto, "421 4.3.2 shutting down")
        self.assertTrue(transport.disconnecting)


class STARTTLSLossTests(SynchronousTestCase):
    def test_lostAfterSTARTTLS(self) -> None:
        """
        A connection lost while waiting for the STARTTLS reply counts as a
        TLS failure (so level C{may} retries in plaintext).
        """
        proto, _transport, _ = connect(tls="may")
        d = proto.handshake()
        serve(proto, "220 hi", "250-hi", "250 STARTTLS")
        proto.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, TLSFailure)


EHLO_LIMITS = ("250-mx.example.net hello", "250-PIPELINING", "250 LIMITS RCPTMAX=2 MAILMAX=3")


def answerAll(proto: SMTPClient, transport: TLSStringTransport) -> list[list[bytes]]:
    """
    Play a server that accepts everything, until the client stops sending;
    return the commands of each transaction, one list per C{MAIL}.
    """
    transactions: list[list[bytes]] = []
    for _ in range(100):
        lines = sent(transport)
        if not lines:
            return transactions
        if lines[0].startswith(b"MAIL"):
            transactions.append(lines)
        serve(proto, *(["250 2.1.5 ok"] * (len(lines) - 1) + ["354 go"]))
        drain(transport)
        transport.clear()
        serve(proto, "250 2.0.0 queued")
    raise AssertionError("the client never stopped sending")


class LimitsTests(SynchronousTestCase):
    """
    The client honours the server's C{LIMITS} keyword (RFC 9422).
    """

    def test_parse(self) -> None:
        """
        C{RCPTMAX} and C{MAILMAX} are read from C{LIMITS}; malformed, zero
        or over-long values are ignored, and a missing keyword means no
        limit.
        """
        for line, expected in (
            ("250 LIMITS RCPTMAX=2 MAILMAX=3", (2, 3)),
            ("250 LIMITS MAILMAX=10", (None, 10)),
            ("250 LIMITS RCPTMAX=0 MAILMAX=x1", (None, None)),
            ("250 LIMITS RCPTMAX=1234567 FOO=2", (None, None)),
            ("250 LIMITS rcptmax=5", (5, None)),
            ("250 PIPELINING", (None, None)),
        ):
            caps = Capabilities.fromEHLO(Response(250, ("hello", line[4:])))
            self.assertEqual(caps.limits, expected, line)

    def test_rcptMaxSplits(self) -> None:
        """
        A server announcing C{RCPTMAX=2} gets a 5-recipient message in three
        transactions of 2, 2 and 1 recipients, and every recipient its own
        reply in envelope order.
        """
        proto, transport, _ = ready(EHLO_LIMITS)
        rcpts = [f"r{n}@example.net" for n in range(5)]
        d = proto.transaction(envelope(*rcpts), TrackingBody())
        transactions = answerAll(proto, transport)
        self.assertEqual(
            [[line for line in t if line.startswith(b"RCPT")] for t in transactions],
            [
                [b"RCPT TO:<r0@example.net>", b"RCPT TO:<r1@example.net>"],
                [b"RCPT TO:<r2@example.net>", b"RCPT TO:<r3@example.net>"],
                [b"RCPT TO:<r4@example.net>"],
            ],
        )
        self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0")] * 5)
        self.assertEqual((proto.transactions, proto.transactionsLeft), (3, 0))

    def test_repliesPerTransaction(self) -> None:
        """
        Each transaction's own replies go to its recipients: a refused MAIL
        in the second transaction defers only its recipients, after the
        first ones were delivered.
        """
        proto, transport, _ = ready(EHLO_LIMITS)
        d = proto.transaction(envelope("a@example.net", "b@example.net", "c@example.net"), TrackingBody())
        sent(transport)
        serve(proto, "250 ok", "250 ok", "250 ok", "354 go")
        drain(transport)
        transport.clear()
        serve(proto, "250 2.0.0 queued")
        self.assertEqual(
            sent(transport), [b"MAIL FROM:<sender@example.org>", b"RCPT TO:<c@example.net>", b"DATA"]
        )
        serve(proto, "451 4.3.0 busy", "503 5.5.1 no MAIL", "503 5.5.1 no MAIL")
        self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0"), (250, "2.0.0"), (451, "4.3.0")])

    def test_firstTransactionFailsHost(self) -> None:
        """
        A refused MAIL in the first transaction is still a host failure
        (nothing was decided, so another host may be tried).
        """
        proto, transport, _ = ready(EHLO_LIMITS)
        d = proto.transaction(envelope("a@example.net", "b@example.net", "c@example.net"), TrackingBody())
        sent(transport)
        serve(proto, "421 4.3.2 shutting down", "503 no", "503 no", "503 no")
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual(failure.value.reply.code, 421)

    def test_mailMaxDefersTheRest(self) -> None:
        """
        On a fresh connection, recipients beyond C{MAILMAX} transactions of
        C{RCPTMAX} get C{452 4.5.3} (retried later) and are never sent.
        """
        proto, transport, _ = ready(("250-hi", "250-PIPELINING", "250 LIMITS RCPTMAX=1 MAILMAX=2"))
        d = proto.transaction(envelope("a@example.net", "b@example.net", "c@example.net"), TrackingBody())
        transactions = answerAll(proto, transport)
        self.assertEqual(len(transactions), 2)
        self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0"), (250, "2.0.0"), (452, "4.5.3")])

    def test_usedConnectionTooFull(self) -> None:
        """
        A connection used before, with fewer transactions left than the
        message needs, sends nothing and fails as a host, so that the
        caller uses a new connection.
        """
        proto, transport, _ = ready(("250-hi", "250-PIPELINING", "250 LIMITS RCPTMAX=1 MAILMAX=2"))
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        answerAll(proto, transport)
        self.successResultOf(d)
        self.assertEqual(proto.transactionsLeft, 1)
        d = proto.transaction(envelope("a@example.net", "b@example.net"), TrackingBody())
        failure = self.failureResultOf(d, HostFailure)
        self.assertEqual((failure.value.reply.code, failure.value.reply.enhanced), (452, "4.5.3"))
        self.assertEqual(transport.value(), b"")

    def test_noLimitsOneTransaction(self) -> None:
        """
        Without C{LIMITS}, every recipient goes in one transaction.
        """
        proto, transport, _ = ready(EHLO_FULL)
        d = proto.transaction(envelope(*[f"r{n}@example.net" for n in range(5)]), TrackingBody())
        self.assertEqual(len(answerAll(proto, transport)), 1)
        self.assertEqual(codes(self.successResultOf(d)), [(250, "2.0.0")] * 5)

    def test_ownTransactionLimit(self) -> None:
        """
        Our own C{maxTransactions} (traffic shaping's messages per
        connection) caps the connection like C{MAILMAX}, whichever is lower.
        """
        proto, transport, _ = ready(EHLO_LIMITS)
        self.assertEqual(proto.transactionsLeft, 3)
        proto.maxTransactions = 1
        self.assertEqual(proto.transactionsLeft, 1)
        d = proto.transaction(envelope("a@example.net"), TrackingBody())
        answerAll(proto, transport)
        self.successResultOf(d)
        self.assertEqual(proto.transactionsLeft, 0)
        proto, _, _ = ready(EHLO_FULL)
        self.assertIsNone(proto.transactionsLeft)
        proto.maxTransactions = 5
        self.assertEqual(proto.transactionsLeft, 5)
