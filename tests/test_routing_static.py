"""
Tests for L{mailfw.routing._static}: the C{static} router.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.envelope import Route, RouteKind, Session
from mailfw.interfaces import IRouter, IRouterFactory
from mailfw.plugin import findPlugin
from mailfw.reply import SMTPReply
from mailfw.routing import Nexthop, NexthopError, StaticRouter, parseNexthop
from mailfw.routing._static import RELAY_DENIED, UNKNOWN_USER, fromConfig

AGENTS = frozenset({"local", "outbound", "dovecot", "smart"})


def context(agents: frozenset[str] = AGENTS, hostname: str = "mx.example.org") -> ComponentContext:
    return ComponentContext(
        reactor=None, hostname=hostname, dataDir=Path(tempfile.gettempdir()), agentNames=agents
    )


def router(agents: frozenset[str] = AGENTS, **options: Any) -> StaticRouter:
    return fromConfig(context(agents), "routing", {"plugin": "static", **options})


def outsider(host: str = "203.0.113.9") -> Session:
    return Session(listener="smtp", peerHost=host)


class RouteMixin:
    def routeOf(
        self, r: StaticRouter, address: str, session: Session | None = None, utf8: bool = False
    ) -> Route:
        d = r.route(Address.parse(address, utf8=utf8), session)
        result: Route = self.successResultOf(d)  # type: ignore[attr-defined]
        return result


class InterfaceTests(SynchronousTestCase):
    def test_provides(self) -> None:
        """
        L{StaticRouter} provides L{IRouter}.
        """
        self.assertTrue(verifyObject(IRouter, router()))

    def test_plugin(self) -> None:
        """
        The bundled C{static} plugin builds a L{StaticRouter}.
        """
        plugin = findPlugin(IRouterFactory, "static")
        built = plugin.fromConfig(context(), "routing", {"plugin": "static"})
        self.assertIsInstance(built, StaticRouter)


class LocalTests(RouteMixin, SynchronousTestCase):
    def test_defaultLocalhost(self) -> None:
        """
        Without options, C{localhost} is local and goes to the C{local} agent.
        """
        self.assertEqual(
            self.routeOf(router(), "alice@localhost", outsider()),
            Route(RouteKind.LOCAL, "local", None, name="local"),
        )

    def test_hostnameIsLocal(self) -> None:
        """
        The server's own host name is always a local domain.
        """
        r = router(local_domains=["example.org"])
        self.assertEqual(self.routeOf(r, "bob@MX.Example.ORG", outsider()).kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "bob@example.org", outsider()).kind, RouteKind.LOCAL)
        # localhost is no longer local once local_domains is given.
        self.assertEqual(self.routeOf(r, "bob@localhost", outsider()).kind, RouteKind.REFUSE)

    def test_domainCase(self) -> None:
        """
        Configured domains and recipient domains are compared in lowercase.
        """
        r = router(local_domains=["Example.COM"])
        self.assertEqual(self.routeOf(r, "x@EXAMPLE.com", outsider()).kind, RouteKind.LOCAL)

    def test_idna(self) -> None:
        """
        A configured U-label domain matches the A-label form of a recipient.
        """
        r = router(local_domains=["bücher.example"])
        route = self.routeOf(r, "kunde@xn--bcher-kva.example", outsider())
        self.assertEqual(route.kind, RouteKind.LOCAL)
        route = self.routeOf(r, "kunde@bücher.example", outsider(), utf8=True)
        self.assertEqual(route.kind, RouteKind.LOCAL)

    def test_subdomainEntry(self) -> None:
        """
        A leading dot makes every subdomain local, but not the parent.
        """
        r = router(local_domains=[".example.com"])
        self.assertEqual(self.routeOf(r, "a@mail.example.com", outsider()).kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "a@x.y.example.com", outsider()).kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "a@example.com", outsider()).kind, RouteKind.REFUSE)
        self.assertEqual(self.routeOf(r, "a@badexample.com", outsider()).kind, RouteKind.REFUSE)

    def test_localAgentOption(self) -> None:
        """
        C{local_agent} chooses the delivery instance for local domains.
        """
        r = router(local_agent="dovecot")
        self.assertEqual(self.routeOf(r, "a@localhost").agent, "dovecot")

    def test_relayTricksStayLocal(self) -> None:
        """
        Percent hacks, quoted at-signs and bang paths in the local part of a
        local domain are local parts: routed LOCAL, never relayed.
        """
        r = router(local_domains=["example.org"])
        for address in (
            "user%other.example@example.org",
            '"user@other.example"@example.org',
            "other.example!user@example.org",
            '"user%other.example"@example.org',
        ):
            route = self.routeOf(r, address, outsider())
            self.assertEqual(
                (route.kind, route.agent, route.nexthop), (RouteKind.LOCAL, "local", None), address
            )

    def test_relayTricksWithRecipients(self) -> None:
        """
        With a recipient list the relay tricks are unknown users, refused 550.
        """
        r = router(local_domains=["example.org"], recipients=["user"])
        for address in (
            "user%other.example@example.org",
            '"user@other.example"@example.org',
            "other.example!user@example.org",
        ):
            self.assertEqual(self.routeOf(r, address, outsider()), Route.refuse(UNKNOWN_USER))

    def test_relayTrickToRemoteDomainRefused(self) -> None:
        """
        A local part that names our domain does not make a remote domain ours.
        """
        r = router(local_domains=["example.org"])
        route = self.routeOf(r, "user%example.org@victim.example", outsider())
        self.assertEqual(route, Route.refuse(RELAY_DENIED))


class RecipientListTests(RouteMixin, SynchronousTestCase):
    def test_knownAndUnknown(self) -> None:
        """
        Listed users are accepted, others are refused with 550 5.1.1.
        """
        r = router(local_domains=["example.org", "example.net"], recipients=["alice@example.org"])
        self.assertEqual(self.routeOf(r, "alice@example.org", outsider()).kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "bob@example.org", outsider()), Route.refuse(UNKNOWN_USER))
        self.assertEqual(self.routeOf(r, "alice@example.net", outsider()).kind, RouteKind.REFUSE)
        self.assertEqual(UNKNOWN_USER, SMTPReply(550, "5.1.1", "Mailbox unavailable"))

    def test_bareLocalPartAndCatchAll(self) -> None:
        """
        A bare local part is valid at every local domain; C{@domain} accepts
        everything there.
        """
        r = router(local_domains=["example.org", "example.net"], recipients=["carol", "@example.net"])
        self.assertEqual(self.routeOf(r, "carol@example.org").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "carol@example.net").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "anyone@example.net").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "anyone@example.org").kind, RouteKind.REFUSE)

    def test_postmasterAlwaysValid(self) -> None:
        """
        C{postmaster} is valid at every local domain in any case, even with
        an empty recipient list.
        """
        r = router(local_domains=["example.org"], recipients=[])
        self.assertEqual(self.routeOf(r, "PostMaster@example.org").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "alice@example.org").kind, RouteKind.REFUSE)

    def test_caseInsensitiveDefault(self) -> None:
        """
        Local parts match case-insensitively by default.
        """
        r = router(local_domains=["example.org"], recipients=["Alice@example.org"])
        self.assertEqual(self.routeOf(r, "ALICE@example.org").kind, RouteKind.LOCAL)

    def test_caseSensitive(self) -> None:
        """
        With C{local_parts_case_insensitive = false} case matters.
        """
        r = router(
            local_domains=["example.org"],
            recipients=["Alice@example.org"],
            local_parts_case_insensitive=False,
        )
        self.assertEqual(self.routeOf(r, "Alice@example.org").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "alice@example.org").kind, RouteKind.REFUSE)

    def test_quotedLocalPart(self) -> None:
        """
        A quoted local part matches its unquoted form in the list.
        """
        r = router(local_domains=["example.org"], recipients=["a b@example.org"])
        self.assertEqual(self.routeOf(r, '"a b"@example.org').kind, RouteKind.LOCAL)

    def test_refusedAtDeliveryTimeToo(self) -> None:
        """
        At delivery time an unknown local user is refused as well, rather
        than creating a mailbox.
        """
        r = router(local_domains=["example.org"], recipients=["alice"])
        self.assertEqual(self.routeOf(r, "bob@example.org", None), Route.refuse(UNKNOWN_USER))

    def test_recipientsFile(self) -> None:
        """
        C{recipients_file} adds one entry per line, skipping blanks and
        comments, relative to the data directory.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "users").write_text("# users\nalice@example.org\n\n  bob  \n")
        ctx = ComponentContext(reactor=None, hostname="mx.example.org", dataDir=directory, agentNames=AGENTS)
        r = fromConfig(ctx, "routing", {"local_domains": ["example.org"], "recipients_file": "users"})
        self.assertEqual(self.routeOf(r, "alice@example.org").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "bob@example.org").kind, RouteKind.LOCAL)
        self.assertEqual(self.routeOf(r, "carol@example.org").kind, RouteKind.REFUSE)

    def test_recipientsFileMissing(self) -> None:
        """
        An unreadable recipients file is a configuration error.
        """
        e = self.assertRaises(ConfigError, router, recipients_file="/nonexistent/users")
        self.assertIn("recipients_file", str(e))

    def test_noListAcceptsEveryone(self) -> None:
        """
        Without C{recipients}, every local part at a local domain is accepted.
        """
        r = router(local_domains=["example.org"])
        self.assertEqual(self.routeOf(r, "whoever@example.org").kind, RouteKind.LOCAL)


