"""
Small doubles for the SMTP server tests: a queue that records what the
server writes, a dict-based router, policies whose answers the test
controls, and helpers to drive a protocol over a L{StringTransport}.

The router implements L{IRouter}.  The queue implements only what the
server calls, L{IMessageIntake}, not the whole L{IMessageQueue} the
settings and factory are typed with, so passing it there keeps a
C{type: ignore[arg-type]} (see L{mailfw.queue._memory} and
L{mailfw.routing._static} for the real ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, Route, RouteKind, Session
from mailfw.interfaces import IIncomingMessage, IMessageIntake, IPolicy, IRouter
from mailfw.policy import CONTINUE, Policy, Verdict
from mailfw.policy._chain import ChainLink
from mailfw.reply import SMTPReply
from mailfw.smtp import SMTPLimits, SMTPServerProtocol
from mailfw.smtp._settings import SessionSettings

HOSTNAME = "mx.example.org"
LOCAL = "example.org"
RELAY_DENIED = SMTPReply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = SMTPReply(550, "5.1.1", "User unknown")


@implementer(IIncomingMessage)
class RecordingIncoming:
    """
    An L{IIncomingMessage} that keeps what is written.

    @ivar commitResult: what L{commit} returns: C{None} for an immediate
        success, a L{Deferred} the test fires, or an exception to fail with.
    """

    def __init__(self, queueID: str, commitResult: Any = None) -> None:
        self.queueID = queueID
        self.chunks: list[bytes] = []
        self.header = b""
        self.envelope: Envelope | None = None
        self.hold = False
        self.committed = False
        self.aborted = False
        self.commitResult = commitResult

    @property
    def data(self) -> bytes:
        """
        The message as the queue would store it: the header section given
        to commit, then what was written.
        """
        return b"".join([self.header, *self.chunks])

    def write(self, data: bytes) -> None:
        assert not self.aborted and not self.committed, "write after end"
        self.chunks.append(data)

    def rewind(self) -> None:
        assert not self.aborted and not self.committed, "rewind after end"
        self.chunks = []

    def commit(
        self, header: bytes = b"", envelope: Envelope | None = None, hold: bool = False
    ) -> Deferred[str]:
        assert not self.aborted, "commit after abort"
        self.header, self.envelope, self.hold = header, envelope, hold
        result = self.commitResult
        if isinstance(result, Deferred):
            return result.addCallback(self._done)
        if isinstance(result, BaseException):
            return fail(result)
        self.committed = True
        return succeed(self.queueID)

    def _done(self, queueID: str) -> str:
        self.committed = True
        return queueID

    def abort(self) -> None:
        self.aborted = True


@implementer(IMessageIntake)
class RecordingQueue:
    """
    The part of L{IMessageQueue} the server uses: C{receive}.

    @ivar messages: every message started, in order, as (envelope, incoming).
    @ivar commitResult: given to each new L{RecordingIncoming}.
    @ivar receiveError: raised by L{receive} when set.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, RecordingIncoming]] = []
        self.commitResult: Any = None
        self.receiveError: BaseException | None = None

    def receive(self, envelope: Envelope) -> RecordingIncoming:
        if self.receiveError is not None:
            raise self.receiveError
        incoming = RecordingIncoming(f"Q{len(self.messages) + 1}", self.commitResult)
        self.messages.append((envelope, incoming))
        return incoming

    @property
    def committed(self) -> list[tuple[Envelope, RecordingIncoming]]:
        return [(e, i) for e, i in self.messages if i.committed]


@implementer(IRouter)
class DictRouter:
    """
    Routes by domain: C{local} domains are local (with C{users}, only those
    local parts exist), C{relay} domains relay, and anything else is
    refused unless the session is a relay client.

    @ivar pending: with C{slow} set, each call's L{Deferred} and address, for
        the test to fire.
    """

    def __init__(
        self,
        local: frozenset[str] = frozenset({LOCAL}),
        relay: frozenset[str] = frozenset(),
        users: frozenset[str] | None = None,
        slow: bool = False,
    ) -> None:
        self.local = local
        self.relay = relay
        self.users = users
        self.slow = slow
        self.calls: list[tuple[Address, Session | None]] = []
        self.pending: list[tuple[Address, Deferred[Route]]] = []
        self.error: BaseException | None = None

    def decide(self, address: Address, session: Session | None) -> Route:
        if address.domain in self.local:
            if self.users is not None and address.localpart.lower() not in self.users:
                return Route.refuse(UNKNOWN_USER)
            return Route(RouteKind.LOCAL, "local")
        if address.domain in self.relay or (session is not None and session.relayClient):
            return Route(RouteKind.RELAY, "outbound", address.domain)
        return Route.refuse(RELAY_DENIED)

    def route(self, recipient: Address, session: Session | None) -> Deferred[Route]:
        self.calls.append((recipient, session))
        if self.error is not None:
            raise self.error
        if self.slow:
            d: Deferred[Route] = Deferred()
            self.pending.append((recipient, d))
            return d
        return succeed(self.decide(recipient, session))

    def fire(self, index: int) -> None:
        """
        Answer the C{index}th pending call as L{decide} would.
        """
        address, d = self.pending[index]
        d.callback(self.decide(address, None))


