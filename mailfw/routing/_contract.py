"""
The conformance kit for routers: what every L{IRouter} must do, as a test
mixin that plugin authors run against their own router.

Usage::

    class MyRouterContractTests(RouterContractTests, SynchronousTestCase):
        localDomain = "example.org"        # a domain the router delivers
        foreignDomain = "elsewhere.example"  # one it must not relay for strangers
        unknownUser = "nobody"             # a local part it refuses; None if
                                           # it accepts every local part

        def makeRouter(self) -> IRouter:
            return MyRouter(...)

The mixin is not a test case by itself; combine it with
L{twisted.trial.unittest.SynchronousTestCase}.  Override L{resultOf} if
the router's L{Deferred}s fire later (DNS, a database).

What the contract pins, beyond the interface's docstring: a stranger
cannot relay (no open relay); a refusal carries a 4xx or 5xx reply; a
recipient accepted at RCPT time is never refused at delivery time; the
postmaster of a local domain is never refused; unusual but valid local
parts (C{%}, C{!}, quoted) are routed by their domain, never reinterpreted;
a router that knows its users refuses an unknown one with 550 5.1.1 at
RCPT time and at delivery time alike (no backscatter, no late bounce).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.envelope import Route, RouteKind, Session
from mailfw.interfaces import IRouter

__all__ = ["RouterContractTests"]

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

STRANGER = Session(listener="smtp", peerHost="192.0.2.77", helo="stranger.example", esmtp=True)


class RouterContractTests(_Base):
    """
    Tests every L{IRouter} must pass.
    """

    localDomain = "example.org"
    foreignDomain = "elsewhere.example"
    unknownUser: str | None = None
    """A local part of L{localDomain} that the router must refuse, or
    C{None} when it accepts every local part there."""

    def makeRouter(self) -> IRouter:
        """
        The router under test.
        """
        raise NotImplementedError("subclasses of RouterContractTests define makeRouter")

    def resultOf(self, d: Deferred[Any]) -> Any:
        """
        The result of C{d}; override to drive a router whose answers come
        later.
        """
        return self.successResultOf(d)

    def route(self, address: str, session: Session | None = STRANGER) -> Route:
        router = self.makeRouter()
        result = self.resultOf(router.route(Address.parse(address), session))
        self.assertIsInstance(result, Route)
        return result  # type: ignore[no-any-return]

    def test_provides(self) -> None:
        """
        The router provides L{IRouter}.
        """
        self.assertTrue(verifyObject(IRouter, self.makeRouter()))

    def test_localAccepted(self) -> None:
        """
        A user at a local domain is accepted from a stranger, with the name
        of a delivery agent.
        """
        route = self.route(f"user@{self.localDomain}")
        self.assertIsNot(route.kind, RouteKind.REFUSE)
        self.assertTrue(route.agent)

    def test_noOpenRelay(self) -> None:
        """
        A stranger cannot relay to a foreign domain; the refusal carries a
        4xx or 5xx reply.
        """
        route = self.route(f"victim@{self.foreignDomain}")
        self.assertIs(route.kind, RouteKind.REFUSE)
        assert route.reply is not None
        self.assertGreaterEqual(route.reply.code, 400)

    def test_relayTricksStayLocal(self) -> None:
        """
        Local parts that once meant relaying (C{%}, C{!}, a quoted address)
        are routed by their domain: local, never to the foreign domain.
        """
        for localpart in (
            f"user%{self.foreignDomain}",
            f"{self.foreignDomain}!user",
            f'"user@{self.foreignDomain}"',
        ):
            route = self.route(f"{localpart}@{self.localDomain}")
            self.assertNotEqual(route.nexthop, self.foreignDomain, localpart)
            if route.kind is RouteKind.REFUSE:
                assert route.reply is not None
                self.assertGreaterEqual(route.reply.code, 400)

    def test_postmaster(self) -> None:
        """
        The postmaster of a local domain is never refused (RFC 5321 4.5.1).
        """
        self.assertIsNot(self.route(f"postmaster@{self.localDomain}").kind, RouteKind.REFUSE)

    def test_acceptedStaysAccepted(self) -> None:
        """
        A recipient accepted at RCPT time is not refused at delivery time
        (no session), so accepted mail is delivered, not bounced.
        """
        address = f"user@{self.localDomain}"
        self.assertIsNot(self.route(address).kind, RouteKind.REFUSE)
        self.assertIsNot(self.route(address, None).kind, RouteKind.REFUSE)

    def test_unknownUser(self) -> None:
        """
        With L{unknownUser} set, that user is refused 550 5.1.1 at RCPT
        time and again at delivery time; without it, an arbitrary local
        part is accepted, as the router claims.
        """
        if self.unknownUser is None:
            self.assertIsNot(self.route(f"any-user-7f3a@{self.localDomain}").kind, RouteKind.REFUSE)
            return
        address = f"{self.unknownUser}@{self.localDomain}"
        for session in (STRANGER, None):
            route = self.route(address, session)
            self.assertIs(route.kind, RouteKind.REFUSE, session)
            assert route.reply is not None
            self.assertEqual((route.reply.code, route.reply.enhanced), (550, "5.1.1"))
