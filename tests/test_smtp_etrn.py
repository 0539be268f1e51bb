"""
ETRN (RFC 1985) in the SMTP server protocol: advertising, every reply code
and argument form, sequence errors, rights by network and by AUTH, the rate
limit, TURN refused, and the wiring from C{[etrn]} through C{twistd
mailfw}'s service tree.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TypeVar

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.auth import MailRealm
from mailfw.config import ConfigError, loadConfig
from mailfw.envelope import RecipientOutcome
from mailfw.etrn import ETRNHandler, settingsFromConfig
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import Disposition, RecipientState, Selector
from mailfw.reply import SMTPReply
from mailfw.smtp import SMTPFactory, SMTPServerProtocol
from mailfw.smtp._auth import AuthThrottle, SMTPAuth
from mailfw.tap import buildService
from tests._smtpdoubles import HOSTNAME, DictRouter

EHLO = b"EHLO customer-mx.example\r\n"
ALLOWED = "192.0.2.1"
OUTSIDE = "198.51.100.7"
PASSWORD = "correct horse"

_T = TypeVar("_T")

SETTINGS = {
    "domains": ["customer.example", ".customer.example", "#uucp"],
    "clients": ["192.0.2.0/24", "2001:db8::/32"],
    "rate": 20,
}


def fired(d: Deferred[_T]) -> _T:
    """
    The result of a L{Deferred} that has already fired (the memory queue's
    all have).
    """
    results: list[object] = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


class Session:
    """
    One server protocol on a L{StringTransport}, with a real
    L{MemoryQueue} behind its ETRN handler.
    """

    def __init__(
        self,
        kind: str = "smtp",
        peer: str = ALLOWED,
        settings: dict[str, object] | None = None,
        queue: MemoryQueue | None = None,
        clock: Clock | None = None,
        auth: SMTPAuth | None = None,
        etrn: bool = True,
        handler: ETRNHandler | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.queue = queue or MemoryQueue(self.clock)
        self.handler = handler or ETRNHandler(
            settingsFromConfig(SETTINGS if settings is None else settings), self.queue, self.clock
        )
        factory = SMTPFactory(
            kind,
            HOSTNAME,
            self.queue,
            DictRouter(),
            self.clock,
            auth=auth,
            etrn=self.handler if etrn else None,
        )
        address = IPv6Address("TCP", peer, 40000) if ":" in peer else IPv4Address("TCP", peer, 40000)
        proto = factory.buildProtocol(address)
        assert isinstance(proto, SMTPServerProtocol)
        self.proto = proto
        self.transport = StringTransport(peerAddress=address)
        proto.makeConnection(self.transport)
        self.transport.clear()

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lines(self) -> list[bytes]:
        value: bytes = self.transport.value()
        return value.split(b"\r\n")[:-1]

    def replies(self) -> list[bytes]:
        """
        The last line of each reply, in order.
        """
        return [line for line in self.lines() if line[3:4] != b"-"]

    def ask(self, *commands: bytes) -> list[bytes]:
        """
        Send C{commands} and return the replies they got.
        """
        before = len(self.replies())
        self.send(b"".join(c + b"\r\n" for c in commands))
        return self.replies()[before:]

    def hold(self, *addresses: str) -> None:
        """
        Queue one message for C{addresses} and hold it for ETRN, as the
        scheduler does for a hold domain.
        """
        incoming = self.queue.receive(makeEnvelope(*addresses))
        incoming.write(b"Subject: held\r\n\r\nx\r\n")
        fired(incoming.commit())
        [lease] = fired(self.queue.claim(self.clock.seconds(), 100))
        fired(
            self.queue.record(
                lease,
                [
                    Disposition(
                        r.index,
                        RecipientOutcome(r.recipient, SMTPReply(450, "4.4.0", "held")),
                        self.clock.seconds() + 3600,
                        route="uucp" if r.recipient.address.domain == "uucp.example" else None,
                        hold=True,
                        counted=False,
                    )
                    for r in lease.recipients
                ],
            )
        )

    def waiting(self) -> list[str]:
        """
        The recipients still held for ETRN.
        """
        messages = fired(self.queue.list(Selector(state=RecipientState.ETRN)))
        return sorted(str(r.recipient.address) for m in messages for r in m.recipients)


class AdvertisingTests(SynchronousTestCase):
    """
    Where ETRN is offered.
    """

    def ehlo(self, session: Session) -> list[bytes]:
        session.send(EHLO)
        return [line[4:] for line in session.lines()]

    def test_smtpListener(self) -> None:
        """
        The smtp listener lists ETRN in its EHLO reply when ETRN is
        configured, and not otherwise.
        """
        self.assertIn(b"ETRN", self.ehlo(Session()))
        self.assertNotIn(b"ETRN", self.ehlo(Session(etrn=False)))

    def test_submission(self) -> None:
        """
        Submission listeners offer ETRN only with C{submission = true}.
        """
        self.assertNotIn(b"ETRN", self.ehlo(Session("submission")))
        self.assertIn(b"ETRN", self.ehlo(Session("submission", settings={**SETTINGS, "submission": True})))

    def test_notOffered(self) -> None:
        """
        Where ETRN is not offered, it gets 502 5.5.1 like TURN.
        """
        session = Session(etrn=False)
        session.hold("a@customer.example")
        self.assertEqual(
            session.ask(b"EHLO x.example", b"ETRN customer.example"),
            [b"250 LIMITS RCPTMAX=1000 MAILMAX=1000", b"502 5.5.1 Command not implemented"],
        )
        self.assertEqual(session.waiting(), ["a@customer.example"])


class ReplyTests(SynchronousTestCase):
    """
    Every RFC 1985 reply, for every argument form.
    """

    def test_253(self) -> None:
        """
        C{ETRN domain} releases that domain's held mail and answers 253 with
        the number of recipients; the queue has recorded the flush by then.
        """
        session = Session()
        session.hold("a@customer.example", "b@customer.example", "c@mx.customer.example")
        [_, reply] = session.ask(EHLO.strip(), b"ETRN customer.example")
        self.assertEqual(reply, b"253 2.0.0 OK, 2 pending recipients for node customer.example started")
        self.assertEqual(session.waiting(), ["c@mx.customer.example"])

    def test_253Subdomains(self) -> None:
        """
        C{ETRN @domain} releases the domain and its subdomains.
        """
        session = Session()
        session.hold("a@customer.example", "c@mx.customer.example")
        self.assertEqual(
            session.ask(EHLO.strip(), b"ETRN @customer.example")[1],
            b"253 2.0.0 OK, 2 pending recipients for node @customer.example started",
        )
        self.assertEqual(session.waiting(), [])

    def test_253Queue(self) -> None:
        """
        C{ETRN #name} releases the recipients whose route has that name.
        """
        session = Session()
        session.hold("a@uucp.example", "b@customer.example")
        self.assertEqual(
            session.ask(EHLO.strip(), b"ETRN #uucp")[1],
            b"253 2.0.0 OK, 1 pending recipients for node #uucp started",
        )
        self.assertEqual(session.waiting(), ["b@customer.example"])

    def test_251(self) -> None:
        """
        Nothing queued for the node: 251.
        """
        self.assertEqual(
            Session().ask(EHLO.strip(), b"ETRN mx.customer.example")[1],
            b"251 2.0.0 OK, no messages waiting for node mx.customer.example",
        )

    def test_250(self) -> None:
        """
        A queue that does not count what it flushed: 250, queuing started.
        """
        session = Session()
        # Off the IQueueAdmin contract (Deferred[int]) on purpose: a plugin
        # that answers None, which mailfw.etrn.flushReply tolerates.
        session.queue.flush = lambda selector: succeed(None)  # type: ignore[method-assign, arg-type]
        self.assertEqual(
            session.ask(EHLO.strip(), b"ETRN customer.example")[1],
            b"250 2.0.0 OK, queuing for node customer.example started",
        )

    def test_458(self) -> None:
        """
        A queue that cannot record the flush: 458 4.0.0, and the failure is
        logged.
        """
        session = Session()
        session.queue.flush = lambda selector: fail(OSError("disk gone"))  # type: ignore[method-assign]
        self.assertEqual(
            session.ask(EHLO.strip(), b"ETRN customer.example")[1],
            b"458 4.0.0 Unable to queue messages for node customer.example",
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_459(self) -> None:
        """
        A node that is not an ETRN node, or a client outside the networks,
        gets 459 4.7.1 whether mail waits or not, and nothing moves.
        """
        session = Session(peer=OUTSIDE)
        session.hold("a@customer.example")
        replies = session.ask(
            EHLO.strip(),
            b"ETRN customer.example",
            b"ETRN @customer.example",
            b"ETRN mx.customer.example",
            b"ETRN #uucp",
        )
        self.assertEqual([r[:10] for r in replies[1:]], [b"459 4.7.1 "] * 4)
        self.assertEqual(
            replies[3], b"459 4.7.1 Node mx.customer.example not allowed: not authorised for this client"
        )
        self.assertEqual(session.waiting(), ["a@customer.example"])
        inside = Session(queue=session.queue, clock=session.clock)
        self.assertEqual(inside.ask(EHLO.strip(), b"ETRN other.example")[1][:4], b"459 ")
        self.assertEqual(session.waiting(), ["a@customer.example"])

    def test_501(self) -> None:
        """
        A missing or malformed argument: 501 5.5.4.
        """
        replies = Session().ask(
            EHLO.strip(), b"ETRN", b"ETRN two words", b"ETRN bad..example", b"ETRN @", b"ETRN #"
        )
        self.assertEqual(replies[1:], [b"501 5.5.4 Syntax: ETRN [@|#]node"] * 5)

    def test_503BeforeHelo(self) -> None:
        """
        ETRN before HELO/EHLO: 503 5.5.1 (without an enhanced code, since
        no EHLO has said the client understands them).
        """
        session = Session()
        session.hold("a@customer.example")
        self.assertEqual(session.ask(b"ETRN customer.example"), [b"503 Send HELO or EHLO first"])
        self.assertEqual(session.waiting(), ["a@customer.example"])

    def test_503InTransaction(self) -> None:
        """
        ETRN inside a mail transaction: 503 5.5.1; after RSET it works.
        """
        session = Session()
        replies = session.ask(
            EHLO.strip(),
            b"MAIL FROM:<a@example.net>",
            b"ETRN customer.example",
            b"RSET",
            b"ETRN customer.example",
        )
        self.assertEqual(
            replies[2:],
            [
                b"503 5.5.1 ETRN not allowed during a mail transaction",
                b"250 2.0.0 Ok",
                b"251 2.0.0 OK, no messages waiting for node customer.example",
            ],
        )

    def test_heloWithoutEnhancedCodes(self) -> None:
        """
        After HELO the reply carries no enhanced status code (RFC 2034).
        """
        self.assertEqual(
            Session().ask(b"HELO customer-mx.example", b"ETRN customer.example")[1],
            b"251 OK, no messages waiting for node customer.example",
        )

    def test_turnRefused(self) -> None:
        """
        TURN (and ATRN, not offered) get 502 5.5.1, also where ETRN is
        offered, and turn nothing around.
        """
        session = Session()
        self.assertEqual(
            session.ask(EHLO.strip(), b"TURN", b"ATRN customer.example")[1:],
            [b"502 5.5.1 Command not implemented"] * 2,
        )
        self.assertFalse(session.transport.disconnecting)

    def test_ipv6Client(self) -> None:
        """
        Client networks apply to IPv6 clients too.
        """
        session = Session(peer="2001:db8::25")
        session.hold("a@customer.example")
        self.assertEqual(session.ask(EHLO.strip(), b"ETRN customer.example")[1][:4], b"253 ")


class SlowFlushQueue(MemoryQueue):
    """
    A memory queue whose flushes answer when the test says.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.pending: list[Deferred[int]] = []

    def flush(self, selector: Selector) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.pending.append(d)
        return d


class OrderTests(SynchronousTestCase):
    """
    The reply waits for the flush to be recorded, and keeps its place.
    """

    def test_replyAfterRecord(self) -> None:
        """
        Until the queue has recorded the flush, neither the ETRN reply nor
        the reply of a command pipelined behind it is sent.
        """
        clock = Clock()
        session = Session(queue=SlowFlushQueue(clock), clock=clock)
        session.send(EHLO + b"ETRN customer.example\r\nNOOP\r\n")
        self.assertEqual(session.replies(), [b"250 ETRN"])
        queue = session.queue
        assert isinstance(queue, SlowFlushQueue)
        queue.pending[0].callback(4)
        self.assertEqual(
            session.replies()[1:],
            [b"253 2.0.0 OK, 4 pending recipients for node customer.example started", b"250 2.0.0 Ok"],
        )


class RateTests(SynchronousTestCase):
    """
    ETRN is rate-limited per client address across sessions.
    """

    def test_rate(self) -> None:
        """
        Past C{rate} commands a minute a client gets 458 4.7.0 (also in a
        new session); a minute later it is served again.
        """
        first = Session(settings={**SETTINGS, "rate": 2})
        replies = first.ask(EHLO.strip(), *[b"ETRN customer.example"] * 3)
        self.assertEqual([r[:4] for r in replies[1:]], [b"251 ", b"251 ", b"458 "])
        self.assertEqual(replies[3], b"458 4.7.0 Too many ETRN requests; try again later")
        second = Session(queue=first.queue, clock=first.clock, handler=first.handler)
        self.assertEqual(second.ask(EHLO.strip(), b"ETRN customer.example")[1][:4], b"458 ")
        first.clock.advance(60)
        self.assertEqual(second.ask(b"ETRN customer.example")[0][:4], b"251 ")


class AuthTests(SynchronousTestCase):
    """
    Authenticated users may flush the domains their avatar lists.
    """

    def secure(self) -> Session:
        clock = Clock()
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"alice@customer.example", PASSWORD.encode())
        checker.addUser(b"bob@example.org", PASSWORD.encode())
        realm = MailRealm(etrn={"alice@customer.example": ("customer.example",)})
        auth = SMTPAuth(Portal(realm, [checker]), AuthThrottle(clock, failureDelay=0.0))
        return Session(
            "submissions", peer=OUTSIDE, settings={**SETTINGS, "submission": True}, clock=clock, auth=auth
        )

    def login(self, session: Session, user: str) -> bytes:
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
        return session.ask(EHLO.strip(), b"AUTH PLAIN " + token)[1]

    def test_userDomains(self) -> None:
        """
        Outside the client networks, a user whose ETRN domains cover the node
        may flush it; nodes beyond its domains get 459.
        """
        session = self.secure()
        session.hold("a@customer.example", "b@mx.customer.example")
        self.assertEqual(session.ask(EHLO.strip(), b"ETRN customer.example")[1][:4], b"459 ")
        self.assertEqual(self.login(session, "alice@customer.example")[:4], b"235 ")
        self.assertEqual(
            session.ask(b"ETRN customer.example", b"ETRN @customer.example"),
            [
                b"253 2.0.0 OK, 1 pending recipients for node customer.example started",
                b"459 4.7.1 Node @customer.example not allowed: not authorised for this client",
            ],
        )
        self.assertEqual(session.waiting(), ["b@mx.customer.example"])

    def test_userWithoutDomains(self) -> None:
        """
        A user with no ETRN domains is refused like anyone else.
        """
        session = self.secure()
        session.hold("a@customer.example")
        self.assertEqual(self.login(session, "bob@example.org")[:4], b"235 ")
        self.assertEqual(session.ask(b"ETRN customer.example")[0][:4], b"459 ")
        self.assertEqual(session.waiting(), ["a@customer.example"])