class RelayTests(RouteMixin, SynchronousTestCase):
    def test_deniedForOutsiders(self) -> None:
        """
        An outside client may not relay to a remote domain: 554 5.7.1.
        """
        route = self.routeOf(router(), "x@remote.example", outsider())
        self.assertEqual(route, Route.refuse(SMTPReply(554, "5.7.1", "Relay access denied")))

    def test_relayDomainFromAnyone(self) -> None:
        """
        Relay domains are accepted from anyone and go to the relay agent with
        an MX lookup of the recipient's domain.
        """
        r = router(relay_domains=["backup.example"])
        self.assertEqual(
            self.routeOf(r, "x@backup.example", outsider()),
            Route(RouteKind.RELAY, "outbound", None, name="outbound"),
        )

    def test_relayNetworks(self) -> None:
        """
        Clients in C{relay_networks} may relay anywhere, IPv4 and IPv6,
        including IPv4-mapped IPv6 peers; others may not.
        """
        r = router(relay_networks=["127.0.0.0/8", "::1/128", "192.0.2.0/24"])
        for host in ("127.0.0.1", "127.1.2.3", "::1", "192.0.2.200", "::ffff:192.0.2.7"):
            self.assertEqual(self.routeOf(r, "x@remote.example", outsider(host)).kind, RouteKind.RELAY, host)
        for host in ("192.0.3.1", "::2", "", "/run/mailfw.sock", "10.0.0.1"):
            self.assertEqual(self.routeOf(r, "x@remote.example", outsider(host)).kind, RouteKind.REFUSE, host)

    def test_relayClientFlag(self) -> None:
        """
        A session with C{relayClient} (an authenticated user) may relay.
        """
        session = Session(listener="submission", peerHost="203.0.113.9", relayClient=True)
        self.assertEqual(self.routeOf(router(), "x@remote.example", session).kind, RouteKind.RELAY)

    def test_deliveryTime(self) -> None:
        """
        At delivery time (no session) a remote recipient is relayed.
        """
        route = self.routeOf(router(), "x@remote.example", None)
        self.assertEqual(route, Route(RouteKind.RELAY, "outbound", None, name="outbound"))

    def test_noRelayAgent(self) -> None:
        """
        Without an C{outbound} delivery instance relaying is refused even for
        relay clients and at delivery time; local mail still works.
        """
        r = router(agents=frozenset({"local"}), relay_networks=["127.0.0.0/8"])
        self.assertIsNone(r.relayAgent)
        self.assertEqual(
            self.routeOf(r, "x@remote.example", outsider("127.0.0.1")), Route.refuse(RELAY_DENIED)
        )
        self.assertEqual(self.routeOf(r, "x@remote.example", None), Route.refuse(RELAY_DENIED))
        self.assertEqual(self.routeOf(r, "x@localhost", None).kind, RouteKind.LOCAL)

    def test_relayAgentOption(self) -> None:
        """
        C{relay_agent} names the delivery instance for relayed mail.
        """
        r = router(relay_agent="smart")
        self.assertEqual(self.routeOf(r, "x@remote.example").agent, "smart")

    def test_smarthost(self) -> None:
        """
        With a smart host, every relayed recipient goes there.
        """
        r = router(smarthost="[SMTP.Example.NET]:587")
        self.assertEqual(
            self.routeOf(r, "x@remote.example"),
            Route(RouteKind.RELAY, "outbound", "[smtp.example.net]:587", name="outbound"),
        )

    def test_smarthostWithAgent(self) -> None:
        """
        C{smarthost = "agent:nexthop"} also chooses the delivery instance.
        """
        r = router(smarthost="smart:[smtp.example.net]")
        self.assertEqual(
            self.routeOf(r, "x@remote.example"),
            Route(RouteKind.RELAY, "smart", "[smtp.example.net]", name="smart"),
        )

    def test_addressLiteralRefused(self) -> None:
        """
        A literal that is not listed as local is a remote domain: refused
        for outsiders.
        """
        r = router()
        self.assertEqual(self.routeOf(r, "root@[127.0.0.1]", outsider()), Route.refuse(RELAY_DENIED))

    def test_addressLiteralLocal(self) -> None:
        """
        A literal listed in C{local_domains} is local, IPv4 and IPv6.
        """
        r = router(local_domains=["[192.0.2.1]", "[IPv6:2001:DB8::0:1]"])
        self.assertEqual(self.routeOf(r, "postmaster@[192.0.2.1]", outsider()).kind, RouteKind.LOCAL)
        route = self.routeOf(r, "postmaster@[IPv6:2001:db8::1]", outsider())
        self.assertEqual(route.kind, RouteKind.LOCAL)

    def test_addressLiteralRelayed(self) -> None:
        """
        A relay client's mail to a literal goes directly to that address.
        """
        session = Session(listener="submission", peerHost="203.0.113.9", relayClient=True)
        route = self.routeOf(router(), "x@[192.0.2.5]", session)
        self.assertEqual(route, Route(RouteKind.RELAY, "outbound", "[192.0.2.5]", name="outbound"))
        self.assertEqual(parseNexthop(route.nexthop or ""), Nexthop("192.0.2.5", None, mx=False))


