"""
Tests for L{mailfw.smtp.SMTPServerProtocol} and L{mailfw.smtp.SMTPFactory}
over a L{StringTransport} with a L{Clock}: every reply path, pipelining
order, strict DATA, BDAT, limits and timeouts.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer, ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ConfigError, Section
from mailfw.envelope import Recipient
from mailfw.interfaces import IIncomingMessage, IPolicy
from mailfw.policy import CONTINUE, Verdict
from mailfw.queued import QueueFull
from mailfw.reply import SMTPReply
from mailfw.smtp import SMTPFactory, SMTPLimits, SMTPServerProtocol
from mailfw.smtp._framing import InputFramer
from mailfw.smtp._server import CLOSE_GRACE
from mailfw.smtp._settings import SessionSettings
from tests._smtpdoubles import (
    EHLO,
    HOSTNAME,
    PROLOGUE,
    DictRouter,
    RecordingIncoming,
    RecordingQueue,
    StagePolicy,
    TLSStringTransport,
    connect,
)

MAIL = b"MAIL FROM:<sender@example.net>\r\n"
RCPT = b"RCPT TO:<rcpt@example.org>\r\n"


class DoublesTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        The doubles provide the interfaces they claim.
        """
        self.assertTrue(verifyObject(IIncomingMessage, RecordingIncoming("Q")))
        self.assertTrue(verifyObject(IPolicy, StagePolicy()))
        self.assertTrue(verifyObject(ITLSTransport, TLSStringTransport()))


class GreetingTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        """
        The greeting is C{220 <hostname> ESMTP}.
        """
        conn = connect(greet=False)
        self.assertEqual(conn.transport.value(), b"220 mx.example.org ESMTP\r\n")

    def test_connectionRefused(self) -> None:
        """
        A permanent connection refusal replaces the greeting with 554, and
        the server then answers only QUIT (RFC 5321 3.1).
        """
        policy = StagePolicy(connection=Verdict.reject(550, "5.7.1", "Go away"))
        conn = connect(policies=(policy,), greet=False)
        conn.send(EHLO + MAIL + b"NOOP\r\nQUIT\r\n")
        self.assertEqual(
            conn.lines(),
            [
                b"554 mx.example.org Go away",
                b"503 Bad sequence of commands",
                b"503 Bad sequence of commands",
                b"503 Bad sequence of commands",
                b"221 Bye",
            ],
        )
        self.assertTrue(conn.closed)

    def test_connectionDeferred(self) -> None:
        """
        A transient connection refusal is a 421, and the server hangs up.
        """
        policy = StagePolicy(connection=Verdict.reject(450, "4.7.1", "Later"))
        conn = connect(policies=(policy,), greet=False)
        self.assertEqual(conn.lines(), [b"421 mx.example.org Later"])
        self.assertTrue(conn.closed)

    def test_slowConnectionCheck(self) -> None:
        """
        While the connection check waits, commands sent early wait too and
        are answered after the greeting.
        """
        policy = StagePolicy(connection="slow")
        conn = connect(policies=(policy,), greet=False)
        conn.send(EHLO + b"NOOP\r\n")
        self.assertEqual(conn.transport.value(), b"")
        policy.pending[0].callback(CONTINUE)
        self.assertEqual(conn.codes(), [b"220", b"250", b"250"])

    def test_connectionCheckFails(self) -> None:
        """
        A connection check that raises gives 421 and a logged failure.
        """
        policy = StagePolicy(connection=RuntimeError("boom"))
        conn = connect(policies=(policy,), greet=False)
        self.assertEqual(conn.codes(), [b"421"])
        self.assertNotIn(b"boom", conn.transport.value())
        self.assertTrue(conn.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_connectionLogged(self) -> None:
        """
        A connection is one info event when it ends, with the peer as text,
        the listener, its duration and how many messages it brought.
        """
        with capturedLogs() as events:
            conn = connect()
            conn.send(PROLOGUE + b"x\r\n.\r\n")
            conn.clock.advance(2)
            conn.proto.connectionLost(Failure(ConnectionLost()))
        [event] = [e for e in events if "accepted" in e and "duration" in e]
        self.assertEqual(
            (event["log_level"].name, event["peer"], event["listener"], event["duration"], event["accepted"]),
            ("info", "192.0.2.1:40000", "smtp", 2.0, 1),
        )


class HelpTests(SynchronousTestCase):
    def test_helpFollowsSession(self) -> None:
        """
        HELP lists STARTTLS only where TLS can start, like EHLO, and never
        AUTH or ETRN where they are not offered.
        """
        plain = connect()
        plain.send(EHLO + b"HELP\r\n")
        withTLS = connect(tlsOptions=object(), transportFactory=TLSStringTransport)
        withTLS.send(EHLO + b"HELP\r\n")
        plainHelp, tlsHelp = plain.replies()[-1], withTLS.replies()[-1]
        self.assertTrue(plainHelp.startswith(b"214 2.0.0 Commands: "))
        self.assertNotIn(b"STARTTLS", plainHelp)
        self.assertIn(b"STARTTLS", tlsHelp)
        for reply in (plainHelp, tlsHelp):
            self.assertNotIn(b"AUTH", reply)
            self.assertNotIn(b"ETRN", reply)


class HeloTests(SynchronousTestCase):
    def test_ehlo(self) -> None:
        """
        EHLO lists the extensions, without enhanced codes (RFC 2034).
        """
        conn = connect()
        conn.send(EHLO)
        self.assertEqual(
            conn.lines(),
            [
                b"250-mx.example.org",
                b"250-PIPELINING",
                b"250-SIZE 36700160",
                b"250-8BITMIME",
                b"250-ENHANCEDSTATUSCODES",
                b"250-SMTPUTF8",
                b"250-CHUNKING",
                b"250-DSN",
                b"250 LIMITS RCPTMAX=1000 MAILMAX=1000",
            ],
        )

    def test_starttlsAdvertised(self) -> None:
        """
        STARTTLS is offered only with TLS options and a transport that can
        start TLS.
        """
        conn = connect(tlsOptions=object(), transportFactory=TLSStringTransport)
        conn.send(EHLO)
        self.assertEqual(conn.lines()[-1], b"250 STARTTLS")
        conn = connect(tlsOptions=object())
        conn.send(EHLO)
        self.assertNotIn(b"STARTTLS", conn.transport.value())
        conn = connect(transportFactory=TLSStringTransport)
        conn.send(EHLO)
        self.assertNotIn(b"STARTTLS", conn.transport.value())

    def test_enhancedCodesOnlyAfterEhlo(self) -> None:
        """
        Replies carry enhanced status codes after EHLO, not before it and
        not after HELO.
        """
        conn = connect()
        conn.send(b"NOOP\r\nHELO client.example.net\r\nNOOP\r\n" + EHLO + b"NOOP\r\n")
        self.assertEqual(
            conn.replies(),
            [
                b"250 Ok",
                b"250 mx.example.org",
                b"250 Ok",
                b"250 LIMITS RCPTMAX=1000 MAILMAX=1000",
                b"250 2.0.0 Ok",
            ],
        )

    def test_syntax(self) -> None:
        """
        A missing or malformed name gets 501 and does not start a session.
        """
        conn = connect()
        conn.send(b"EHLO\r\nHELO\r\nEHLO a b\r\nHELO (x)\r\n" + MAIL)
        self.assertEqual(conn.codes(), [b"501", b"501", b"501", b"501", b"503"])

    def test_heloPolicy(self) -> None:
        """
        The HELO check sees the name; a refusal leaves the session without
        one, so MAIL is out of sequence.
        """
        policy = StagePolicy(helo=Verdict.reject(550, "5.7.1", "Bad name"))
        conn = connect(policies=(policy,))
        conn.send(EHLO + MAIL)
        self.assertEqual(conn.replies(), [b"550 Bad name", b"503 Send HELO or EHLO first"])
        self.assertEqual(policy.calls[1][0], "helo")
        self.assertEqual(policy.calls[1][1][1], "client.example.net")

    def test_ehloResetsTransaction(self) -> None:
        """
        EHLO ends a mail transaction, so a RCPT after it is out of sequence.
        """
        conn = connect()
        conn.send(EHLO + MAIL + EHLO + RCPT)
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"503"])

    def test_sessionRecordsHelo(self) -> None:
        """
        The session value carries the name and whether EHLO was used.
        """
        conn = connect()
        conn.send(b"HELO old.example\r\n")
        self.assertEqual((conn.proto.session.helo, conn.proto.session.esmtp), ("old.example", False))
        conn.send(EHLO)
        self.assertEqual((conn.proto.session.helo, conn.proto.session.esmtp), ("client.example.net", True))


