"""
Tests for the C{dnsbl} policy (L{mailfw.policy._dnsbl}): weighted zones,
return-code patterns, Spamhaus's refused-query codes, DNSWL allow-listing,
TTL caching and DNS failures, with an in-memory resolver and a L{Clock}.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ComponentContext, ConfigError
from mailfw.envelope import Session
from mailfw.interfaces import IPolicy, IPolicyFactory
from mailfw.plugin import findPlugin
from mailfw.policy import CONTINUE, AuthResult, Verdict
from mailfw.policy._dnsbl import DNSBLPolicy, Zone, fromConfig, queryName
from mailfw.testing import connectedServer

CLIENT = "192.0.2.99"
SESSION = Session(listener="smtp", peerHost=CLIENT, id="1")


class ZoneResolver(ResolverBase):
    """
    A resolver with A records and their TTLs by name; other names are
    NXDOMAIN with an SOA whose minimum is C{negativeTTL}.

    @ivar errors: name to the exception its lookup fails with.
    @ivar queries: every name asked, in order.
    """

    def __init__(self, records: dict[str, list[tuple[str, int]]], negativeTTL: int = 900) -> None:
        ResolverBase.__init__(self)
        self.records = records
        self.errors: dict[str, Exception] = {}
        self.waiting: dict[str, Deferred[Any]] = {}
        self.negativeTTL = negativeTTL
        self.queries: list[str] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        text = name.decode("ascii")
        self.queries.append(text)
        if text in self.waiting:
            return self.waiting[text]
        if text in self.errors:
            return fail(self.errors[text])
        if text not in self.records:
            message = dns.Message(rCode=dns.ENAME)
            soa = dns.Record_SOA(b"ns.example", b"hostmaster.example", minimum=self.negativeTTL, ttl=3600)
            message.authority = [dns.RRHeader(b"example", dns.SOA, ttl=3600, payload=soa)]
            return fail(error.DNSNameError(message))
        answers = [
            dns.RRHeader(name, dns.A, ttl=ttl, payload=dns.Record_A(address))
            for address, ttl in self.records[text]
        ]
        return succeed((answers, [], []))


def listed(
    zone: str, *answers: str, ttl: int = 600, client: str = CLIENT
) -> dict[str, list[tuple[str, int]]]:
    return {queryName(ipaddress.ip_address(client), zone): [(a, ttl) for a in answers]}


def policy(resolver: ZoneResolver, clock: Clock | None = None, **kwargs: Any) -> DNSBLPolicy:
    zones = kwargs.pop("zones", (Zone("bl.example"),))
    return DNSBLPolicy("rbl", resolver, clock or Clock(), zones, **kwargs)


def verdictOf(p: DNSBLPolicy, session: Session = SESSION) -> Verdict:
    result = p.checkConnection(session)
    if isinstance(result, Deferred):
        return SynchronousTestCase().successResultOf(result)
    return result


class QueryNameTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """
        IPv4 addresses are reversed by octet (RFC 5782 2.1).
        """
        self.assertEqual(queryName(ipaddress.ip_address("192.0.2.99"), "bl.example"), "99.2.0.192.bl.example")

    def test_ipv6(self) -> None:
        """
        IPv6 addresses are reversed by nibble, all 32 of them (RFC 5782 2.4).
        """
        name = queryName(ipaddress.ip_address("2001:db8::1"), "bl.example")
        self.assertEqual(name, "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.example")


class ZoneTests(SynchronousTestCase):
    def test_anyLoopbackAnswer(self) -> None:
        """
        Without a pattern any 127.0.0.0/8 answer is a listing, but not an
        answer elsewhere (a hijacked or wildcard zone).
        """
        zone = Zone.parse("bl.example")
        self.assertTrue(zone.counts("127.0.0.2"))
        self.assertFalse(zone.counts("192.0.2.1"))

    def test_refusedQueryCodes(self) -> None:
        """
        127.255.255.x is never a listing, even if a pattern would match it.
        """
        self.assertFalse(Zone.parse("bl.example").counts("127.255.255.254"))
        self.assertFalse(Zone.parse("bl.example=127.255.255.[0..255]").counts("127.255.255.252"))

    def test_pattern(self) -> None:
        """
        Postscreen's patterns: N, [A..B] and [A;B;C] per octet.
        """
        zone = Zone.parse("zen.example=127.0.[0;1].[2..11]", 2.0)
        self.assertEqual((zone.name, zone.weight), ("zen.example", 2.0))
        self.assertTrue(zone.counts("127.0.1.4"))
        self.assertFalse(zone.counts("127.0.0.12"))
        self.assertFalse(zone.counts("127.0.2.4"))

    def test_badPattern(self) -> None:
        """
        A malformed pattern is a configuration error naming it.
        """
        for spec in ("bl.example=127.0.0", "bl.example=127.0.0.[x]", "bl.example=127.0.0.300", "=1.2.3.4"):
            self.assertRaises(ConfigError, Zone.parse, spec)


class DNSBLPolicyTests(SynchronousTestCase):
    def test_providesIPolicy(self) -> None:
        from zope.interface.verify import verifyObject

        self.assertTrue(verifyObject(IPolicy, policy(ZoneResolver({}))))

    def test_unlisted(self) -> None:
        """
        A client in no zone continues.
        """
        self.assertEqual(verdictOf(policy(ZoneResolver({}))), CONTINUE)

    def test_listedRefused554NamingZone(self) -> None:
        """
        A listed client is refused 554 5.7.1 with the zone in the reply and
        in the log.
        """
        p = policy(ZoneResolver(listed("bl.example", "127.0.0.2")))
        with capturedLogs() as events:
            verdict = verdictOf(p)
        assert verdict.reply is not None
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (554, "5.7.1"))
        self.assertIn("bl.example", verdict.reply.text)
        self.assertIn(CLIENT, verdict.reply.text)
        self.assertTrue(any(e.get("zones") == "bl.example" for e in events))

    def test_weightsAndThreshold(self) -> None:
        """
        Weights of listing zones add up; below the threshold the client
        continues, at it the client is refused naming every listing zone.
        """
        zones = (Zone("a.example", 0.5), Zone("b.example", 0.5), Zone("c.example", 0.5))
        records = {**listed("a.example", "127.0.0.2")}
        self.assertEqual(verdictOf(policy(ZoneResolver(records), zones=zones)), CONTINUE)
        records.update(listed("b.example", "127.0.0.4"))
        verdict = verdictOf(policy(ZoneResolver(records), zones=zones))
        assert verdict.reply is not None
        self.assertIn("a.example, b.example", verdict.reply.text)

    def test_refusedQueryIsNoListing(self) -> None:
        """
        Spamhaus's "query refused" answers (127.255.255.254: public
        resolver) are not a listing, and are logged as a warning, once an
        hour per zone.
        """
        clock = Clock()
        p = policy(ZoneResolver(listed("bl.example", "127.255.255.254")), clock)
        with capturedLogs() as events:
            self.assertEqual(verdictOf(p), CONTINUE)
            self.assertEqual(verdictOf(p), CONTINUE)
            clock.advance(3600)
            self.assertEqual(verdictOf(p), CONTINUE)
        warnings = [e for e in events if "refused the query" in (e.get("log_format") or "")]
        self.assertEqual(len(warnings), 2, "expected one warning per zone and hour")

    def test_dnsFailureIsNoListing(self) -> None:
        """
        A timeout or SERVFAIL of a zone is temporary: never a refusal; the
        other zones still count, and the failure is not cached.
        """
        resolver = ZoneResolver(listed("b.example", "127.0.0.2"))
        name = queryName(ipaddress.ip_address(CLIENT), "a.example")
        resolver.errors[name] = error.DNSServerError("SERVFAIL")
        p = policy(resolver, zones=(Zone("a.example"), Zone("b.example", 0.5)))
        self.assertEqual(verdictOf(p), CONTINUE)
        resolver.errors[name] = error.DNSQueryTimeoutError(name)
        self.assertEqual(verdictOf(p), CONTINUE)
        self.assertEqual(resolver.queries.count(name), 2)

    def test_allowListWins(self) -> None:
        """
        A client in an allow zone is not refused, however listed, and gets
        an RFC 8904 dnswl=pass result.
        """
        records = {**listed("bl.example", "127.0.0.2"), **listed("wl.example", "127.0.10.2")}
        p = policy(ZoneResolver(records), allowZones=(Zone.parse("wl.example=127.0.[0..255].[1..3]"),))
        verdict = verdictOf(p)
        self.assertIsNone(verdict.reply)
        self.assertEqual(
            verdict.results,
            (AuthResult("dnswl", "pass", None, (("dns.zone", "wl.example"), ("policy.ip", "127.0.10.2"))),),
        )

    def test_allowPatternNotMatching(self) -> None:
        """
        An allow-zone answer outside its pattern allows nothing.
        """
        records = {**listed("bl.example", "127.0.0.2"), **listed("wl.example", "127.0.10.0")}
        p = policy(ZoneResolver(records), allowZones=(Zone.parse("wl.example=127.0.[0..255].[1..3]"),))
        self.assertEqual(verdictOf(p).reply.code, 554)  # type: ignore[union-attr]

    def test_cachedForTTL(self) -> None:
        """
        An answer is reused until its TTL ends, then asked again.
        """
        clock = Clock()
        resolver = ZoneResolver(listed("bl.example", "127.0.0.2", ttl=600))
        p = policy(resolver, clock)
        verdictOf(p)
        clock.advance(599)
        verdictOf(p)
        self.assertEqual(len(resolver.queries), 1)
        clock.advance(1)
        self.assertEqual(verdictOf(p).reply.code, 554)  # type: ignore[union-attr]
        self.assertEqual(len(resolver.queries), 2)

    def test_negativeCachedForSOAMinimum(self) -> None:
        """
        NXDOMAIN is cached for the SOA's negative TTL (RFC 2308).
        """
        clock = Clock()
        resolver = ZoneResolver({}, negativeTTL=120)
        p = policy(resolver, clock)
        verdictOf(p)
        clock.advance(119)
        verdictOf(p)
        self.assertEqual(len(resolver.queries), 1)
        clock.advance(1)
        verdictOf(p)
        self.assertEqual(len(resolver.queries), 2)

    def test_cacheBounded(self) -> None:
        """
        The cache holds at most C{cacheSize} names: a flood of clients
        evicts the oldest.
        """
        p = policy(ZoneResolver({}), cacheSize=10)
        for i in range(50):
            verdictOf(p, Session(listener="smtp", peerHost=f"198.51.100.{i}"))
        self.assertEqual(len(p.cache), 10)

    def test_exemptAndNonIP(self) -> None:
        """
        Exempt networks and peers without an IP address are not looked up.
        """
        resolver = ZoneResolver(listed("bl.example", "127.0.0.2"))
        p = policy(resolver, exempt=(ipaddress.ip_network("192.0.2.0/24"),))
        self.assertEqual(verdictOf(p), CONTINUE)
        self.assertEqual(verdictOf(p, Session(listener="smtp", peerHost="/run/socket")), CONTINUE)
        self.assertEqual(resolver.queries, [])

    def test_throughServer(self) -> None:
        """
        Through the real server a listed client gets 554 instead of the
        greeting.
        """
        p = policy(ZoneResolver(listed("bl.example", "127.0.0.2")))
        connection = connectedServer(policies=[p], peer=CLIENT)
        self.assertEqual(connection.codes(), [554])
        self.assertIn(b"bl.example", connection.transport.value())


class FromConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        return ComponentContext(
            reactor=Clock(), hostname="mx.example.org", dataDir=Path("."), _resolver=ZoneResolver({})
        )

    def test_plugin(self) -> None:
        """
        The bundled plugin is found by name and builds the policy.
        """
        factory = findPlugin(IPolicyFactory, "dnsbl")
        built = factory.fromConfig(
            self.context(),
            "rbl",
            {"zones": {"zen.example=127.0.0.[2..11]": 1, "b.example": 0.5}, "allow_zones": ["wl.example"]},
        )
        assert isinstance(built, DNSBLPolicy)
        self.assertEqual([z.name for z in built.zones], ["zen.example", "b.example"])
        self.assertEqual([z.weight for z in built.zones], [1.0, 0.5])
        self.assertEqual([z.name for z in built.allowZones], ["wl.example"])

    def test_errors(self) -> None:
        """
        Missing zones, a bad weight, a bad pattern and unknown options are
        refused naming the section.
        """
        for options in (
            {},
            {"zones": {"a.example": "heavy"}},
            {"zones": ["a.example=1.2"]},
            {"zones": ["a.example"], "treshold": 2},
        ):
            with self.assertRaises(ConfigError) as caught:
                fromConfig(self.context(), "rbl", options)
            self.assertIn("[policy.rbl]", str(caught.exception))
