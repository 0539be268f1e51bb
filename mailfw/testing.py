"""
Test doubles and conformance tests for mailfw plugin authors.

Everything here is public and stable: use it in your plugin's tests.

 - L{MemoryQueue}: a complete in-memory L{IMessageQueue}.
 - L{MemoryDeliveryAgent}, L{BytesBody}: a scriptable delivery agent and a
   message body over bytes.
 - L{FakeResolver} with L{MX}, L{A}, L{AAAA}, L{CNAME}: DNS answers from a
   dictionary, for routers and relay agents.
 - L{QueueContractTests}, L{DeliveryAgentContractTests}: mixins holding
   the tests every queue backend or delivery agent must pass; subclass one
   together with L{twisted.trial.unittest.SynchronousTestCase}.
 - L{connectedServer}: drive an SMTP server protocol over a
   L{StringTransport} with a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import dns, error
from twisted.names.common import ResolverBase

from mailfw.delivery._contract import DeliveryAgentContractTests
from mailfw.delivery._memory import BytesBody, MemoryDeliveryAgent
from mailfw.queue._contract import QueueContractTests, makeEnvelope
from mailfw.queue._memory import MemoryQueue

__all__ = [
    "A",
    "AAAA",
    "BytesBody",
    "CNAME",
    "DeliveryAgentContractTests",
    "FakeResolver",
    "MX",
    "MemoryDeliveryAgent",
    "MemoryQueue",
    "QueueContractTests",
    "makeEnvelope",
]


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
            matching = [r for r in records if r.TYPE == type]
            cnames = [r for r in records if r.TYPE == dns.CNAME]
            for r in matching:
                answers.append(dns.RRHeader(current.encode("ascii"), type, payload=r))
            if matching or not cnames:
                break
            answers.append(dns.RRHeader(current.encode("ascii"), dns.CNAME, payload=cnames[0]))
            current = cnames[0].name.name.decode("ascii")
            if not self.chase:
                break
        return succeed((answers, [], []))