class TransportTests(RouteMixin, SynchronousTestCase):
    def test_exactAndSubdomain(self) -> None:
        """
        An exact entry beats a C{.parent} entry; the nearest parent wins.
        """
        r = router(
            relay_domains=[".example.net", "example.net"],
            transport={
                "example.net": "outbound:[mail.example.net]:2525",
                ".example.net": "outbound:example.com",
                ".deep.example.net": "smart:[deep.example]",
            },
        )
        self.assertEqual(self.routeOf(r, "a@example.net").nexthop, "[mail.example.net]:2525")
        self.assertEqual(self.routeOf(r, "a@sub.example.net").nexthop, "example.com")
        route = self.routeOf(r, "a@x.deep.example.net")
        self.assertEqual((route.agent, route.nexthop), ("smart", "[deep.example]"))

    def test_localDomainTransport(self) -> None:
        """
        A transport entry for a local domain changes its agent (e.g. LMTP)
        and keeps it LOCAL.
        """
        r = router(local_domains=["example.org"], transport={"example.org": "dovecot"})
        self.assertEqual(
            self.routeOf(r, "a@example.org", outsider()),
            Route(RouteKind.LOCAL, "dovecot", None, name="dovecot"),
        )

    def test_transportDoesNotGrantRelay(self) -> None:
        """
        A transport entry alone does not let outsiders relay to that domain.
        """
        r = router(transport={"remote.example": "outbound:[10.0.0.1]"})
        self.assertEqual(self.routeOf(r, "a@remote.example", outsider()), Route.refuse(RELAY_DENIED))
        self.assertEqual(self.routeOf(r, "a@remote.example", None).nexthop, "[10.0.0.1]")

    def test_transportBeatsSmarthost(self) -> None:
        """
        The transport table is consulted before the smart host.
        """
        r = router(smarthost="[smart.example]", transport={"special.example": "outbound"})
        self.assertIsNone(self.routeOf(r, "a@special.example").nexthop)
        self.assertEqual(self.routeOf(r, "a@other.example").nexthop, "[smart.example]")

    def test_transportWorksWithoutRelayAgent(self) -> None:
        """
        Relay domains covered by the transport table work without a
        relay agent.
        """
        r = router(
            agents=frozenset({"local", "dovecot"}),
            relay_domains=["inside.example"],
            transport={"inside.example": "dovecot"},
        )
        self.assertEqual(self.routeOf(r, "a@inside.example", outsider()).agent, "dovecot")


