"""
ODMR (RFC 2645) on the C{odmr} listener: every ATRN reply, the commands
the listener refuses, and the reversed session against a scripted customer
(pipelining, 5xx and 4xx recipients, a customer that hangs up), with a
real L{MemoryQueue} and the scheduler's record path behind it.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, TypeVar

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.address import Address
from mailfw.auth import MailRealm
from mailfw.config import ConfigError, loadConfig
from mailfw.envelope import RecipientOutcome
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import Disposition, RecipientState
from mailfw.reply import SMTPReply
from mailfw.scheduling._retry import RetrySchedule
from mailfw.scheduling._scheduler import Scheduler
from mailfw.smtp import SMTPFactory
from mailfw.smtp._auth import AuthThrottle, SMTPAuth
from mailfw.smtp._odmr import ODMRHandler, ODMRServerProtocol, parseATRNArgument, settingsFromConfig
from mailfw.tap import Options, buildService
from tests._smtpdoubles import HOSTNAME, DictRouter

_T = TypeVar("_T")

PASSWORD = "correct horse"
ODMR = {"domains": ["customer.test", "other.test", "elsewhere.test"]}


def fired(d: Deferred[_T]) -> _T:
    results: list[object] = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


def smtpFactories(reactor: MemoryReactorClock) -> dict[int, SMTPFactory]:
    """
    The listening factories of C{reactor} by port; all are SMTP.
    """
    factories: dict[int, SMTPFactory] = {}
    for port, factory, _, _ in reactor.tcpServers:
        assert isinstance(factory, SMTPFactory)
        factories[port] = factory
    return factories


@implementer(ISSLTransport)
class SecureTransport(StringTransport):
    """
    A transport that says it is encrypted (as after STARTTLS).
    """

    def abortConnection(self) -> None:
        self.loseConnection()

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getPeerCertificate(self) -> None:
        return None


class Customer:
    """
    A scripted ODMR customer acting as the SMTP server once the roles
    reverse: it answers what the client writes, per recipient as told.

    @ivar received: C{(sender, recipients, data)} of each message it took.
    """

    def __init__(
        self, session: Session, rcpt: dict[str, bytes] | None = None, hangUpAfter: int | None = None
    ):
        self.session = session
        self.rcpt = rcpt or {}
        self.hangUpAfter = hangUpAfter
        self.received: list[tuple[bytes, list[bytes], bytes]] = []
        self.commands: list[bytes] = []
        self._seen = 0
        self._data: bytes | None = None
        self._mail = b""
        self._rcpts: list[bytes] = []
        self.quit = False
        self.hungUp = False

    def start(self) -> None:
        self.session.transport.clear()
        self._seen = 0
        self.answer(b"220 customer.test ODMR client ready\r\n")

    def answer(self, data: bytes) -> None:
        self.session.proto.dataReceived(data)
        self.pump()

    def pump(self) -> None:
        while not self.hungUp:
            written = self.session.transport.value()[self._seen :]
            if b"\r\n" not in written:
                return
            if self._data is not None:
                end = written.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self._seen += end + 5
                self.received.append((self._mail, self._rcpts, written[:end]))
                self._data = None
                if self.hangUpAfter is not None and len(self.received) >= self.hangUpAfter:
                    # The message is taken (250), then the line drops.
                    self.hungUp = True
                    self.session.proto.dataReceived(b"250 2.0.0 accepted\r\n")
                    self.session.proto.connectionLost(Failure(Exception("customer hung up")))
                    return
                self.answer(b"250 2.0.0 accepted\r\n")
                continue
            line, _, _ = written.partition(b"\r\n")
            self._seen += len(line) + 2
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.answer(b"250-customer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self._mail, self._rcpts = line, []
                self.answer(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                address = line[line.index(b"<") + 1 : line.index(b">")].decode()
                reply = self.rcpt.get(address, b"250 2.1.5 ok")
                if reply.startswith(b"2"):
                    self._rcpts.append(address.encode())
                self.answer(reply + b"\r\n")
            elif verb == b"DATA":
                if self._rcpts:
                    self._data = b""
                    self.answer(b"354 go on\r\n")
                else:
                    self.answer(b"554 5.5.1 no valid recipients\r\n")
            elif verb == b"RSET":
                self.answer(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                self.quit = True
                self.hungUp = True
                self.session.proto.dataReceived(b"221 2.0.0 bye\r\n")
                self.session.proto.connectionLost(Failure(Exception("closed")))
                return
            else:
                self.answer(b"500 5.5.2 what\r\n")


class Session:
    """
    One C{odmr} session on an encrypted L{StringTransport}, with a memory
    queue and a scheduler (never started: only its record path is used).
    """

    def __init__(
        self, queue: MemoryQueue | None = None, clock: Clock | None = None, batch: int = 1000
    ) -> None:
        self.clock = clock or Clock()
        self.clock.advance(1000)
        self.queue = queue or MemoryQueue(self.clock)
        settings = settingsFromConfig({**ODMR, "batch": batch})
        self.scheduler = Scheduler(
            self.clock,
            self.queue,
            DictRouter(),
            {},
            HOSTNAME,
            schedule=RetrySchedule(jitter=0),
            holdForETRN=settings.holds,
        )
        self.handler = ODMRHandler(settings, self.queue, self.scheduler.settle, self.clock, HOSTNAME, 3000.0)
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"customer", PASSWORD.encode())
        checker.addUser(b"nobody", PASSWORD.encode())
        checker.addUser(b"relay", PASSWORD.encode())
        realm = MailRealm(etrn={"customer": ("customer.test", "other.test"), "relay": ("*",)})
        auth = SMTPAuth(Portal(realm, [checker]), AuthThrottle(self.clock, failureDelay=0.0))
        factory = SMTPFactory(
            "odmr",
            HOSTNAME,
            self.queue,
            DictRouter(),
            self.clock,
            auth=auth,
            odmr=self.handler,
        )
        address = IPv4Address("TCP", "192.0.2.9", 40000)
        proto = factory.buildProtocol(address)
        assert isinstance(proto, ODMRServerProtocol)
        self.proto = proto
        self.transport = SecureTransport(peerAddress=address)
        proto.makeConnection(self.transport)
        self.transport.clear()

    def replies(self) -> list[bytes]:
        return [line for line in self.transport.value().split(b"\r\n")[:-1] if line[3:4] != b"-"]

    def ask(self, *commands: bytes) -> list[bytes]:
        before = len(self.replies())
        self.proto.dataReceived(b"".join(c + b"\r\n" for c in commands))
        return self.replies()[before:]

    def login(self, user: str = "customer") -> None:
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
        replies = self.ask(b"EHLO customer.test", b"AUTH PLAIN " + token)
        assert replies[1].startswith(b"235 "), replies

    def enqueue(self, *addresses: str, held: bool = True) -> str:
        """
        Queue a message, and hold its recipients as the scheduler does for
        an ODMR domain.
        """
        incoming = self.queue.receive(makeEnvelope(*addresses))
        incoming.write(b"Subject: for you\r\n\r\nbody of " + ",".join(addresses).encode() + b"\r\n")
        queueID = fired(incoming.commit())
        if held:
            [lease] = fired(self.queue.claim(self.clock.seconds(), 100))
            fired(
                self.queue.record(
                    lease,
                    [
                        Disposition(
                            r.index,
                            RecipientOutcome(r.recipient, SMTPReply(450, "4.4.0", "held")),
                            self.clock.seconds() + 3600,
                            hold=True,
                            counted=False,
                        )
                        for r in lease.recipients
                    ],
                )
            )
        return queueID

    def waiting(self) -> list[tuple[str, RecipientState]]:
        return sorted(
            (str(r.recipient.address), r.state)
            for q in self.queue.queueIDs()
            for r in self.queue.recipients(q)
        )


class ATRNReplyTests(SynchronousTestCase):
    """
    Every reply ATRN can get before the roles reverse.
    """

    def test_advertised(self) -> None:
        """
        EHLO on an encrypted odmr session offers AUTH and ATRN, and nothing
        that submits mail.
        """
        session = Session()
        session.proto.dataReceived(b"EHLO customer.test\r\n")
        text = session.transport.value()
        self.assertIn(b"250-AUTH PLAIN", text)
        self.assertIn(b"250 ATRN\r\n", text)
        self.assertNotIn(b"SIZE", text)
        self.assertNotIn(b"ETRN", text)

    def test_needAuth(self) -> None:
        """
        ATRN before AUTH: 530 5.7.0, whatever waits.
        """
        session = Session()
        session.enqueue("a@customer.test")
        self.assertEqual(
            session.ask(b"EHLO customer.test", b"ATRN customer.test")[1],
            b"530 5.7.0 Authentication required",
        )

    def test_needEHLO(self) -> None:
        """
        ATRN before EHLO: 503.
        """
        self.assertEqual(Session().ask(b"ATRN customer.test")[0][:4], b"503 ")

    def test_refused(self) -> None:
        """
        A domain the user may not collect: 450 4.7.1, and nothing is leased;
        a list with one such domain is refused as a whole.
        """
        session = Session()
        session.enqueue("a@customer.test", "b@elsewhere.test")
        session.login()
        self.assertEqual(
            session.ask(b"ATRN elsewhere.test")[0], b"450 4.7.1 ATRN request refused for elsewhere.test"
        )
        self.assertEqual(session.ask(b"ATRN customer.test,elsewhere.test")[0][:4], b"450 ")
        self.assertEqual(session.ask(b"ATRN unconfigured.test")[0][:4], b"450 ")
        self.assertNotIn(RecipientState.LEASED, [state for _, state in session.waiting()])

    def test_otherUser(self) -> None:
        """
        A user without ETRN domains gets 450 for the customer's domain.
        """
        session = Session()
        session.enqueue("a@customer.test")
        session.login("nobody")
        self.assertEqual(session.ask(b"ATRN customer.test")[0][:4], b"450 ")

    def test_wildcardIsNotACollectRight(self) -> None:
        """
        A user whose ETRN right is C{*} (it may ask for delivery of any
        domain to that domain's servers) may not collect a customer's mail:
        450, and the customer's mail stays where it is.
        """
        session = Session()
        session.enqueue("a@customer.test")
        session.login("relay")
        self.assertEqual(session.ask(b"ATRN customer.test")[0][:4], b"450 ")
        self.assertNotIn(RecipientState.LEASED, [state for _, state in session.waiting()])

    def test_pipelinedBehindATRN(self) -> None:
        """
        A line the customer pipelines right behind ATRN (its 220 greeting),
        held while the mail is leased, goes to the reversed session, not to
        the command parser: the provider's EHLO follows.
        """
        session = Session()
        session.enqueue("a@customer.test")
        session.login()
        claim = session.handler.claim
        gate: Deferred[None] = Deferred()

        async def slowClaim(domains: Any) -> Any:
            await gate
            return await claim(domains)

        session.handler.claim = slowClaim  # type: ignore[method-assign]
        session.transport.clear()
        session.proto.dataReceived(b"ATRN customer.test\r\n220 customer.test ready\r\n")
        self.assertEqual(session.transport.value(), b"")
        gate.callback(None)
        written = session.transport.value()
        self.assertIn(b"250 ", written)
        self.assertNotIn(b"500 ", written)
        self.assertIn(b"EHLO ", written)

    def test_noMail(self) -> None:
        """
        Nothing waiting: 453, and the session goes on.
        """
        session = Session()
        session.enqueue("b@elsewhere.test")
        session.login()
        self.assertEqual(session.ask(b"ATRN customer.test")[0], b"453 4.2.4 You have no mail")
        self.assertEqual(session.ask(b"NOOP")[0][:4], b"250 ")

    def test_syntax(self) -> None:
        """
        A missing or malformed domain list: 501.
        """
        session = Session()
        session.login()
        for argument in (b"", b" ", b"customer.test,,other.test", b"[192.0.2.1]", b"a b"):
            self.assertEqual(session.ask(b"ATRN " + argument)[0][:4], b"501 ", argument)

    def test_queueFails(self) -> None:
        """
        A queue that cannot lease: 451 4.3.0, try later.
        """
        session = Session()
        session.queue.claimMatching = lambda *a: fail(OSError("disk gone"))  # type: ignore[method-assign]
        session.login()
        self.assertEqual(session.ask(b"ATRN customer.test")[0][:8], b"451 4.3.")
        self.flushLoggedErrors(OSError)

    def test_mailRefused(self) -> None:
        """
        MAIL, RCPT, DATA, ETRN on the odmr listener: 502; TURN stays 502.
        """
        session = Session()
        session.login()
        for command in (
            b"MAIL FROM:<a@customer.test>",
            b"RCPT TO:<b@x.test>",
            b"DATA",
            b"ETRN x.test",
            b"TURN",
        ):
            self.assertEqual(session.ask(command)[0][:4], b"502 ", command)

    def test_parse(self) -> None:
        """
        Domains are normalised and deduplicated; too many is a syntax error.
        """
        self.assertEqual(
            parseATRNArgument("Customer.TEST.,other.test,customer.test"), ("customer.test", "other.test")
        )
        self.assertIsNone(parseATRNArgument(",".join(f"d{n}.test" for n in range(33))))

    def test_config(self) -> None:
        """
        C{[odmr]} checks its keys.
        """
        self.assertEqual(settingsFromConfig({"domains": ["Customer.Test"]}).domains, ("customer.test",))
        self.assertRaises(ConfigError, settingsFromConfig, {"domains": ["@customer.test"]})
        self.assertRaises(ConfigError, settingsFromConfig, {"batch": 0})
        self.assertRaises(ConfigError, settingsFromConfig, {"domain": []})


class ReversalTests(SynchronousTestCase):
    """
    After C{250} the connection carries mailfw's SMTP client to the
    customer.
    """

    def reverse(self, session: Session, customer: Customer, command: bytes = b"ATRN customer.test") -> None:
        session.login()
        self.assertEqual(session.ask(command)[0], b"250 2.0.0 OK now reversing the connection")
        customer.start()

    def test_delivered(self) -> None:
        """
        Every waiting message of the domains is delivered once, with
        PIPELINING, then QUIT; other domains' mail stays.
        """
        session = Session()
        session.enqueue("a@customer.test", "b@customer.test", "c@elsewhere.test")
        session.enqueue("d@other.test")
        session.enqueue("e@customer.test", held=False)
        customer = Customer(session)
        self.reverse(session, customer, b"ATRN customer.test,other.test")
        self.assertTrue(customer.quit)
        got = sorted(r.decode() for _, rcpts, _ in customer.received for r in rcpts)
        self.assertEqual(got, ["a@customer.test", "b@customer.test", "d@other.test", "e@customer.test"])
        self.assertEqual(session.waiting(), [("c@elsewhere.test", RecipientState.ETRN)])
        self.assertEqual(customer.commands[0], b"EHLO " + HOSTNAME.encode())
        self.assertEqual(customer.commands[-1], b"QUIT")
        bodies = [data for _, _, data in customer.received]
        self.assertIn(b"body of a@customer.test,b@customer.test,c@elsewhere.test", b"".join(bodies))

    def test_pipelined(self) -> None:
        """
        With PIPELINING the client sends MAIL, every RCPT and DATA at once.
        """
        session = Session()
        session.enqueue("a@customer.test", "b@customer.test")
        session.login()
        session.ask(b"ATRN customer.test")
        session.transport.clear()
        session.proto.dataReceived(b"220 customer.test ready\r\n")
        self.assertEqual(session.transport.value(), b"EHLO " + HOSTNAME.encode() + b"\r\n")
        session.transport.clear()
        session.proto.dataReceived(b"250-customer.test\r\n250 PIPELINING\r\n")
        self.assertEqual(
            session.transport.value(),
            b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<a@customer.test>\r\nRCPT TO:<b@customer.test>\r\nDATA\r\n",
        )

    def test_permanentBounces(self) -> None:
        """
        A recipient the customer refuses with 5xx fails: it leaves the queue
        and its sender gets a bounce; the others are delivered.
        """
        session = Session()
        session.enqueue("a@customer.test", "gone@customer.test")
        customer = Customer(session, rcpt={"gone@customer.test": b"550 5.1.1 no such user"})
        self.reverse(session, customer)
        self.assertEqual([rcpts for _, rcpts, _ in customer.received], [[b"a@customer.test"]])
        [bounce] = session.queue.queueIDs()
        self.assertEqual(str(session.queue.envelope(bounce).recipients[0].address), "sender@example.org")
        self.assertIn(b"gone@customer.test", session.queue.body(bounce))

    def test_transientStaysHeld(self) -> None:
        """
        A recipient refused with 4xx waits again, held for ATRN, with the
        customer's reply.
        """
        session = Session()
        queueID = session.enqueue("a@customer.test", "full@customer.test")
        customer = Customer(session, rcpt={"full@customer.test": b"452 4.2.2 mailbox full"})
        self.reverse(session, customer)
        [r] = session.queue.recipients(queueID)
        self.assertEqual((str(r.recipient.address), r.state), ("full@customer.test", RecipientState.ETRN))
        self.assertEqual(r.lastReply, SMTPReply(452, "4.2.2", "mailbox full"))

    def test_hangUpMidway(self) -> None:
        """
        A customer that hangs up after taking the first message: the first
        is delivered (gone from the queue); the next is held again, not
        lost; a second ATRN delivers only it.
        """
        session = Session()
        session.enqueue("a@customer.test")
        second = session.enqueue("b@customer.test")
        customer = Customer(session, hangUpAfter=1)
        self.reverse(session, customer)
        self.assertEqual(len(customer.received), 1)
        self.assertEqual(session.queue.queueIDs(), [second])
        [r] = session.queue.recipients(second)
        # Its MAIL had gone out when the line dropped: one attempt, held again.
        self.assertEqual(r.state, RecipientState.ETRN)

        again = Session(queue=session.queue, clock=session.clock)
        customer = Customer(again)
        self.reverse(again, customer)
        self.assertEqual([rcpts for _, rcpts, _ in customer.received], [[b"b@customer.test"]])
        self.assertEqual(session.queue.queueIDs(), [])

    def test_leasedNotTwice(self) -> None:
        """
        While one session delivers, a second ATRN for the same domain finds
        nothing (the recipients are leased), and the scheduler cannot claim
        them either.
        """
        session = Session()
        session.enqueue("a@customer.test")
        session.login()
        session.ask(b"ATRN customer.test")
        other = Session(queue=session.queue, clock=session.clock)
        other.login()
        self.assertEqual(other.ask(b"ATRN customer.test")[0][:4], b"453 ")
        self.assertEqual(fired(session.queue.claim(session.clock.seconds() + 3600, 100)), [])

    def test_batch(self) -> None:
        """
        At most C{batch} recipients per ATRN; the rest waits for the next.
        """
        session = Session(batch=1)
        session.enqueue("a@customer.test")
        session.enqueue("b@customer.test")
        customer = Customer(session)
        self.reverse(session, customer)
        self.assertEqual(len(customer.received), 1)
        self.assertEqual(len(session.queue.queueIDs()), 1)

    def test_greetingRefused(self) -> None:
        """
        A customer that greets with 554: nothing attempted, nothing lost.
        """
        session = Session()
        queueID = session.enqueue("a@customer.test")
        session.login()
        session.ask(b"ATRN customer.test")
        session.transport.clear()
        session.proto.dataReceived(b"554 go away\r\n")
        self.assertIn(b"QUIT", session.transport.value())
        session.proto.connectionLost(Failure(Exception("closed")))
        [r] = session.queue.recipients(queueID)
        self.assertEqual((r.state, r.attempts), (RecipientState.READY, 0))

    def test_deadline(self) -> None:
        """
        A reversed session that outlasts the deadline is cut and its
        messages return to the queue.
        """
        session = Session()
        queueID = session.enqueue("a@customer.test")
        session.login()
        session.ask(b"ATRN customer.test")
        session.clock.advance(3000)
        self.assertTrue(session.transport.disconnecting)
        session.proto.connectionLost(Failure(Exception("aborted")))
        [r] = session.queue.recipients(queueID)
        self.assertNotEqual(r.state, RecipientState.LEASED)


class WiringTests(SynchronousTestCase):
    """
    C{[listen] odmr} and C{[odmr]} reach the listener and the scheduler
    through L{buildService}, and C{--odmr} through the command line.
    """

    CONFIG = """
[listen]
smtp = ["tcp:2525"]
odmr = ["tcp:2366"]
[queue]
plugin = "memory"
[routing]
plugin = "static"
local_domains = ["example.org"]
[delivery.local]
plugin = "discard"
{odmr}
"""

    def build(self, odmr: str) -> tuple[MemoryReactorClock, Any]:
        path = Path(self.mktemp())
        path.mkdir()
        (path / "mailfw.toml").write_text(self.CONFIG.format(odmr=odmr))
        config = loadConfig(str(path / "mailfw.toml"), hostname="mx.test", dataDir=str(path / "data"))
        reactor = MemoryReactorClock()
        service = buildService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return reactor, service

    def test_configured(self) -> None:
        """
        The odmr listener builds ODMR sessions with the handler, and the
        scheduler holds the ODMR domains.
        """
        reactor, service = self.build('[odmr]\ndomains = ["customer.test"]\n')
        factories = smtpFactories(reactor)
        self.assertIsNone(factories[2525].odmr)
        handler = factories[2366].odmr
        assert handler is not None
        self.assertEqual(handler.settings.domains, ("customer.test",))
        scheduler = service.getServiceNamed("scheduler")
        self.assertEqual(handler.settle, scheduler.settle)
        self.assertIsInstance(
            factories[2366].buildProtocol(IPv4Address("TCP", "192.0.2.9", 1)), ODMRServerProtocol
        )
        self.assertTrue(scheduler._holdForETRN(Address.parse("a@customer.test")))
        self.assertFalse(scheduler._holdForETRN(Address.parse("a@example.org")))

    def test_absent(self) -> None:
        """
        Without C{[odmr]} the listener has no handler (ATRN gets 502) and
        nothing is held.
        """
        reactor, service = self.build("")
        factories = smtpFactories(reactor)
        self.assertIsNone(factories[2366].odmr)
        self.assertFalse(service.getServiceNamed("scheduler")._holdForETRN(Address.parse("a@customer.test")))

    def test_commandLine(self) -> None:
        """
        C{--odmr} adds an odmr listener.
        """
        options = Options()
        options.parseOptions(["--odmr", "tcp:2366"])
        self.assertEqual(options.serverConfig.listen["odmr"], ["tcp:2366"])


class BodyFailureTests(SynchronousTestCase):
    """
    A body the queue cannot open is not lost: its lease is given back and
    the next message is delivered.
    """

    def test_unreadable(self) -> None:
        session = Session()
        first = session.enqueue("a@customer.test")
        session.enqueue("b@customer.test")
        openBody = session.queue.openBody

        def failing(queueID: str) -> Deferred[Any]:
            return fail(OSError("disk gone")) if queueID == first else openBody(queueID)

        session.queue.openBody = failing  # type: ignore[method-assign]
        customer = Customer(session)
        session.login()
        session.ask(b"ATRN customer.test")
        customer.start()
        self.assertEqual([rcpts for _, rcpts, _ in customer.received], [[b"b@customer.test"]])
        self.assertEqual(session.queue.queueIDs(), [first])
        [r] = session.queue.recipients(first)
        self.assertEqual((r.state, r.attempts), (RecipientState.READY, 0))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