class WiringTests(SynchronousTestCase):
    """
    C{[etrn]} reaches the listeners and the scheduler through
    L{buildService}.
    """

    CONFIG = """
[listen]
smtp = ["tcp:2525"]
submission = ["tcp:2587"]
[queue]
plugin = "memory"
[routing]
plugin = "static"
local_domains = ["example.org"]
[delivery.local]
plugin = "discard"
{etrn}
"""

    def build(self, etrn: str) -> tuple[MemoryReactorClock, object]:
        path = Path(self.mktemp())
        path.mkdir()
        (path / "mailfw.toml").write_text(self.CONFIG.format(etrn=etrn))
        config = loadConfig(str(path / "mailfw.toml"), hostname="mx.test", dataDir=str(path / "data"))
        reactor = MemoryReactorClock()
        service = buildService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return reactor, service

    def factories(self, reactor: MemoryReactorClock) -> dict[int, SMTPFactory]:
        factories: dict[int, SMTPFactory] = {}
        for port, factory, _, _ in reactor.tcpServers:
            assert isinstance(factory, SMTPFactory)
            factories[port] = factory
        return factories

    def test_configured(self) -> None:
        """
        With C{[etrn]} the smtp listener offers ETRN (submission only when
        asked) and the scheduler holds the C{hold} domains.
        """
        reactor, service = self.build(
            '[etrn]\ndomains = ["customer.example"]\nclients = ["127.0.0.1"]\nhold = ["customer.example"]\n'
        )
        factories = self.factories(reactor)
        self.assertIsNotNone(factories[2525].etrn)
        self.assertIsNone(factories[2587].etrn)
        handler = factories[2525].etrn
        assert handler is not None
        self.assertEqual(handler.settings.domains, ("customer.example",))
        scheduler = service.getServiceNamed("scheduler")  # type: ignore[attr-defined]
        self.assertTrue(scheduler._holdForETRN(Address.parse("a@customer.example")))
        self.assertFalse(scheduler._holdForETRN(Address.parse("a@example.org")))

    def test_absent(self) -> None:
        """
        Without C{[etrn]} nothing offers ETRN and nothing is held.
        """
        reactor, service = self.build("")
        self.assertEqual({f.etrn for f in self.factories(reactor).values()}, {None})
        scheduler = service.getServiceNamed("scheduler")  # type: ignore[attr-defined]
        self.assertFalse(scheduler._holdForETRN(Address.parse("a@customer.example")))

    def test_badSection(self) -> None:
        """
        A bad C{[etrn]} key fails start-up naming the section.
        """
        error = self.assertRaises(ConfigError, self.build, '[etrn]\ndomains = ["@customer.example"]\n')
        self.assertIn("[etrn] domains", str(error))
