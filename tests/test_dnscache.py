"""
Tests for L{mailfw._dnscache}: the answer cache in front of the server's
twisted.names client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from mailfw._dnscache import MAX_NEGATIVE_TTL, MAX_TTL, CachingResolver


def _txt(name: bytes, text: bytes, ttl: int) -> dns.RRHeader:
    return dns.RRHeader(name, dns.TXT, dns.IN, ttl, dns.Record_TXT(text, ttl=ttl))


def _soa(ttl: int, minimum: int) -> dns.RRHeader:
    return dns.RRHeader(
        b"example.com",
        dns.SOA,
        dns.IN,
        ttl,
        dns.Record_SOA(b"ns.example.com", b"root.example.com", minimum=minimum),
    )


class FakeUpstream:
    """
    Answers each question with what C{answers} says for its name, and
    counts the questions.
    """

    def __init__(self) -> None:
        self.answers: dict[bytes, Any] = {}
        self.asked: list[tuple[bytes, int]] = []

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred[Any]:
        self.asked.append((query.name.name, query.type))
        answer = self.answers[query.name.name.lower()]
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


class CachingResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = FakeUpstream()
        self.resolver = CachingResolver(self.upstream, self.clock, size=3)

    def lookup(self, name: bytes) -> Any:
        return self.successResultOf(self.resolver.lookupText(name))

    def test_answerKeptForItsSmallestTTL(self) -> None:
        """
        An answer is served from the cache until its smallest TTL ends,
        with the time its records have left; then the name server is
        asked again.
        """
        records = [_txt(b"example.com", b"v=spf1 -all", 300), _txt(b"example.com", b"other", 60)]
        self.upstream.answers[b"example.com"] = (records, [], [])
        self.assertEqual(self.lookup(b"example.com")[0], records)
        self.clock.advance(45)
        answers, _, _ = self.lookup(b"EXAMPLE.com")
        self.assertEqual([r.ttl for r in answers], [255, 15])
        self.assertEqual([r.payload.data for r in answers], [[b"v=spf1 -all"], [b"other"]])
        self.assertEqual(len(self.upstream.asked), 1, "the second question went to the name server")
        self.clock.advance(15)
        self.lookup(b"example.com")
        self.assertEqual(len(self.upstream.asked), 2)

    def test_typesApart(self) -> None:
        """
        The answer for one type does not answer another.
        """
        self.upstream.answers[b"example.com"] = ([_txt(b"example.com", b"x", 300)], [], [])
        self.lookup(b"example.com")
        self.successResultOf(self.resolver.lookupMailExchange(b"example.com"))
        self.assertEqual(self.upstream.asked, [(b"example.com", dns.TXT), (b"example.com", dns.MX)])

    def test_zeroTTLNotKept(self) -> None:
        self.upstream.answers[b"example.com"] = ([_txt(b"example.com", b"x", 0)], [], [])
        self.lookup(b"example.com")
        self.lookup(b"example.com")
        self.assertEqual(len(self.upstream.asked), 2)

    def test_longTTLCapped(self) -> None:
        """
        No answer is kept longer than L{MAX_TTL}.
        """
        self.upstream.answers[b"example.com"] = ([_txt(b"example.com", b"x", 10 * MAX_TTL)], [], [])
        self.lookup(b"example.com")
        self.clock.advance(MAX_TTL - 1)
        self.lookup(b"example.com")
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.lookup(b"example.com")
        self.assertEqual(len(self.upstream.asked), 2)

    def test_noSuchNameKeptForTheNegativeTTL(self) -> None:
        """
        NXDOMAIN is kept for the smaller of the SOA's TTL and MINIMUM (RFC
        2308), and the cached failure is the same error.
        """
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(ttl=600, minimum=120)]
        self.upstream.answers[b"gone.example.com"] = error.DNSNameError(message)
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.clock.advance(119)
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 2)

    def test_negativeTTLCapped(self) -> None:
        message = dns.Message(rCode=dns.ENAME)
        message.authority = [_soa(ttl=10 * MAX_NEGATIVE_TTL, minimum=10 * MAX_NEGATIVE_TTL)]
        self.upstream.answers[b"gone.example.com"] = error.DNSNameError(message)
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.clock.advance(MAX_NEGATIVE_TTL)
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 2)

    def test_noSuchNameWithoutSOANotKept(self) -> None:
        self.upstream.answers[b"gone.example.com"] = error.DNSNameError(dns.Message(rCode=dns.ENAME))
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.failureResultOf(self.resolver.lookupText(b"gone.example.com"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 2)

    def test_emptyAnswerKeptForTheNegativeTTL(self) -> None:
        """
        A name without records of the type (NODATA) is kept like NXDOMAIN;
        without an SOA it is not kept.
        """
        self.upstream.answers[b"nodata.example.com"] = ([], [_soa(ttl=60, minimum=30)], [])
        self.upstream.answers[b"bare.example.com"] = ([], [], [])
        for name in (b"nodata.example.com", b"bare.example.com") * 2:
            self.assertEqual(self.lookup(name)[0], [])
        self.assertEqual(
            sorted(self.upstream.asked),
            [(b"bare.example.com", dns.TXT)] * 2 + [(b"nodata.example.com", dns.TXT)],
        )

    def test_temporaryFailureNotKept(self) -> None:
        """
        SERVFAIL and timeouts are asked again at once.
        """
        self.upstream.answers[b"broken.example.com"] = error.DNSServerError(dns.Message(rCode=dns.ESERVER))
        for _ in range(2):
            self.failureResultOf(self.resolver.lookupText(b"broken.example.com"), error.DNSServerError)
        self.assertEqual(len(self.upstream.asked), 2)

    def test_bounded(self) -> None:
        """
        At most C{size} answers are kept, the least recently used forgotten
        first.
        """
        for name in (b"a.example", b"b.example", b"c.example", b"d.example"):
            self.upstream.answers[name] = ([_txt(name, b"x", 300)], [], [])
            self.lookup(name)
        self.assertEqual(len(self.resolver._cache), 3)
        self.lookup(b"a.example")
        self.assertEqual(self.upstream.asked.count((b"a.example", dns.TXT)), 2)
        self.lookup(b"d.example")
        self.assertEqual(self.upstream.asked.count((b"d.example", dns.TXT)), 1)


class SharedResolverTests(SynchronousTestCase):
    def test_serverContextCaches(self) -> None:
        """
        The context a server builds gives every component one resolver,
        behind the answer cache.
        """
        from mailfw.config import ServerConfig
        from mailfw.tap import _answerCache

        clock = Clock()
        config = ServerConfig(
            hostname="mx.example", dataDir=Path(self.mktemp()), listen={}, nameservers=(("127.0.0.1", 53),)
        )
        context = config.context(clock, _answerCache(clock))
        resolver = context.resolver()
        self.assertIsInstance(resolver, CachingResolver)
        self.assertIs(context.resolver(), resolver)
        self.assertNotIsInstance(config.context(clock).resolver(), CachingResolver)