class CommandTests(SynchronousTestCase):
    def test_sequence(self) -> None:
        """
        Commands out of order get 503 5.5.1.
        """
        conn = connect()
        conn.send(MAIL + EHLO + RCPT + b"DATA\r\n")
        conn.send(MAIL + MAIL + b"DATA\r\n")
        self.assertEqual(
            conn.replies()[:1] + conn.replies()[2:],
            [
                b"503 Send HELO or EHLO first",
                b"503 5.5.1 Need MAIL command first",
                b"503 5.5.1 Need MAIL command first",
                b"250 2.1.0 Ok",
                b"503 5.5.1 Nested MAIL command",
                b"503 5.5.1 Need RCPT command first",
            ],
        )

    def test_noValidRecipients(self) -> None:
        """
        DATA after only refused recipients gets 554 5.5.1.
        """
        conn = connect()
        conn.send(EHLO + MAIL + b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\n")
        self.assertEqual(
            conn.replies()[-2:], [b"554 5.7.1 Relay access denied", b"554 5.5.1 No valid recipients"]
        )

    def test_unknownAndUnimplemented(self) -> None:
        """
        Unknown verbs get 500 5.5.2; known but unoffered ones (TURN, ETRN,
        EXPN, AUTH) 502 5.5.1.
        """
        conn = connect()
        conn.send(EHLO + b"FOO\r\nTURN\r\nETRN example.org\r\nEXPN list\r\nAUTH PLAIN\r\n")
        self.assertEqual(
            conn.replies()[1:],
            [b"500 5.5.2 Command unrecognized"] + [b"502 5.5.1 Command not implemented"] * 4,
        )

    def test_simpleCommands(self) -> None:
        """
        NOOP (with or without text), RSET, VRFY, HELP and their syntax errors.
        """
        conn = connect()
        conn.send(
            EHLO + b"NOOP\r\nNOOP anything\r\nRSET\r\nRSET x\r\nVRFY user\r\nVRFY\r\nHELP\r\nHELP MAIL\r\n"
        )
        self.assertEqual(conn.codes()[1:], [b"250", b"250", b"250", b"501", b"252", b"501", b"214", b"214"])

    def test_quit(self) -> None:
        """
        QUIT says 221 and closes; what was pipelined after it is ignored.
        """
        conn = connect()
        conn.send(b"QUIT x\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(conn.replies(), [b"501 Syntax error: no parameters allowed", b"221 Bye"])
        self.assertTrue(conn.closed)
        conn.send(b"NOOP\r\n")
        self.assertEqual(len(conn.replies()), 2)

    def test_rsetEndsTransaction(self) -> None:
        """
        RSET forgets the sender and recipients.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"RSET\r\nDATA\r\n")
        self.assertEqual(conn.codes(), [b"250"] * 4 + [b"503"])

    def test_bareLineEndingInCommand(self) -> None:
        """
        A command line holding a lone LF or CR is one bad line (500), not two
        commands: nothing after the lone LF is executed.
        """
        conn = connect()
        conn.send(EHLO + b"NOOP\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n")
        conn.send(b"RSET\rMAIL FROM:<a@example.net>\r\n")
        self.assertEqual(conn.codes(), [b"250", b"500", b"503", b"500"])
        self.assertEqual(conn.replies()[1], b"500 5.5.2 Commands must end with CRLF")

    def test_lfOnlyClientGetsLineTooLong(self) -> None:
        """
        A client ending lines with LF only never has a command executed.
        """
        conn = connect()
        conn.send(b"EHLO x\nMAIL FROM:<a@example.net>\n" * 100)
        self.assertEqual(conn.codes(), [b"500"])
        self.assertIsNone(conn.proto.session.helo)

    def test_commandLineTooLong(self) -> None:
        """
        Commands longer than 512 octets get 500; MAIL and RCPT may use the
        parameter allowance.
        """
        conn = connect()
        conn.send(EHLO + b"NOOP " + b"x" * 505 + b"\r\n" + b"NOOP " + b"x" * 506 + b"\r\n")
        self.assertEqual(conn.replies()[1:], [b"250 2.0.0 Ok", b"500 5.5.2 Line too long"])
        conn.send(
            b"MAIL FROM:<a@example.net> ENVID="
            + b"x" * 100
            + b"".join(b" X-%d=b" % i for i in range(200))
            + b"\r\n"
        )
        self.assertEqual(conn.codes()[-1], b"555")

    def test_overlongLineSkipped(self) -> None:
        """
        A line without CRLF within the limit gets one 500; its tail, however
        it arrives, is skipped up to the CRLF and never executed.
        """
        conn = connect()
        conn.send(EHLO + b"NOOP " + b"x" * 3000)
        self.assertEqual(conn.codes(), [b"250", b"500"])
        conn.send(b"y" * 100 + b"\r")
        conn.send(b"\nMAIL FROM:<a@example.net>\r\n")
        conn.send(b"NOOP " + b"z" * 2100 + b" MAIL FROM:<b@example.net>\r\n" + RCPT)
        self.assertEqual(conn.codes(), [b"250", b"500", b"250", b"500", b"250"])

    def test_forbiddenCommand(self) -> None:
        """
        An HTTP request on the SMTP port is answered with 221 and closed.
        """
        conn = connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: mx.example.org\r\n\r\n")
        self.assertEqual(conn.replies(), [b"221 mx.example.org Not an SMTP client, closing"])
        self.assertTrue(conn.closed)

    def test_invalidCharacters(self) -> None:
        """
        NUL and other controls in a command get 500.
        """
        conn = connect()
        conn.send(EHLO + b"MAIL FROM:<a\x00@example.net>\r\n")
        self.assertEqual(conn.replies()[-1], b"500 5.5.2 Invalid characters in command")


class MailTests(SynchronousTestCase):
    def test_size(self) -> None:
        """
        A declared size over the limit is refused with 552 5.3.4.
        """
        conn = connect(limits=SMTPLimits(maxMessageSize=1000))
        conn.send(EHLO + b"MAIL FROM:<a@example.net> SIZE=1001\r\nMAIL FROM:<a@example.net> SIZE=1000\r\n")
        self.assertEqual(conn.replies()[1:], [b"552 5.3.4 Message size exceeds fixed limit", b"250 2.1.0 Ok"])

    def test_parameterErrors(self) -> None:
        """
        Unknown parameters get 555, malformed ones 501, UTF-8 without
        SMTPUTF8 553; none starts a transaction.
        """
        conn = connect()
        conn.send(
            EHLO
            + b"MAIL FROM:<a@example.net> FOO=1\r\n"
            + b"MAIL FROM:<a@example.net> BODY=BINARYMIME\r\n"
            + b"MAIL FROM:<a@example.net> SIZE=x\r\n"
            + "MAIL FROM:<ü@example.net>\r\n".encode()
            + RCPT
        )
        self.assertEqual(conn.codes()[1:], [b"555", b"555", b"501", b"553", b"503"])

    def test_nullSender(self) -> None:
        """
        The null reverse-path is accepted and reaches the envelope as None.
        """
        conn = connect()
        conn.send(EHLO + b"MAIL FROM:<>\r\n" + RCPT + b"DATA\r\n\r\nx\r\n.\r\n")
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"354", b"250"])
        self.assertIsNone(conn.queue.messages[0][0].sender)

    def test_senderPolicy(self) -> None:
        """
        The sender check gets the sender and raw parameters; a refusal is
        the reply and no transaction starts.
        """
        policy = StagePolicy(sender=Verdict.reject(550, "5.7.1", "Sender refused"))
        conn = connect(policies=(policy,))
        conn.send(EHLO + b"MAIL FROM:<a@example.net> SIZE=10 body=8bitmime\r\n" + RCPT)
        self.assertEqual(
            conn.replies()[1:], [b"550 5.7.1 Sender refused", b"503 5.5.1 Need MAIL command first"]
        )
        _stage, (session, sender, parameters) = policy.calls[-1]
        self.assertEqual(sender, Address("a", "example.net"))
        self.assertEqual(dict(parameters), {"SIZE": "10", "BODY": "8bitmime"})
        self.assertEqual(session.helo, "client.example.net")

    def test_submissionNeedsAuth(self) -> None:
        """
        On the submission port MAIL needs authentication (530 5.7.0).
        """
        conn = connect(kind="submission")
        conn.send(EHLO + MAIL)
        self.assertEqual(conn.replies()[-1], b"530 5.7.0 Authentication required")

    def test_parametersAfterHelo(self) -> None:
        """
        After HELO, ESMTP parameters are refused with 555.
        """
        conn = connect()
        conn.send(b"HELO c.example\r\nMAIL FROM:<a@example.net> SIZE=1\r\n" + MAIL)
        self.assertEqual(conn.codes(), [b"250", b"555", b"250"])


class RcptTests(SynchronousTestCase):
    def test_localAndRelay(self) -> None:
        """
        Local recipients get 250 2.1.5; others get the router's refusal.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"RCPT TO:<x@elsewhere.example>\r\n")
        self.assertEqual(conn.replies()[2:], [b"250 2.1.5 Ok", b"554 5.7.1 Relay access denied"])

    def test_relayTricks(self) -> None:
        """
        C{user%other@local}, C{"user@other"@local} and C{other!user@local}
        are local parts at the local domain; C{@local:user@other} routes
        C{user@other}, which is refused.
        """
        conn = connect()
        conn.send(
            EHLO
            + MAIL
            + b"RCPT TO:<user%elsewhere.example@example.org>\r\n"
            + b'RCPT TO:<"user@elsewhere.example"@example.org>\r\n'
            + b"RCPT TO:<elsewhere.example!user@example.org>\r\n"
            + b"RCPT TO:<@example.org:user@elsewhere.example>\r\n"
        )
        self.assertEqual(conn.codes()[2:], [b"250", b"250", b"250", b"554"])
        routed = [address for address, session in conn.router.calls]
        self.assertEqual(
            routed,
            [
                Address("user%elsewhere.example", "example.org"),
                Address('"user@elsewhere.example"', "example.org"),
                Address("elsewhere.example!user", "example.org"),
                Address("user", "elsewhere.example"),
            ],
        )

    def test_postmaster(self) -> None:
        """
        Bare C{<postmaster>} is always accepted, without asking the router,
        even when every check would refuse it.
        """
        policy = StagePolicy(recipient=Verdict.reject(550, "5.7.1", "No"))
        conn = connect(policies=(policy,), router=DictRouter(local=frozenset()))
        conn.send(EHLO + MAIL + b"RCPT TO:<PostMaster>\r\nDATA\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"354", b"250"])
        self.assertEqual(conn.router.calls, [])
        envelope = conn.queue.messages[0][0]
        self.assertEqual(envelope.recipients[0].address, Address("postmaster", HOSTNAME))

    def test_postmasterAtLocalDomain(self) -> None:
        """
        Postmaster at a local domain passes even a refusing policy; other
        local users do not.
        """
        policy = StagePolicy(recipient=Verdict.reject(550, "5.7.1", "No"))
        conn = connect(policies=(policy,))
        conn.send(EHLO + MAIL + b"RCPT TO:<postmaster@example.org>\r\n" + RCPT)
        self.assertEqual(conn.codes()[2:], [b"250", b"550"])

    def test_unknownUser(self) -> None:
        """
        The router's unknown-user refusal is passed on.
        """
        conn = connect(router=DictRouter(users=frozenset({"rcpt"})))
        conn.send(EHLO + MAIL + RCPT + b"RCPT TO:<nobody@example.org>\r\n")
        self.assertEqual(conn.replies()[-1], b"550 5.1.1 User unknown")

    def test_recipientPolicy(self) -> None:
        """
        The recipient check sees the envelope so far and the recipient with
        its DSN parameters.
        """
        policy = StagePolicy()
        conn = connect(policies=(policy,))
        conn.send(
            EHLO
            + MAIL
            + RCPT
            + b"RCPT TO:<two@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;two+2B@example.org\r\n"
        )
        stage, (_session, envelope, recipient) = policy.calls[-1]
        self.assertEqual(stage, "recipient")
        self.assertEqual([r.address.localpart for r in envelope.recipients], ["rcpt"])
        self.assertEqual(
            recipient,
            Recipient(
                Address("two", "example.org"), frozenset({"SUCCESS", "FAILURE"}), "rfc822;two+@example.org"
            ),
        )

    def test_tooManyRecipients(self) -> None:
        """
        Recipients past the limit get 452 4.5.3; the accepted ones stay.
        """
        conn = connect(limits=SMTPLimits(maxRecipients=2))
        conn.send(EHLO + MAIL + b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(4)))
        self.assertEqual(conn.codes()[2:], [b"250", b"250", b"452", b"452"])
        conn.send(b"DATA\r\n\r\n.\r\n")
        self.assertEqual(len(conn.queue.messages[0][0].recipients), 2)

    def test_tooManyRecipientsPipelined(self) -> None:
        """
        With slow checks, recipients beyond the limit wait for the pending
        ones to be decided: a refused one makes room.
        """
        router = DictRouter(slow=True)
        conn = connect(router=router, limits=SMTPLimits(maxRecipients=2))
        conn.send(EHLO + MAIL + b"RCPT TO:<x@elsewhere.example>\r\n" + RCPT + b"RCPT TO:<r3@example.org>\r\n")
        self.assertEqual(len(router.pending), 2)
        router.fire(0)
        router.fire(1)
        self.assertEqual(len(router.pending), 3)
        router.fire(2)
        self.assertEqual(conn.codes()[2:], [b"554", b"250", b"250"])

    def test_duplicateRecipient(self) -> None:
        """
        The same recipient twice is accepted once into the envelope.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + RCPT + b"DATA\r\n\r\n.\r\n")
        self.assertEqual(len(conn.queue.messages[0][0].recipients), 1)

    def test_routerFails(self) -> None:
        """
        A router exception is 451 4.3.0 and a logged failure, not a traceback.
        """
        router = DictRouter()
        router.error = RuntimeError("db down")
        conn = connect(router=router)
        conn.send(EHLO + MAIL + RCPT)
        self.assertEqual(conn.replies()[-1], b"451 4.3.0 Local error in processing, try again later")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_routerPlainValue(self) -> None:
        """
        A router returning a plain L{Route} instead of a L{Deferred} works.
        """
        router = DictRouter()
        router.route = router.decide  # type: ignore[method-assign, assignment]
        conn = connect(router=router)
        conn.send(EHLO + MAIL + RCPT)
        self.assertEqual(conn.codes()[-1], b"250")

    def test_routerTimeout(self) -> None:
        """
        A router that does not answer within the policy timeout gives 451
        4.4.3.
        """
        conn = connect(router=DictRouter(slow=True))
        conn.send(EHLO + MAIL + RCPT)
        conn.clock.advance(59)
        self.assertEqual(len(conn.codes()), 2)
        conn.clock.advance(1)
        self.assertEqual(conn.replies()[-1], b"451 4.4.3 Temporary lookup failure, try again later")

    def test_policyTimeout(self) -> None:
        """
        A policy that does not answer within its timeout gives 451 4.4.3.
        """
        policy = StagePolicy(recipient="slow")
        conn = connect(policies=(policy,), limits=SMTPLimits(policyTimeout=5))
        conn.send(EHLO + MAIL + RCPT)
        conn.clock.advance(5)
        self.assertEqual(conn.codes()[-1], b"451")

    def test_policyChain(self) -> None:
        """
        Policies run in order until one decides; a positive verdict skips
        the rest; a policy returning nonsense gives 451.
        """
        first = StagePolicy("first", recipient=Verdict(SMTPReply(250, "2.1.5", "fine")))
        second = StagePolicy("second", recipient=Verdict.reject(550, "5.7.1", "No"))
        conn = connect(policies=(first, second))
        conn.send(EHLO + MAIL + RCPT)
        self.assertEqual(conn.replies()[-1], b"250 2.1.5 Ok")
        self.assertEqual([c[0] for c in second.calls], ["connection", "helo", "sender"])
        bad = StagePolicy("bad", recipient="not a verdict")
        conn = connect(policies=(bad,))
        conn.send(EHLO + MAIL + RCPT)
        self.assertEqual(conn.codes()[-1], b"451")
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_disconnectVerdict(self) -> None:
        """
        A verdict asking to disconnect sends its reply and hangs up.
        """
        policy = StagePolicy(recipient=Verdict(SMTPReply(421, "4.7.0", "Bye now"), disconnect=True))
        conn = connect(policies=(policy,))
        conn.send(EHLO + MAIL + RCPT + b"NOOP\r\n")
        self.assertEqual(conn.replies()[-1], b"421 4.7.0 Bye now")
        self.assertTrue(conn.closed)


class BackpressureTests(SynchronousTestCase):
    def test_registeredAsProducer(self) -> None:
        """
        The session's input framer is the transport's streaming producer;
        while the transport's write buffer is full no further command is run.
        """
        conn = connect()
        self.assertIsInstance(conn.transport.producer, InputFramer)
        self.assertTrue(verifyObject(IPushProducer, conn.transport.producer))
        self.assertTrue(conn.transport.streaming)
        producer = conn.transport.producer
        assert producer is not None
        producer.pauseProducing()
        self.assertEqual(conn.transport.producerState, "paused")
        conn.send(EHLO + b"NOOP\r\n")
        self.assertEqual(conn.codes(), [])
        producer.resumeProducing()
        self.assertEqual(conn.codes(), [b"250", b"250"])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_notReadingClientAborted(self) -> None:
        """
        A client that stops reading and lets the idle timeout expire is
        aborted, not left waiting for its buffer to drain.
        """
        conn = connect()
        producer = conn.transport.producer
        assert producer is not None
        producer.pauseProducing()
        conn.clock.advance(300)
        self.assertTrue(conn.transport.disconnected)

    def test_tlsWriteBufferKeepsReading(self) -> None:
        """
        On a TLS transport (implicit TLS) a full write buffer stops command
        processing but not reading: TLS may need to read to write (the
        greeting is buffered until the handshake, which needs the client's
        data), so pausing the transport would deadlock.
        """
        conn = connect("submissions", transportFactory=SSLStringTransport)
        self.assertTrue(verifyObject(ISSLTransport, conn.transport))
        producer = conn.transport.producer
        assert producer is not None
        producer.pauseProducing()
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(EHLO + b"NOOP\r\n")
        self.assertEqual(conn.codes(), [])
        producer.resumeProducing()
        self.assertEqual(conn.codes(), [b"250", b"250"])

    def test_tlsUnreadInputBounded(self) -> None:
        """
        A TLS client that sends on without reading replies is aborted once
        a megabyte of its input waits unprocessed.
        """
        conn = connect("submissions", transportFactory=SSLStringTransport)
        producer = conn.transport.producer
        assert producer is not None
        producer.pauseProducing()
        with capturedLogs() as events:
            for _ in range(300):
                conn.send(b"NOOP " + b"x" * 4000 + b"\r\n")
        self.assertTrue(conn.transport.disconnected)
        self.assertTrue([e for e in events if "without reading" in e["log_format"]])


@implementer(ISSLTransport)
class SSLStringTransport(TLSStringTransport):
    """
    A L{StringTransport} that says it is encrypted, as C{ssl:} listeners'
    transports do.
    """

    def getPeerCertificate(self) -> None:
        return None


class PipeliningTests(SynchronousTestCase):
    def test_repliesInOrder(self) -> None:
        """
        Pipelined RCPT checks run concurrently; replies leave in command
        order whatever order the checks finish in, and later commands wait.
        """
        router = DictRouter(slow=True)
        conn = connect(router=router)
        conn.send(
            EHLO
            + MAIL
            + b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@elsewhere.example>\r\nRCPT TO:<c@example.org>\r\n"
            + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(len(router.pending), 3)
        self.assertEqual(conn.codes(), [b"250", b"250"])
        router.fire(2)
        router.fire(1)
        self.assertEqual(conn.codes(), [b"250", b"250"])
        router.fire(0)
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"554", b"250", b"354", b"250", b"221"])
        envelope, incoming = conn.queue.messages[0]
        self.assertEqual([r.address.localpart for r in envelope.recipients], ["a", "c"])
        self.assertTrue(incoming.data.endswith(b"Subject: x\r\n\r\nbody\r\n"))

    def test_inputPausedWhileWaiting(self) -> None:
        """
        While a non-RCPT command waits for earlier replies the transport is
        paused, and resumed afterwards.
        """
        policy = StagePolicy(sender="slow")
        conn = connect(policies=(policy,))
        conn.send(EHLO + MAIL + RCPT)
        self.assertEqual(conn.transport.producerState, "paused")
        self.assertEqual(conn.router.calls, [])
        policy.pending[0].callback(CONTINUE)
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual(conn.codes(), [b"250", b"250", b"250"])

    def test_bodyAfterRefusedDataWhileReplyPending(self) -> None:
        """
        A DATA that waited behind a pending RCPT reply and is then refused
        is followed by a synchronization error, so the body pipelined behind
        it is never read as commands (RFC 2920 3.1).
        """
        router = DictRouter(slow=True)
        conn = connect(router=router)
        conn.send(
            EHLO
            + MAIL
            + b"RCPT TO:<nobody@elsewhere.example>\r\nDATA\r\n"
            + b"MAIL FROM:<e@evil.example>\r\nRCPT TO:<smuggled@example.org>\r\nNOOP\r\n"
        )
        router.fire(0)
        self.assertEqual(conn.codes(), [b"250", b"250", b"554", b"554", b"554"])
        self.assertEqual(conn.replies()[-1][:9], b"554 5.5.0")
        self.assertTrue(conn.closed)
        self.assertEqual([str(a) for a, _ in router.calls], ["nobody@elsewhere.example"])

    def test_pendingChecksBounded(self) -> None:
        """
        No more than C{maxPendingChecks} RCPT checks run at once.
        """
        router = DictRouter(slow=True)
        conn = connect(router=router, limits=SMTPLimits(maxPendingChecks=3))
        conn.send(EHLO + MAIL + b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(10)))
        self.assertEqual(len(router.pending), 3)
        for i in range(10):
            router.fire(i)
        self.assertEqual(conn.codes(), [b"250"] * 12)

    def test_slowMessageCheck(self) -> None:
        """
        While checkMessage decides, reading pauses; nothing reaches the queue
        until the verdict, and then the added headers come right below the
        trace header.
        """
        policy = StagePolicy(message="slow")
        conn = connect(policies=(policy,))
        conn.send(PROLOGUE + b"Subject: s\r\n\r\nbody")
        incoming = conn.queue.messages[0][1]
        self.assertEqual(incoming.chunks, [])
        self.assertEqual(conn.transport.producerState, "paused")
        self.assertEqual(policy.calls[-1][1][2], b"Subject: s\r\n")
        policy.pending[0].callback(Verdict(headers=(("X-Checked", "yes"),)))
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(b" more\r\n.\r\n")
        self.assertEqual(conn.codes()[-1], b"250")
        lines = incoming.data.split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"Received: "))
        self.assertEqual(lines[3:7], [b"X-Checked: yes", b"Subject: s", b"", b"body more"])


class DataTests(SynchronousTestCase):
    def test_received(self) -> None:
        """
        The message gets an RFC 5321 4.4 C{Received:} header naming the
        client, this server, the protocol, the queue ID, the one recipient
        and the date.
        """
        clock = Clock()
        clock.advance(1700000000)
        conn = connect(clock=clock)
        conn.send(PROLOGUE + b"Subject: x\r\n\r\n..hi\r\n.\r\n")
        self.assertEqual(conn.replies()[-1], b"250 2.0.0 Ok: queued as Q1")
        self.assertEqual(
            conn.queue.messages[0][1].data,
            b"Received: from client.example.net ([192.0.2.1])\r\n"
            b"\tby mx.example.org with ESMTP id Q1\r\n"
            b"\tfor <rcpt@example.org>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
            b"Subject: x\r\n\r\n.hi\r\n",
        )

    def test_receivedVariants(self) -> None:
        """
        No C{for} with several recipients; SMTP after HELO; UTF8SMTP with
        SMTPUTF8; IPv6 peers as IPv6 literals.
        """
        conn = connect()
        conn.send(b"HELO c.example\r\n" + MAIL + RCPT + b"RCPT TO:<two@example.org>\r\nDATA\r\n\r\n.\r\n")
        header = conn.queue.messages[0][1].data
        self.assertIn(b"with SMTP id Q1; ", header)
        self.assertNotIn(b"for <", header)
        conn = connect(peer="2001:db8::1")
        conn.send(EHLO + "MAIL FROM:<ü@example.net> SMTPUTF8\r\n".encode() + RCPT + b"DATA\r\n\r\n.\r\n")
        header = conn.queue.messages[0][1].data
        self.assertIn(b"([IPv6:2001:db8::1])", header)
        self.assertIn(b"with UTF8SMTP id", header)
        self.assertTrue(conn.queue.messages[0][0].smtputf8)

    def test_envelope(self) -> None:
        """
        The envelope handed to the queue carries the MAIL parameters, the
        recipients with DSN parameters, the HELO name and the peer.
        """
        conn = connect()
        conn.send(
            EHLO
            + b"MAIL FROM:<a@example.net> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=e+2B1\r\n"
            + b"RCPT TO:<r@example.org> NOTIFY=NEVER\r\nDATA\r\n\r\n.\r\n"
        )
        envelope = conn.queue.messages[0][0]
        self.assertEqual(
            (envelope.size, envelope.body, envelope.ret, envelope.envid),
            (10, "8BITMIME", "HDRS", "e+1"),
        )
        self.assertEqual(envelope.recipients[0].notify, frozenset({"NEVER"}))
        self.assertEqual((envelope.helo, envelope.peerHost), ("client.example.net", "192.0.2.1"))

    def test_waitsForCommit(self) -> None:
        """
        The 250 is sent only when the commit fires; commands pipelined after
        the end of data wait for it.
        """
        queue = RecordingQueue()
        commit: Deferred[str] = Deferred()
        queue.commitResult = commit
        conn = connect(queue=queue)
        conn.send(PROLOGUE + b"x\r\n.\r\nNOOP\r\n")
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"354"])
        conn.clock.advance(1000)
        self.assertFalse(conn.closed)
        commit.callback("Q1")
        self.assertEqual(conn.codes()[-2:], [b"250", b"250"])
        self.assertTrue(queue.messages[0][1].committed)

    def test_queueFull(self) -> None:
        """
        A full queue gives 452 4.3.1 and the message is aborted.
        """
        queue = RecordingQueue()
        queue.commitResult = QueueFull()
        conn = connect(queue=queue)
        conn.send(PROLOGUE + b"x\r\n.\r\n")
        self.assertEqual(conn.replies()[-1], b"452 4.3.1 Insufficient system storage, try again later")
        self.assertTrue(queue.messages[0][1].aborted)

    def test_commitFails(self) -> None:
        """
        Any other commit failure gives 451 4.3.0, logged, and the session
        goes on.
        """
        queue = RecordingQueue()
        queue.commitResult = OSError("disk on fire")
        conn = connect(queue=queue)
        conn.send(PROLOGUE + b"x\r\n.\r\n" + MAIL)
        self.assertEqual(conn.codes()[-2:], [b"451", b"250"])
        self.assertNotIn(b"fire", conn.transport.value())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_writeFails(self) -> None:
        """
        A queue whose write raises makes the message 451, not a broken
        connection.
        """
        conn = connect()
        conn.send(PROLOGUE + b"Subject: x\r\n\r\n")
        incoming = conn.queue.messages[0][1]

        def broken(data: bytes) -> None:
            raise OSError("disk")

        incoming.write = broken  # type: ignore[method-assign]
        conn.send(b"body\r\n.\r\nNOOP\r\n")
        self.assertEqual(conn.codes()[-2:], [b"451", b"250"])
        self.assertTrue(incoming.aborted)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_receiveFails(self) -> None:
        """
        A queue that cannot start a message makes DATA 451 4.3.0.
        """
        queue = RecordingQueue()
        queue.receiveError = RuntimeError("no")
        conn = connect(queue=queue)
        conn.send(PROLOGUE)
        self.assertEqual(conn.codes()[-1], b"451")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_emptyMessage(self) -> None:
        """
        An empty message is accepted and stored with the trace header only.
        """
        conn = connect()
        conn.send(PROLOGUE + b".\r\n")
        self.assertEqual(conn.codes()[-1], b"250")
        self.assertTrue(conn.queue.messages[0][1].data.startswith(b"Received: "))

    def test_smuggling(self) -> None:
        """
        None of the smuggling variants ends the data: the commands after
        them are message text, and the message is refused with 550 5.6.0
        once the real end arrives.
        """
        for marker in (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\n"):
            conn = connect()
            conn.send(
                PROLOGUE
                + b"Subject: x\r\n\r\nbody"
                + marker
                + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nevil\r\n"
                + b".\r\nNOOP\r\n"
            )
            self.assertEqual(
                conn.replies()[-3:],
                [
                    b"354 End data with <CR><LF>.<CR><LF>",
                    b"550 5.6.0 Message refused: bare CR or LF; lines must end with CRLF",
                    b"250 2.0.0 Ok",
                ],
                marker,
            )
            self.assertEqual(len(conn.queue.messages), 1, marker)
            self.assertTrue(conn.queue.messages[0][1].aborted, marker)
            self.assertEqual(conn.router.calls[1:], [], marker)

    def test_smugglingSplit(self) -> None:
        """
        The verdict is the same when the input arrives one octet at a time.
        """
        conn = connect()
        for octet in PROLOGUE + b"a\n.\r\nQUIT\r\n.\r\nNOOP\r\n":
            conn.send(bytes([octet]))
        self.assertEqual(conn.codes()[-2:], [b"550", b"250"])
        self.assertFalse(conn.closed)

    def test_oversized(self) -> None:
        """
        A message over the size limit is read to its real end and refused
        with 552 5.3.4; the session continues.
        """
        conn = connect(limits=SMTPLimits(maxMessageSize=1000))
        conn.send(PROLOGUE + (b"x" * 70 + b"\r\n") * 20 + b"QUIT\r\n")
        self.assertTrue(conn.queue.messages[0][1].aborted)
        self.assertFalse(conn.closed)
        conn.send((b"y" * 70 + b"\r\n") * 20 + b".\r\nNOOP\r\n")
        self.assertEqual(
            conn.replies()[-2:], [b"552 5.3.4 Message size exceeds fixed limit", b"250 2.0.0 Ok"]
        )

    def test_longTextLine(self) -> None:
        """
        A text line over 1000 octets is refused with 500 5.5.2 after the
        end; a line of exactly 1000 passes; the check can be turned off.
        """
        conn = connect()
        conn.send(
            PROLOGUE + b"x" * 998 + b"\r\n.\r\n" + MAIL + RCPT + b"DATA\r\n" + b"x" * 999 + b"\r\n.\r\n"
        )
        self.assertEqual(conn.codes()[4], b"250")
        self.assertEqual(conn.replies()[-1], b"500 5.5.2 Message refused: line too long")
        conn = connect(limits=SMTPLimits(maxTextLine=0))
        conn.send(PROLOGUE + b"x" * 5000 + b"\r\n.\r\n")
        self.assertEqual(conn.codes()[-1], b"250")

    def test_loop(self) -> None:
        """
        A message with too many C{Received:} headers is refused with 554
        5.4.6.
        """
        conn = connect(limits=SMTPLimits(maxReceivedHeaders=3))
        conn.send(PROLOGUE + b"Received: a\r\nreceived : b\r\nX: y\r\n\r\n.\r\n")
        self.assertEqual(conn.codes()[-1], b"250")
        conn = connect(limits=SMTPLimits(maxReceivedHeaders=3))
        conn.send(PROLOGUE + b"Received: a\r\nRECEIVED: b\r\n\tfolded\r\nReceived:c\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(conn.replies()[-1], b"554 5.4.6 Too many Received headers: mail loop?")
        self.assertTrue(conn.queue.messages[0][1].aborted)

    def test_messagePolicyRefuses(self) -> None:
        """
        A refusing message check is applied after the real end of data.
        """
        policy = StagePolicy(message=Verdict.reject(550, "5.7.1", "Spam"))
        conn = connect(policies=(policy,))
        conn.send(PROLOGUE + b"Subject: buy\r\n\r\nMAIL FROM:<x@y.example>\r\n")
        self.assertEqual(conn.codes()[-1], b"354")
        conn.send(b".\r\n")
        self.assertEqual(conn.replies()[-1], b"550 5.7.1 Spam")
        self.assertTrue(conn.queue.messages[0][1].aborted)

    def test_messageWithoutBody(self) -> None:
        """
        A header section without a blank line is checked at the end of data.
        """
        policy = StagePolicy()
        conn = connect(policies=(policy,))
        conn.send(PROLOGUE + b"Subject: only\r\n.\r\n")
        self.assertEqual(conn.codes()[-1], b"250")
        self.assertEqual(policy.calls[-1][1][2], b"Subject: only\r\n")
        self.assertTrue(conn.queue.messages[0][1].data.endswith(b"\r\nSubject: only\r\n"))

    def test_policyHeadersChecked(self) -> None:
        """
        Policy headers that would break the header section are dropped.
        """
        policy = StagePolicy(
            message=Verdict(headers=(("Bad Name", "x"), ("X-Ok", "a\r\nb"), ("X-Good", "1")))
        )
        conn = connect(policies=(policy,))
        conn.send(PROLOGUE + b"\r\nbody\r\n.\r\n")
        data = conn.queue.messages[0][1].data
        self.assertIn(b"\r\nX-Good: 1\r\n\r\nbody", data)
        self.assertNotIn(b"Bad Name", data)
        self.assertNotIn(b"X-Ok", data)

    def test_connectionLostInData(self) -> None:
        """
        Losing the connection mid-data aborts the message.
        """
        conn = connect()
        conn.send(PROLOGUE + b"partial")
        conn.proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(conn.queue.messages[0][1].aborted)

    def test_connectionLostWhileChecking(self) -> None:
        """
        Losing the connection while checks are pending cancels them quietly.
        """
        policy = StagePolicy(message="slow")
        router = DictRouter(slow=True)
        conn = connect(policies=(policy,), router=router)
        conn.send(EHLO + MAIL + RCPT + RCPT)
        conn.proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(all(d.called for a, d in router.pending))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_refusedDataWithPipelinedBody(self) -> None:
        """
        Text pipelined behind a refused DATA is not run as commands: it is a
        synchronization error and the server hangs up.
        """
        conn = connect()
        conn.send(EHLO + MAIL + b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\nRCPT TO:<y@example.org>\r\n")
        self.assertEqual(conn.codes()[-2:], [b"554", b"554"])
        self.assertEqual(conn.replies()[-1], b"554 5.5.0 SMTP protocol synchronization error")
        self.assertTrue(conn.closed)
        self.assertEqual(len(conn.router.calls), 1)

    def test_commitAfterDisconnectLogged(self) -> None:
        """
        A message committed after the client left is still logged as
        accepted.
        """
        queue = RecordingQueue()
        commit: Deferred[str] = Deferred()
        queue.commitResult = commit
        conn = connect(queue=queue)
        conn.send(PROLOGUE + b"x\r\n.\r\n")
        conn.proto.connectionLost(Failure(ConnectionLost()))
        with capturedLogs() as events:
            commit.callback("Q1")
        accepted = [e for e in events if e.get("queueID") == "Q1" and "count" in e]
        self.assertEqual(len(accepted), 1)
        self.assertFalse(queue.messages[0][1].aborted)


class BdatTests(SynchronousTestCase):
    def test_chunks(self) -> None:
        """
        BDAT chunks are counted octets, never unstuffed or parsed; each gets
        250 and the LAST one the queue ID.
        """
        conn = connect()
        part1 = b"Subject: x\r\n\r\n.\r\nQUIT\r\n"
        part2 = b"..end\r\n"
        conn.send(
            EHLO
            + MAIL
            + RCPT
            + b"BDAT %d\r\n" % len(part1)
            + part1
            + b"BDAT %d LAST\r\n" % len(part2)
            + part2
        )
        self.assertEqual(
            conn.replies()[3:],
            [b"250 2.0.0 Ok: %d octets received" % len(part1), b"250 2.0.0 Ok: queued as Q1"],
        )
        self.assertTrue(conn.queue.messages[0][1].data.endswith(b"\r\n\r\n.\r\nQUIT\r\n..end\r\n"))
        self.assertFalse(conn.closed)

    def test_zeroLast(self) -> None:
        """
        C{BDAT 0 LAST} ends the message; a missing final CRLF is added.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"BDAT 3\r\nX:yBDAT 0 LAST\r\n")
        self.assertEqual(conn.codes()[-2:], [b"250", b"250"])
        self.assertTrue(conn.queue.messages[0][1].data.endswith(b"X:y\r\n"))

    def test_withoutTransaction(self) -> None:
        """
        BDAT out of sequence still consumes its octets, then says 503.
        """
        conn = connect()
        conn.send(EHLO + b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(conn.codes(), [b"250", b"503", b"250"])
        self.assertFalse(conn.closed)

    def test_dataAfterBdat(self) -> None:
        """
        DATA in a transaction that started with BDAT gets 503.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"BDAT 3\r\nabcDATA\r\n")
        self.assertEqual(conn.replies()[-1], b"503 5.5.1 DATA cannot follow BDAT in one transaction")

    def test_badSyntaxCloses(self) -> None:
        """
        A BDAT whose size cannot be read gets 501 and the connection closes,
        since its octets cannot be skipped.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"BDAT x\r\nRCPT TO:<b@example.org>\r\n")
        self.assertEqual(conn.codes()[-1], b"501")
        self.assertTrue(conn.closed)

    def test_oversized(self) -> None:
        """
        A chunk that takes the message over the limit is consumed and
        refused; the transaction is over, so the next chunk gets 503.
        """
        conn = connect(limits=SMTPLimits(maxMessageSize=10))
        conn.send(EHLO + MAIL + RCPT + b"BDAT 20\r\n" + b"x" * 20 + b"BDAT 3 LAST\r\nabcNOOP\r\n")
        self.assertEqual(conn.codes()[3:], [b"552", b"503", b"250"])
        self.assertTrue(conn.queue.messages[0][1].aborted)

    def test_bareLineEnding(self) -> None:
        """
        A lone LF in a chunk is refused with 550 5.6.0.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"BDAT 4 LAST\r\na\nb\r")
        self.assertEqual(conn.codes()[-1], b"550")

    def test_crlfSplitBetweenChunks(self) -> None:
        """
        A CRLF split across two chunks is fine.
        """
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"BDAT 2\r\na\rBDAT 3 LAST\r\n\nb\n")
        self.assertEqual(conn.codes()[-2:], [b"250", b"550"])
        conn = connect()
        conn.send(EHLO + MAIL + RCPT + b"BDAT 2\r\na\rBDAT 4 LAST\r\n\nb\r\n")
        self.assertEqual(conn.codes()[-2:], [b"250", b"250"])


class TimeoutTests(SynchronousTestCase):
    def test_idle(self) -> None:
        """
        After the idle timeout the server says 421 4.4.2 and hangs up.
        """
        conn = connect()
        conn.clock.advance(299)
        self.assertFalse(conn.closed)
        conn.send(b"NOOP\r\n")
        conn.clock.advance(299)
        self.assertFalse(conn.closed)
        conn.clock.advance(1)
        self.assertEqual(conn.replies()[-1], b"421 mx.example.org Timeout exceeded, closing connection")
        self.assertTrue(conn.closed)

    def test_idleInData(self) -> None:
        """
        A client that stalls inside DATA times out and its message is
        aborted.
        """
        conn = connect()
        conn.send(PROLOGUE + b"half")
        conn.clock.advance(300)
        self.assertTrue(conn.closed)
        self.assertEqual(conn.codes()[-1], b"421")
        self.assertTrue(conn.queue.messages[0][1].aborted)

    def test_notWhileWeWait(self) -> None:
        """
        The idle timer does not fire while the server itself is waiting.
        """
        queue = RecordingQueue()
        commit: Deferred[str] = Deferred()
        queue.commitResult = commit
        conn = connect(queue=queue)
        conn.send(PROLOGUE + b"x\r\n.\r\n")
        conn.clock.advance(900)
        self.assertFalse(conn.closed)
        commit.callback("Q1")
        self.assertEqual(conn.codes()[-1], b"250")
        conn.clock.advance(300)
        self.assertTrue(conn.closed)


class ClosingTests(SynchronousTestCase):
    def test_abortsIfPeerKeepsConnection(self) -> None:
        """
        After QUIT the server closes; a peer that keeps the connection open
        (a TLS close waits for it) is aborted after C{CLOSE_GRACE}.
        """
        conn = connect()
        conn.send(b"QUIT\r\n")
        self.assertTrue(conn.closed)
        self.assertFalse(conn.transport.disconnected)
        conn.clock.advance(CLOSE_GRACE)
        self.assertTrue(conn.transport.disconnected)

    def test_closeResumesReading(self) -> None:
        """
        Closing while reading is paused (QUIT pipelined behind a pending
        commit) resumes the transport, so it can see the peer's EOF or TLS
        close_notify.
        """
        queue = RecordingQueue()
        commit: Deferred[str] = Deferred()
        queue.commitResult = commit
        conn = connect(queue=queue)
        conn.send(PROLOGUE + b"x\r\n.\r\nQUIT\r\n")
        self.assertEqual(conn.transport.producerState, "paused")
        commit.callback("Q1")
        self.assertEqual(conn.codes()[-2:], [b"250", b"221"])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_noAbortAfterClose(self) -> None:
        """
        The abort timer is cancelled when the connection is gone.
        """
        conn = connect()
        conn.send(b"QUIT\r\n")
        conn.proto.connectionLost()
        self.assertEqual(conn.clock.getDelayedCalls(), [])


class ErrorLimitTests(SynchronousTestCase):
    def test_softLimitDelays(self) -> None:
        """
        After the soft limit each error reply waits C{errorDelay}, and so do
        the commands behind it.
        """
        conn = connect(limits=SMTPLimits(softErrorLimit=2, hardErrorLimit=10, errorDelay=1.0))
        conn.send(b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\nFOO\r\n")
        self.assertEqual(conn.codes(), [b"500", b"500"])
        conn.clock.advance(0.5)
        self.assertEqual(len(conn.codes()), 2)
        conn.clock.advance(0.5)
        self.assertEqual(conn.codes(), [b"500", b"500", b"500", b"250"])
        conn.clock.advance(1)
        self.assertEqual(len(conn.codes()), 5)

    def test_hardLimitCloses(self) -> None:
        """
        At the hard limit the server says 421 4.7.0 and hangs up.
        """
        conn = connect(limits=SMTPLimits(softErrorLimit=10, hardErrorLimit=3))
        conn.send(EHLO + b"FOO\r\nFOO\r\nFOO\r\nNOOP\r\n")
        self.assertEqual(
            conn.replies()[1:],
            [
                b"500 5.5.2 Command unrecognized",
                b"500 5.5.2 Command unrecognized",
                b"421 4.7.0 mx.example.org Too many errors, closing connection",
            ],
        )
        self.assertTrue(conn.closed)

    def test_defaults(self) -> None:
        """
        With the defaults, the 20th error closes the connection.
        """
        conn = connect()
        conn.send(b"FOO\r\n" * 25)
        conn.clock.pump([1.0] * 30)
        self.assertEqual(conn.codes(), [b"500"] * 19 + [b"421"])


class LoggingTests(SynchronousTestCase):
    def test_accepted(self) -> None:
        """
        An accepted message is one event with queue ID, sender, recipient
        count and size as plain values.
        """
        conn = connect()
        with capturedLogs() as events:
            conn.send(PROLOGUE + b"hello\r\n.\r\n")
        [event] = [e for e in events if "count" in e]
        self.assertEqual(
            (event["queueID"], event["sender"], event["count"], event["size"], event["peer"]),
            ("Q1", "sender@example.net", 1, 7, "192.0.2.1:40000"),
        )

    def test_refused(self) -> None:
        """
        A refused message is one event with code and enhanced code.
        """
        conn = connect()
        with capturedLogs() as events:
            conn.send(PROLOGUE + b"a\nb\r\n.\r\n")
        [event] = [e for e in events if e.get("stage") == "DATA"]
        self.assertEqual((event["code"], event["enhanced"], event["queueID"]), (550, "5.6.0", "Q1"))
        self.assertEqual(event["log_level"], LogLevel.info)


class FactoryTests(SynchronousTestCase):
    def factory(self, **kw: Any) -> SMTPFactory:
        return SMTPFactory("smtp", HOSTNAME, RecordingQueue(), DictRouter(), Clock(), **kw)  # type: ignore[arg-type]

    def open(self, factory: SMTPFactory, host: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", host, 1000)
        proto = factory.buildProtocol(address)
        assert proto is not None
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def test_builds(self) -> None:
        """
        The factory builds server protocols of its kind.
        """
        proto, transport = self.open(self.factory())
        self.assertIsInstance(proto, SMTPServerProtocol)
        self.assertEqual(proto.session.listener, "smtp")
        self.assertEqual(transport.value(), b"220 mx.example.org ESMTP\r\n")

    def test_kind(self) -> None:
        """
        Unknown kinds are refused.
        """
        self.assertRaises(ValueError, SMTPFactory, "lmtp", HOSTNAME, RecordingQueue(), DictRouter(), Clock())

    def test_perClientLimit(self) -> None:
        """
        Connections over the per-client limit get 421 and are closed; a
        closed connection frees its place.
        """
        factory = self.factory(limits=SMTPLimits(maxConnectionsPerClient=2))
        first, _ = self.open(factory)
        self.open(factory)
        _, transport = self.open(factory)
        self.assertEqual(
            transport.value(),
            b"421 mx.example.org Too many connections from your address, try again later\r\n",
        )
        self.assertTrue(transport.disconnecting)
        _other, transport = self.open(factory, "192.0.2.2")
        self.assertTrue(transport.value().startswith(b"220 "))
        self.assertEqual(factory.connections, 3)
        first.connectionLost(Failure(ConnectionLost()))
        _proto, transport = self.open(factory)
        self.assertTrue(transport.value().startswith(b"220 "))

    def test_totalLimit(self) -> None:
        """
        Connections over the total limit get 421.
        """
        factory = self.factory(limits=SMTPLimits(maxConnections=1))
        self.open(factory)
        _proto, transport = self.open(factory, "192.0.2.9")
        self.assertEqual(transport.value(), b"421 mx.example.org Too many connections, try again later\r\n")

    def test_submissions(self) -> None:
        """
        On submissions the session is TLS from the start and STARTTLS is
        neither offered nor accepted.
        """
        factory = SMTPFactory(
            "submissions",
            HOSTNAME,
            RecordingQueue(),  # type: ignore[arg-type]
            DictRouter(),
            Clock(),
            tlsOptions=object(),
        )
        proto, transport = self.open(factory)
        self.assertTrue(proto.session.tls)
        transport.clear()
        proto.dataReceived(EHLO + b"STARTTLS\r\n")
        self.assertNotIn(b"STARTTLS", transport.value())
        self.assertTrue(transport.value().endswith(b"503 5.5.1 TLS already active\r\n"))


class ExtensionSeamTests(SynchronousTestCase):
    def test_newCommandAndParameter(self) -> None:
        """
        A subclass can add a command (taking it out of the 502 set), an EHLO
        keyword and a MAIL parameter, as AUTH and ETRN will.
        """

        class WithETRN(SMTPServerProtocol):
            mailParameters = frozenset({"AUTH"})

            def smtp_ETRN(self, argument: str) -> None:
                self.replies.respond(SMTPReply(250, "2.0.0", f"Queuing for {argument} started"))

            def extensions(self) -> list[str]:
                return [*super().extensions(), "ETRN"]

        WithETRN.commands = {**SMTPServerProtocol.commands, "ETRN": WithETRN.smtp_ETRN}  # type: ignore[dict-item]
        proto = WithETRN(SessionSettings("smtp", HOSTNAME, RecordingQueue(), DictRouter(), Clock()))  # type: ignore[arg-type]
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(EHLO + b"ETRN example.org\r\nMAIL FROM:<a@example.net> AUTH=<>\r\n")
        lines = transport.value().split(b"\r\n")
        self.assertIn(b"250 ETRN", lines)
        self.assertIn(b"250 2.0.0 Queuing for example.org started", lines)
        self.assertEqual(lines[-2], b"250 2.1.0 Ok")
        self.assertIs(SMTPServerProtocol.commands["ETRN"], SMTPServerProtocol.smtp_ETRN)


class LimitsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        The defaults are the documented ones.
        """
        limits = SMTPLimits()
        self.assertEqual(
            (limits.maxLineLength, limits.maxCommandLine, limits.maxTextLine, limits.maxMessageSize),
            (512, 2048, 1000, 35 * 1024 * 1024),
        )
        self.assertEqual((limits.maxRecipients, limits.idleTimeout), (1000, 300.0))

    def test_fromSection(self) -> None:
        """
        The C{[smtp]} section's snake_case keys set the limits.
        """
        section = Section("[smtp]", {"max_message_size": 1000, "idle_timeout": 30, "max_recipients": 5})
        limits = SMTPLimits.fromSection(section)
        self.assertEqual((limits.maxMessageSize, limits.idleTimeout, limits.maxRecipients), (1000, 30.0, 5))

    def test_fromSectionErrors(self) -> None:
        """
        Unknown keys, wrong types and values below the RFC minimums are
        configuration errors naming the section.
        """
        for options in (
            {"max_mesage_size": 1},
            {"max_message_size": "big"},
            {"max_line_length": 100},
            {"max_text_line": 80},
            {"error_delay": -1},
        ):
            error = self.assertRaises(ConfigError, SMTPLimits.fromSection, Section("[smtp]", options))
            self.assertIn("[smtp]", str(error))
