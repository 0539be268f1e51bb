"""
Tests for virtual domains in the C{static} router (C{[routing] virtual})
and for the C{virtual-aliases} agent that expands the table's aliases.

The hosting table is a real SQLite file run with L{runSynchronously}, so
every route has fired when C{route} returns; no reactor is involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._memory import BytesBody
from mailfw.envelope import Envelope, Recipient, Route, RouteKind, Session
from mailfw.hosting import Mailbox, SQLHostingTable
from mailfw.hosting._agent import VirtualAliasAgent
from mailfw.hosting._agent import fromConfig as agentFromConfig
from mailfw.hosting._sql import runSynchronously, tableFromText
from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory, IRouter
from mailfw.plugin import findPlugin
from mailfw.queue._memory import MemoryQueue
from mailfw.routing._contract import RouterContractTests
from mailfw.routing._static import MISCONFIGURED, TABLE_UNAVAILABLE, UNKNOWN_USER, StaticRouter, fromConfig

AGENTS = frozenset({"local", "outbound", "virtual-aliases", "dovecot"})
STRANGER = Session(listener="smtp", peerHost="192.0.2.77")
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def hostingTable(case: SynchronousTestCase) -> SQLHostingTable:
    data = Path(case.mktemp())
    data.mkdir(parents=True)
    table = tableFromText("sqlite:hosting.sqlite", data, runSynchronously, "[routing] virtual")
    case.addCleanup(table.close)
    for domain in ("example.org", "example.com"):
        table.addDomain(domain)
    table.addMailbox(Mailbox("user@example.org"))
    table.addMailbox(Mailbox("alice@example.org"))
    table.addMailbox(Mailbox("imap@example.org", agent="dovecot"))
    table.addAlias("team@example.org", ["alice@example.org", "bob@example.net"])
    table.addAlias("@example.com", ["alice@example.org"])
    return table


def virtualRouter(
    case: SynchronousTestCase, table: Any, agents: frozenset[str] = AGENTS, **options: Any
) -> StaticRouter:
    context = ComponentContext(reactor=None, hostname="mx.example.net", dataDir=Path("."), agentNames=agents)
    return fromConfig(
        context, "routing", {"plugin": "static", "virtual": "sqlite:unused", **options}, hosting=table
    )


class VirtualRouterContractTests(RouterContractTests, SynchronousTestCase):
    """
    The router contract with C{example.org} hosted only in the table.
    """

    localDomain = "example.org"
    unknownUser = "nobody"

    def makeRouter(self) -> IRouter:
        return virtualRouter(self, hostingTable(self))


class VirtualRoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = hostingTable(self)
        self.router = virtualRouter(self, self.table)

    def routeOf(self, address: str, session: Session | None = STRANGER) -> Route:
        route: Route = self.successResultOf(self.router.route(Address.parse(address), session))
        return route

    def test_mailbox(self) -> None:
        """
        A mailbox of a virtual domain is local, for the local agent or the
        one its row names, whatever the case of the address.
        """
        self.assertEqual(
            self.routeOf("Alice@EXAMPLE.org"), Route(RouteKind.LOCAL, "local", None, name="local")
        )
        self.assertEqual(
            self.routeOf("imap@example.org"), Route(RouteKind.LOCAL, "dovecot", None, name="dovecot")
        )

    def test_transportForMailboxes(self) -> None:
        """
        A mailbox without an agent of its own follows the domain's
        C{transport} entry, as any local domain does; its own agent wins.
        """
        router = virtualRouter(self, self.table, transport={"example.org": "dovecot"})
        route = self.successResultOf(router.route(Address.parse("alice@example.org"), STRANGER))
        self.assertEqual(route, Route(RouteKind.LOCAL, "dovecot", None, name="dovecot"))
        self.table.addMailbox(Mailbox("alice@example.org", agent="local"))
        route = self.successResultOf(router.route(Address.parse("alice@example.org"), STRANGER))
        self.assertEqual(route.agent, "local")

    def test_unknownUser(self) -> None:
        """
        An address of a virtual domain that is neither a mailbox nor an
        alias is refused 550 5.1.1 at RCPT time, and at delivery time too.
        """
        self.assertEqual(self.routeOf("nobody@example.org"), Route.refuse(UNKNOWN_USER))
        self.assertEqual(self.routeOf("nobody@example.org", None), Route.refuse(UNKNOWN_USER))

    def test_detail(self) -> None:
        """
        C{user+detail} goes to C{user}'s mailbox; a lone C{+} does not
        make an address valid.
        """
        self.assertEqual(self.routeOf("alice+lists@example.org").agent, "local")
        self.assertEqual(self.routeOf("+@example.org"), Route.refuse(UNKNOWN_USER))
        self.assertEqual(self.routeOf("nobody+x@example.org"), Route.refuse(UNKNOWN_USER))

    def test_aliasAndCatchAll(self) -> None:
        """
        Aliases and catch-all addresses go to the virtual-aliases agent.
        """
        expected = Route(RouteKind.LOCAL, "virtual-aliases", None, name="virtual-aliases")
        self.assertEqual(self.routeOf("team@example.org"), expected)
        self.assertEqual(self.routeOf("whoever@example.com"), expected)

    def test_changeSeenAtOnce(self) -> None:
        """
        A mailbox added after the router was built is accepted by the next
        RCPT; one deleted is refused.
        """
        self.assertEqual(self.routeOf("new@example.org"), Route.refuse(UNKNOWN_USER))
        self.table.addMailbox(Mailbox("new@example.org"))
        self.assertEqual(self.routeOf("new@example.org").kind, RouteKind.LOCAL)
        self.table.deleteMailbox("new@example.org")
        self.assertEqual(self.routeOf("new@example.org"), Route.refuse(UNKNOWN_USER))

    def test_otherDomainsAsBefore(self) -> None:
        """
        Domains not in the table follow the static rules: no relaying for
        strangers, the host name is local.
        """
        self.assertEqual(self.routeOf("x@elsewhere.example").kind, RouteKind.REFUSE)
        self.assertEqual(self.routeOf("x@mx.example.net").agent, "local")

    def test_unknownAgent(self) -> None:
        """
        A mailbox row that names an instance that is not configured defers
        (451 4.3.5) rather than losing or bouncing the mail.
        """
        self.table.addMailbox(Mailbox("odd@example.org", agent="nosuch"))
        self.assertEqual(self.routeOf("odd@example.org"), Route.refuse(MISCONFIGURED))
        self.flushLoggedErrors()

    def test_tableUnavailable(self) -> None:
        """
        A table that cannot be read gives 451 4.3.0, logged, never a
        traceback to the client.
        """

        class Broken:
            def domain(self, name: str) -> Deferred[bool]:
                return fail(OSError("database is locked"))

        router = virtualRouter(self, Broken())
        route = self.successResultOf(router.route(Address.parse("a@example.org"), STRANGER))
        self.assertEqual(route, Route.refuse(TABLE_UNAVAILABLE))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_describe(self) -> None:
        """
        The start-up log names the table.
        """
        self.assertIn("virtual domains of virtual tables in sqlite:", self.router.describe())
        self.assertTrue(self.router.ownedPaths()[0].endswith("hosting.sqlite"))


class VirtualConfigTests(SynchronousTestCase):
    def test_needsAliasAgent(self) -> None:
        """
        C{virtual} without the instance that expands aliases is refused at
        start-up, saying what to add.
        """
        e = self.assertRaises(ConfigError, virtualRouter, self, None, frozenset({"local"}))
        self.assertIn('[delivery.virtual-aliases] plugin = "virtual-aliases"', str(e))

    def test_opensTable(self) -> None:
        """
        C{virtual = "sqlite:PATH"} opens the file in the data directory.
        """
        data = Path(self.mktemp())
        data.mkdir()
        context = ComponentContext(reactor=None, hostname="mx.example.net", dataDir=data, agentNames=AGENTS)
        router = fromConfig(context, "routing", {"virtual": "sqlite:h.sqlite", "virtual_threads": 1})
        assert router.hosting is not None
        self.addCleanup(router.hosting.close)
        self.assertTrue((data / "h.sqlite").exists())

    def test_badVirtual(self) -> None:
        """
        A malformed C{virtual} names the key.
        """
        context = ComponentContext(
            reactor=None, hostname="mx.example.net", dataDir=Path("."), agentNames=AGENTS
        )
        e = self.assertRaises(ConfigError, fromConfig, context, "routing", {"virtual": "hosting.db"})
        self.assertIn("[routing] virtual", str(e))


class VirtualAliasAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = hostingTable(self)
        self.queue = MemoryQueue()
        self.agent = VirtualAliasAgent("virtual-aliases", self.table, self.queue, runSynchronously)

    def deliver(self, *recipients: str, message: bytes = MESSAGE) -> list[tuple[int, str]]:
        envelope = Envelope(
            sender=Address("sender", "origin.test"),
            recipients=tuple(Recipient(Address.parse(r)) for r in recipients),
            size=len(message),
        )
        outcomes = self.successResultOf(self.agent.deliver(envelope, BytesBody(message), None))
        return [(o.reply.code, o.reply.enhanced) for o in outcomes]

    def test_provides(self) -> None:
        """
        The agent provides L{IDeliveryAgent}, and the bundled plugin is
        found by its name.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent))
        self.assertEqual(findPlugin(IDeliveryAgentFactory, "virtual-aliases").name, "virtual-aliases")

    def test_expands(self) -> None:
        """
        An alias becomes one new queued message to its targets, with a
        Delivered-To header, through the aliases agent's machinery.
        """
        self.assertEqual(self.deliver("Team@example.org"), [(250, "2.1.5")])
        [queueID] = self.queue.queueIDs()
        self.assertEqual(
            [str(r.address) for r in self.queue.envelope(queueID).recipients],
            ["alice@example.org", "bob@example.net"],
        )
        self.assertEqual(self.queue.body(queueID), b"Delivered-To: Team@example.org\r\n" + MESSAGE)

    def test_catchAll(self) -> None:
        """
        An address under a catch-all is expanded to the catch-all's targets.
        """
        self.assertEqual(self.deliver("anyone@example.com"), [(250, "2.1.5")])
        [queueID] = self.queue.queueIDs()
        self.assertEqual(
            [str(r.address) for r in self.queue.envelope(queueID).recipients], ["alice@example.org"]
        )

    def test_deletedSinceRCPT(self) -> None:
        """
        An alias deleted after RCPT is refused 550 5.1.1 (no stale copy).
        """
        self.table.deleteAlias("team@example.org", None)
        self.assertEqual(self.deliver("team@example.org"), [(550, "5.1.1")])
        self.assertEqual(self.queue.queueIDs(), [])

    def test_loop(self) -> None:
        """
        A message that already went through the alias is stopped as a loop.
        """
        looped = b"Delivered-To: team@example.org\r\n" + MESSAGE
        self.assertEqual(self.deliver("team@example.org", message=looped), [(554, "5.4.6")])

    def test_tableUnavailable(self) -> None:
        """
        A table that cannot be read defers every recipient.
        """

        class Broken:
            def aliases(self, address: Address) -> Deferred[tuple[str, ...]]:
                return fail(OSError("gone"))

        self.agent.table = Broken()  # type: ignore[assignment]
        self.assertEqual(self.deliver("team@example.org", "x@example.com"), [(451, "4.3.0"), (451, "4.3.0")])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_config(self) -> None:
        """
        The plugin needs C{virtual} and the queue.
        """
        data = Path(self.mktemp())
        data.mkdir()
        context = ComponentContext(reactor=None, hostname="mx", dataDir=data, queue=self.queue)
        e = self.assertRaises(ConfigError, agentFromConfig, context, "va", {})
        self.assertIn("needs 'virtual'", str(e))
        agent = agentFromConfig(context, "va", {"virtual": "sqlite:h.sqlite"})
        self.addCleanup(agent.table.close)
        self.assertIn("h.sqlite", agent.describe())
        noQueue = ComponentContext(reactor=None, hostname="mx", dataDir=data)
        self.assertRaises(ConfigError, agentFromConfig, noQueue, "va", {"virtual": "sqlite:h.sqlite"})