class ConfigTests(SynchronousTestCase):
    def assertConfigError(self, fragment: str, **options: Any) -> None:
        e = self.assertRaises(ConfigError, router, **options)
        self.assertIn(fragment, str(e))
        self.assertIn("[routing]", str(e))

    def test_unknownOption(self) -> None:
        """
        A misspelt option is refused.
        """
        self.assertConfigError("'local_domain'", local_domain=["x.example"])

    def test_unknownAgent(self) -> None:
        """
        Agent names must be configured delivery instances; the error names the key.
        """
        self.assertConfigError("local_agent", local_agent="nope")
        self.assertConfigError("relay_agent", relay_agent="nope")
        self.assertConfigError("transport.x.example", transport={"x.example": "nope"})
        self.assertConfigError("smarthost", smarthost="nope:[x.example]")

    def test_missingLocalAgent(self) -> None:
        """
        The default C{local} agent must exist.
        """
        e = self.assertRaises(ConfigError, router, agents=frozenset({"outbound"}))
        self.assertIn("local_agent", str(e))

    def test_badDomains(self) -> None:
        """
        Invalid domains and networks are refused, naming the key.
        """
        self.assertConfigError("local_domains", local_domains=["bad_domain!"])
        self.assertConfigError("relay_domains", relay_domains=["-x.example"])
        self.assertConfigError("relay_networks", relay_networks=["10.0.0.0/33"])
        self.assertConfigError("relay_networks", relay_networks=["nonsense"])

    def test_badNexthops(self) -> None:
        """
        Malformed next hops in the transport table and smart host are refused.
        """
        self.assertConfigError("transport.x.example", transport={"x.example": "outbound:[x"})
        self.assertConfigError("transport.x.example", transport={"x.example": "outbound:[x]:99999"})
        self.assertConfigError("transport.x.example", transport={"x.example": "outbound:x.example:25"})
        self.assertConfigError("transport.x.example", transport={"x.example": ":[x]"})
        self.assertConfigError("smarthost", smarthost="[smtp.example]:port")
        self.assertConfigError("transport.x.example", transport={"x.example": 3})

    def test_wrongTypes(self) -> None:
        """
        Options of the wrong type are refused.
        """
        self.assertConfigError("local_domains", local_domains=3)
        self.assertConfigError("local_parts_case_insensitive", local_parts_case_insensitive="yes")

    def test_smarthostNeedsRelayAgent(self) -> None:
        """
        A smart host without any relay delivery instance is a configuration error.
        """
        e = self.assertRaises(ConfigError, router, agents=frozenset({"local"}), smarthost="[smtp.example]")
        self.assertIn("smarthost", str(e))

    def test_relayDomainNeedsAgent(self) -> None:
        """
        A relay domain with neither a transport entry nor a relay agent is
        refused at start-up.
        """
        e = self.assertRaises(ConfigError, router, agents=frozenset({"local"}), relay_domains=["x.example"])
        self.assertIn("relay_domains", str(e))

    def test_oddHostname(self) -> None:
        """
        A host name that is not a valid mail domain is ignored, not fatal.
        """
        r = fromConfig(context(hostname="my_host"), "routing", {})
        self.assertIn("localhost", r.localDomains)


class NexthopTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        The three next-hop forms parse and print back in normal form.
        """
        cases = {
            "[Mail.Example.net]:2525": Nexthop("mail.example.net", 2525, mx=False),
            "[mail.example.net]": Nexthop("mail.example.net", None, mx=False),
            "Example.NET": Nexthop("example.net", None, mx=True),
            "[127.0.0.2]:25": Nexthop("127.0.0.2", 25, mx=False),
            "[::1]:2525": Nexthop("::1", 2525, mx=False),
            "[IPv6:2001:db8::1]": Nexthop("2001:db8::1", None, mx=False),
        }
        for text, expected in cases.items():
            self.assertEqual(parseNexthop(text), expected, text)
        self.assertEqual(str(parseNexthop("[Mail.Example.net]:2525")), "[mail.example.net]:2525")
        self.assertEqual(str(parseNexthop("Example.NET")), "example.net")
        self.assertTrue(parseNexthop("[::1]").isAddress)
        self.assertFalse(parseNexthop("[mail.example]").isAddress)

    def test_errors(self) -> None:
        """
        Malformed next hops raise L{NexthopError}.
        """
        for text in ("", "[x", "[x]25", "[x]:0", "[x]:", "x.example:25", "[bad host]", "-x"):
            self.assertRaises(NexthopError, parseNexthop, text)