@implementer(IPolicy)
class StagePolicy(Policy):
    """
    A policy answering each stage from C{verdicts} (a verdict, an exception
    to raise, or C{"slow"} for a L{Deferred} the test fires), recording the
    calls in C{calls} and the slow ones in C{pending}.
    """

    def __init__(self, name: str = "test", **verdicts: Any) -> None:
        self.name = name
        self.verdicts = verdicts
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.pending: list[Deferred[Verdict]] = []

    def _answer(self, stage: str, *args: Any) -> Any:
        self.calls.append((stage, args))
        verdict = self.verdicts.get(stage, CONTINUE)
        if isinstance(verdict, BaseException):
            raise verdict
        if verdict == "slow":
            d: Deferred[Verdict] = Deferred()
            self.pending.append(d)
            return d
        if callable(verdict):
            return verdict(*args)
        return verdict

    def checkConnection(self, session: Session) -> Any:
        return self._answer("connection", session)

    def checkHelo(self, session: Session, name: str) -> Any:
        return self._answer("helo", session, name)

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Any:
        return self._answer("sender", session, sender, parameters)

    def checkRecipient(self, session: Session, envelope: Envelope, recipient: Recipient) -> Any:
        return self._answer("recipient", session, envelope, recipient)

    def checkMessage(self, session: Session, envelope: Envelope, headers: bytes) -> Any:
        return self._answer("message", session, envelope, headers)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that can start TLS (it only records the request).
    """

    tlsStartedWith: object | None = None

    def startTLS(self, contextFactory: object) -> None:
        self.tlsStartedWith = contextFactory

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


class FakeTLSContext:
    """
    A stand-in for an OpenSSL context factory that L{twisted.test.iosim}
    accepts: it "verifies" any peer.
    """

    def iosimVerify(self, other: object) -> bool:
        return True


@dataclass
class Connection:
    """
    One server protocol on a L{StringTransport}, with what it was given.
    """

    proto: SMTPServerProtocol
    transport: StringTransport
    clock: Clock
    queue: RecordingQueue
    router: DictRouter
    policies: Sequence[IPolicy | ChainLink] = ()
    seen: int = field(default=0)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lines(self) -> list[bytes]:
        """
        Every reply line sent so far.
        """
        value: bytes = self.transport.value()
        return value.split(b"\r\n")[:-1]

    def replies(self) -> list[bytes]:
        """
        The last line of each reply (C{"250 2.0.0 Ok"}), in order.
        """
        return [line for line in self.lines() if line[3:4] != b"-"]

    def codes(self) -> list[bytes]:
        return [line[:3] for line in self.replies()]

    def newCodes(self) -> list[bytes]:
        """
        The codes of replies since the last call.
        """
        codes = self.codes()
        new, self.seen = codes[self.seen :], len(codes)
        return new

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def connect(
    kind: str = "smtp",
    policies: Sequence[IPolicy | ChainLink] = (),
    limits: SMTPLimits = SMTPLimits(),
    router: DictRouter | None = None,
    queue: RecordingQueue | None = None,
    tlsOptions: object | None = None,
    peer: str = "192.0.2.1",
    clock: Clock | None = None,
    greet: bool = True,
    transportFactory: Callable[..., StringTransport] = StringTransport,
    auth: Any = None,
    quotas: Any = None,
) -> Connection:
    """
    Connect a new protocol; with C{greet}, drop the greeting from the
    transport (asserting it was a 220).
    """
    clock = clock or Clock()
    router = router or DictRouter()
    queue = queue or RecordingQueue()
    settings = SessionSettings(
        kind,
        HOSTNAME,
        queue,  # type: ignore[arg-type]
        router,
        clock,
        policies,
        limits,
        tlsOptions,
        auth=auth,
        quotas=quotas,
    )
    proto = SMTPServerProtocol(settings)
    address = IPv6Address("TCP", peer, 40000) if ":" in peer else IPv4Address("TCP", peer, 40000)
    transport = transportFactory(peerAddress=address)
    proto.makeConnection(transport)
    conn = Connection(proto, transport, clock, queue, router, policies)
    if greet:
        assert transport.value() == b"220 mx.example.org ESMTP\r\n", transport.value()
        transport.clear()
    return conn


EHLO = b"EHLO client.example.net\r\n"
PROLOGUE = EHLO + b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n"
"""EHLO, MAIL, RCPT and DATA: 4 replies (250, 250, 250, 354) then the text."""
