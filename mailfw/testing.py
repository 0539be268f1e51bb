"""
Test doubles and conformance tests for mailfw plugin authors.

Everything here is public and stable: use it in your plugin's tests.

 - L{MemoryQueue}: a complete in-memory L{IMessageQueue}.
 - L{MemoryDeliveryAgent}, L{BytesBody}: a scriptable delivery agent and a
   message body over bytes.
 - L{FakeResolver} with L{MX}, L{A}, L{AAAA}, L{CNAME}: DNS answers from a
   dictionary, for routers and relay agents.
 - L{QueueContractTests}, L{SharedStateContractTests},
   L{DeliveryAgentContractTests}, L{RouterContractTests},
   L{PolicyContractTests}: mixins holding the tests every queue backend,
   shared-state store, delivery agent, router or policy must pass;
   subclass one together with L{twisted.trial.unittest.SynchronousTestCase}.
 - L{connectedServer}: drive mailfw's SMTP server over a
   L{StringTransport} with a L{Clock}, to test a policy or router plugin
   as the server calls it.
 - L{FullTransport}, L{runInOtherThread}: a transport with flow control,
   to check that a body's producer stops writing while paused, and a
   thread runner whose result is ready at once although the work ran on
   another thread (L{TrackingBody} refuses reads on the test's thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.names import dns, error
from twisted.names.common import ResolverBase

from mailfw.delivery._contract import DeliveryAgentContractTests, runInOtherThread
from mailfw.delivery._memory import BytesBody, MemoryDeliveryAgent
from mailfw.interfaces import IMessageQueue, IPolicy, IRouter
from mailfw.policy._contract import PolicyContractTests
from mailfw.queue._contract import QueueContractTests, SharedStateContractTests, makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.routing._contract import RouterContractTests

__all__ = [
    "AAAA",
    "CNAME",
    "MX",
    "A",
    "BytesBody",
    "DeliveryAgentContractTests",
    "FakeResolver",
    "FullTransport",
    "MemoryDeliveryAgent",
    "MemoryQueue",
    "PolicyContractTests",
    "QueueContractTests",
    "RouterContractTests",
    "ServerConnection",
    "SharedStateContractTests",
    "connectedServer",
    "makeEnvelope",
    "runInOtherThread",
]


class FullTransport(StringTransport):
    """
    A L{StringTransport} that behaves like a real transport whose send
    buffer is full: while C{full} is set, each write pauses the registered
    streaming producer, which must then write nothing until resumed.
    L{drain} resumes it until it unregisters.
    """

    full = True

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None and self.streaming:
            self.producer.pauseProducing()

    def drain(self, limit: int = 100_000) -> None:
        """
        Resume the producer until it unregisters (the body was sent).

        @raise AssertionError: if it is still registered after C{limit}
            resumptions.
        """
        for _ in range(limit):
            if self.producer is None:
                return
            self.producer.resumeProducing()
        raise AssertionError("the producer never finished")


def MX(preference: int, name: str) -> dns.Record_MX:
    return dns.Record_MX(preference, name.encode("ascii"))


def A(address: str) -> dns.Record_A:
    return dns.Record_A(address)


def AAAA(address: str) -> dns.Record_AAAA:
    return dns.Record_AAAA(address)


def CNAME(name: str) -> dns.Record_CNAME:
    return dns.Record_CNAME(name.encode("ascii"))


class FakeResolver(ResolverBase):
    """
    A resolver answering from a dictionary, like a non-recursive server
    that does not chase CNAMEs (unless C{chase} is set).

    @ivar zone: name to records; a name absent from it is NXDOMAIN.
    @ivar errors: C{(name, type)} to an exception instance or a L{Deferred}.
    @ivar queries: every C{(name, type)} asked, in order.
    """

    def __init__(
        self,
        zone: dict[str, list[Any]],
        errors: dict[tuple[str, int], Any] | None = None,
        chase: bool = False,
    ) -> None:
        ResolverBase.__init__(self)
        self.zone = zone
        self.errors = errors or {}
        self.chase = chase
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        text = name.decode("ascii").lower()
        self.queries.append((text, type))
        problem = self.errors.get((text, type))
        if isinstance(problem, Deferred):
            return problem
        if problem is not None:
            return fail(problem)
        if text not in self.zone:
            return fail(error.DNSNameError(text))
        answers: list[dns.RRHeader] = []
        current = text
        while True:
            records = self.zone.get(current, [])
            matching = [r for r in records if type == r.TYPE]
            cnames = [r for r in records if r.TYPE == dns.CNAME]
            for r in matching:
                answers.append(dns.RRHeader(current.encode("ascii"), type, ttl=r.ttl or 0, payload=r))
            if matching or not cnames:
                break
            answers.append(dns.RRHeader(current.encode("ascii"), dns.CNAME, payload=cnames[0]))
            current = cnames[0].name.name.decode("ascii")
            if not self.chase:
                break
        return succeed((answers, [], []))


@dataclass
class ServerConnection:
    """
    One mailfw SMTP server connection on a L{StringTransport}.

    @ivar queue: where accepted messages go (a L{MemoryQueue} by default).
    """

    protocol: Any
    transport: StringTransport
    clock: Clock
    queue: IMessageQueue
    seen: int = field(default=0)

    def send(self, data: bytes) -> None:
        """
        Deliver C{data} from the client, as if it arrived in one packet.
        """
        self.protocol.dataReceived(data)

    def replies(self) -> list[bytes]:
        """
        The last line of each reply so far (C{b"250 2.1.5 Ok"}), in order.
        """
        lines = self.transport.value().split(b"\r\n")[:-1]
        return [line for line in lines if line[3:4] != b"-"]

    def codes(self) -> list[int]:
        """
        The reply codes so far.
        """
        return [int(line[:3]) for line in self.replies()]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def connectedServer(
    kind: str = "smtp",
    hostname: str = "mx.example.org",
    localDomains: Sequence[str] = ("example.org",),
    queue: IMessageQueue | None = None,
    router: IRouter | None = None,
    policies: Sequence[IPolicy | Any] = (),
    limits: Any = None,
    peer: str = "192.0.2.1",
    clock: Clock | None = None,
) -> ServerConnection:
    """
    Connect a client to a new mailfw SMTP server protocol built by the real
    L{mailfw.smtp.SMTPFactory}, after its greeting.

    By default the server uses a L{MemoryQueue} and the C{static} router
    with C{localDomains}, and refuses relaying.
    """
    from mailfw.config import ComponentContext
    from mailfw.routing._static import fromConfig as staticRouter
    from mailfw.smtp import SMTPFactory, SMTPLimits

    clock = clock or Clock()
    queue = queue if queue is not None else MemoryQueue(clock)
    if router is None:
        context = ComponentContext(
            reactor=clock, hostname=hostname, dataDir=Path("."), agentNames=frozenset({"local"})
        )
        router = staticRouter(context, "routing", {"local_domains": list(localDomains)})
    factory = SMTPFactory(
        kind, hostname, queue, router, clock, policies=policies, limits=limits or SMTPLimits()
    )
    address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40000)
    protocol = factory.buildProtocol(address)
    assert protocol is not None
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return ServerConnection(protocol, transport, clock, queue)
