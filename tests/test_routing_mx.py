"""
Tests for L{mailfw.routing._mx}: MX resolution with an in-memory resolver.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from mailfw.reply import SMTPReply
from mailfw.routing._mx import (
    DNS_FAILURE,
    NO_ADDRESS,
    NO_MAIL_HOST,
    NO_SUCH_DOMAIN,
    NULL_MX,
    MailHost,
    MXResolver,
    Resolution,
)
from mailfw.testing import AAAA, CNAME, MX, A, FakeResolver


def resolve(zone: dict[str, list[Any]], domain: str, **kw: Any) -> tuple[Resolution, FakeResolver]:
    errors = kw.pop("errors", None)
    chase = kw.pop("chase", False)
    fake = FakeResolver(zone, errors, chase)
    resolver = MXResolver(fake, random=kw.pop("random", random.Random(0)), **kw)
    d = resolver.resolveDomain(domain)
    return SynchronousTestCase().successResultOf(d), fake


class OrderingTests(SynchronousTestCase):
    def test_preferenceOrder(self) -> None:
        """
        Hosts are tried in increasing preference, whatever the answer order.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(20, "mx2.example.com"), MX(10, "mx1.example.com")],
            "mx1.example.com": [A("192.0.2.1")],
            "mx2.example.com": [A("192.0.2.2")],
        }
        result, _ = resolve(zone, "example.com")
        self.assertEqual(
            result,
            Resolution(
                (
                    MailHost("mx1.example.com", "192.0.2.1", 10),
                    MailHost("mx2.example.com", "192.0.2.2", 20),
                )
            ),
        )

    def test_equalPreferenceShuffled(self) -> None:
        """
        Hosts of equal preference come in an order chosen by the injected
        random source: deterministic for one seed, varying across seeds.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(10, f"mx{i}.example.com") for i in range(4)] + [MX(5, "first.example.com")],
            "first.example.com": [A("192.0.2.100")],
        }
        for i in range(4):
            zone[f"mx{i}.example.com"] = [A(f"192.0.2.{i}")]
        orders = set()
        for seed in range(20):
            result, _ = resolve(zone, "example.com", random=random.Random(seed))
            self.assertEqual(result.hosts[0].name, "first.example.com")
            self.assertEqual({h.preference for h in result.hosts[1:]}, {10})
            orders.add(tuple(h.name for h in result.hosts))
        again, _ = resolve(zone, "example.com", random=random.Random(3))
        first, _ = resolve(zone, "example.com", random=random.Random(3))
        self.assertEqual(again, first)
        self.assertGreater(len(orders), 1)

    def test_familiesOrder(self) -> None:
        """
        Each host's IPv6 addresses come before its IPv4 ones by default;
        C{families} can reverse or restrict that.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(10, "mx.example.com")],
            "mx.example.com": [A("192.0.2.1"), AAAA("2001:DB8::1")],
        }
        result, _ = resolve(zone, "example.com")
        self.assertEqual([h.address for h in result.hosts], ["2001:db8::1", "192.0.2.1"])
        result, _ = resolve(zone, "example.com", families=("ipv4", "ipv6"))
        self.assertEqual([h.address for h in result.hosts], ["192.0.2.1", "2001:db8::1"])
        result, fake = resolve(zone, "example.com", families=("ipv4",))
        self.assertEqual([h.address for h in result.hosts], ["192.0.2.1"])
        self.assertNotIn(("mx.example.com", dns.AAAA), fake.queries)

    def test_badFamily(self) -> None:
        """
        An unknown address family is refused when building the resolver.
        """
        self.assertRaises(ValueError, MXResolver, FakeResolver({}), families=("ipx",))

    def test_maxAddresses(self) -> None:
        """
        At most C{maxAddresses} addresses are returned, and MX hosts beyond
        them are not even looked up.
        """
        zone: dict[str, list[Any]] = {"example.com": [MX(i, f"mx{i}.example.com") for i in range(10)]}
        for i in range(10):
            zone[f"mx{i}.example.com"] = [A(f"192.0.2.{i}")]
        result, fake = resolve(zone, "example.com", maxAddresses=3)
        self.assertEqual([h.address for h in result.hosts], ["192.0.2.0", "192.0.2.1", "192.0.2.2"])
        self.assertNotIn(("mx5.example.com", dns.A), fake.queries)

    def test_duplicateExchange(self) -> None:
        """
        An exchange listed twice at one preference is tried once.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(10, "mx.example.com"), MX(10, "MX.example.com")],
            "mx.example.com": [A("192.0.2.1")],
        }
        result, _ = resolve(zone, "example.com")
        self.assertEqual(len(result.hosts), 1)


class ImplicitMXTests(SynchronousTestCase):
    def test_noMX(self) -> None:
        """
        A domain with no MX records is its own mail host (AAAA and A).
        """
        zone: dict[str, list[Any]] = {"example.com": [A("192.0.2.7"), AAAA("2001:db8::7")]}
        result, _ = resolve(zone, "example.com")
        self.assertEqual(
            result.hosts,
            (MailHost("example.com", "2001:db8::7"), MailHost("example.com", "192.0.2.7")),
        )

    def test_noAddressEither(self) -> None:
        """
        A domain that exists but has neither MX nor addresses gets a
        permanent 5.1.2.
        """
        result, _ = resolve({"example.com": [dns.Record_TXT(b"hello")]}, "example.com")
        self.assertEqual(result, Resolution(failure=NO_MAIL_HOST))
        self.assertEqual(NO_MAIL_HOST.code // 100, 5)

    def test_addressLookupTimeout(self) -> None:
        """
        A timeout looking up the implicit MX's addresses is transient.
        """
        zone: dict[str, list[Any]] = {"example.com": [dns.Record_TXT(b"x")]}
        errors = {
            ("example.com", dns.A): error.DNSQueryTimeoutError(None),
            ("example.com", dns.AAAA): error.DNSQueryTimeoutError(None),
        }
        result, _ = resolve(zone, "example.com", errors=errors)
        self.assertEqual(result, Resolution(failure=DNS_FAILURE))

    def test_oneFamilyFails(self) -> None:
        """
        If one family's lookup fails but the other gives addresses, those
        are used.
        """
        zone: dict[str, list[Any]] = {"example.com": [A("192.0.2.7")]}
        errors = {("example.com", dns.AAAA): error.DNSServerError(None)}
        result, _ = resolve(zone, "example.com", errors=errors)
        self.assertEqual(result.hosts, (MailHost("example.com", "192.0.2.7"),))


class NullMXTests(SynchronousTestCase):
    def test_nullMX(self) -> None:
        """
        A single C{0 .} MX is a permanent 556 5.1.10, and no address is
        looked up.
        """
        result, fake = resolve({"example.com": [MX(0, ".")]}, "example.com")
        self.assertEqual(result, Resolution(failure=NULL_MX))
        self.assertEqual(NULL_MX.code, 556)
        self.assertEqual(NULL_MX.enhanced, "5.1.10")
        self.assertEqual(fake.queries, [("example.com", dns.MX)])

    def test_nullMXAmongOthers(self) -> None:
        """
        A C{.} exchange mixed with real ones (against RFC 7505) is skipped.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(0, "."), MX(10, "mx.example.com")],
            "mx.example.com": [A("192.0.2.1")],
        }
        result, _ = resolve(zone, "example.com")
        self.assertEqual(result.hosts, (MailHost("mx.example.com", "192.0.2.1", 10),))


class FailureTests(SynchronousTestCase):
    def test_nxdomain(self) -> None:
        """
        A domain that does not exist is a permanent 5.1.2.
        """
        result, _ = resolve({}, "nowhere.example")
        self.assertEqual(result, Resolution(failure=NO_SUCH_DOMAIN))
        self.assertEqual((NO_SUCH_DOMAIN.code, NO_SUCH_DOMAIN.enhanced), (550, "5.1.2"))

    def test_servfail(self) -> None:
        """
        SERVFAIL on the MX query is transient 4.4.3.
        """
        errors = {("example.com", dns.MX): error.DNSServerError(None)}
        result, _ = resolve({"example.com": []}, "example.com", errors=errors)
        self.assertEqual(result, Resolution(failure=DNS_FAILURE))
        self.assertEqual((DNS_FAILURE.code, DNS_FAILURE.enhanced), (451, "4.4.3"))

    def test_timeout(self) -> None:
        """
        A DNS timeout on the MX query is transient 4.4.3.
        """
        errors = {("example.com", dns.MX): error.DNSQueryTimeoutError(None)}
        result, _ = resolve({"example.com": []}, "example.com", errors=errors)
        self.assertEqual(result, Resolution(failure=DNS_FAILURE))

    def test_refusedAndOddErrors(self) -> None:
        """
        REFUSED and unexpected exceptions are transient, not bugs.
        """
        for problem in (error.DNSQueryRefusedError(None), OSError("no servers"), ValueError("?")):
            errors = {("example.com", dns.MX): problem}
            result, _ = resolve({"example.com": []}, "example.com", errors=errors)
            self.assertEqual(result, Resolution(failure=DNS_FAILURE), problem)

    def test_pending(self) -> None:
        """
        The result waits for the DNS answer.
        """
        pending: Deferred[Any] = Deferred()
        fake = FakeResolver({}, {("example.com", dns.MX): pending})
        d = MXResolver(fake).resolveDomain("example.com")
        self.assertNoResult(d)
        pending.errback(error.DNSQueryTimeoutError(None))
        self.assertEqual(self.successResultOf(d), Resolution(failure=DNS_FAILURE))

    def test_firstMXHostMissing(self) -> None:
        """
        An MX host that does not exist is skipped; the next one is used.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(10, "gone.example.com"), MX(20, "mx.example.com")],
            "mx.example.com": [A("192.0.2.2")],
        }
        result, _ = resolve(zone, "example.com")
        self.assertEqual(result.hosts, (MailHost("mx.example.com", "192.0.2.2", 20),))

    def test_allMXHostsMissing(self) -> None:
        """
        When no MX host has an address the failure is transient (a broken
        zone is fixed by its owner).
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(10, "gone.example.com"), MX(20, "empty.example.com")],
            "empty.example.com": [],
        }
        result, _ = resolve(zone, "example.com")
        self.assertEqual(result, Resolution(failure=NO_ADDRESS))
        self.assertTrue(NO_ADDRESS.isTransient)

    def test_MXHostLookupTimeout(self) -> None:
        """
        A timeout on every MX host's addresses is a transient DNS failure.
        """
        zone: dict[str, list[Any]] = {"example.com": [MX(10, "mx.example.com")], "mx.example.com": []}
        errors = {
            ("mx.example.com", dns.A): error.DNSQueryTimeoutError(None),
            ("mx.example.com", dns.AAAA): error.DNSQueryTimeoutError(None),
        }
        result, _ = resolve(zone, "example.com", errors=errors)
        self.assertEqual(result, Resolution(failure=DNS_FAILURE))


class CNAMETests(SynchronousTestCase):
    def test_domainIsAlias(self) -> None:
        """
        A domain that is a CNAME uses the MX records of its target, asked for
        in a second query when the server does not chase the alias.
        """
        zone: dict[str, list[Any]] = {
            "alias.example": [CNAME("real.example")],
            "real.example": [MX(10, "mx.real.example")],
            "mx.real.example": [A("192.0.2.9")],
        }
        for chase in (False, True):
            result, fake = resolve(zone, "alias.example", chase=chase)
            self.assertEqual(result.hosts, (MailHost("mx.real.example", "192.0.2.9", 10),))
            self.assertEqual(("real.example", dns.MX) in fake.queries, not chase)

    def test_aliasImplicitMX(self) -> None:
        """
        An alias whose target has no MX gets the target's addresses.
        """
        zone: dict[str, list[Any]] = {
            "alias.example": [CNAME("real.example")],
            "real.example": [A("192.0.2.3")],
        }
        result, _ = resolve(zone, "alias.example", families=("ipv4",))
        self.assertEqual(result.hosts, (MailHost("real.example", "192.0.2.3"),))

    def test_MXHostIsAlias(self) -> None:
        """
        An MX exchange that is a CNAME (against RFC 2181) still resolves.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(10, "mail.example.com")],
            "mail.example.com": [CNAME("host.example.net")],
            "host.example.net": [A("192.0.2.4")],
        }
        result, _ = resolve(zone, "example.com", families=("ipv4",))
        self.assertEqual(result.hosts, (MailHost("mail.example.com", "192.0.2.4", 10),))

    def test_loop(self) -> None:
        """
        A CNAME loop is a transient failure, not a hang.
        """
        zone: dict[str, list[Any]] = {"a.example": [CNAME("b.example")], "b.example": [CNAME("a.example")]}
        result, fake = resolve(zone, "a.example")
        self.assertEqual(result, Resolution(failure=DNS_FAILURE))
        self.assertLess(len(fake.queries), 20)

    def test_aliasToNowhere(self) -> None:
        """
        A CNAME to a name that does not exist is a permanent 5.1.2.
        """
        zone: dict[str, list[Any]] = {"alias.example": [CNAME("gone.example")]}
        result, _ = resolve(zone, "alias.example")
        self.assertEqual(result, Resolution(failure=NO_SUCH_DOMAIN))


class NexthopTests(SynchronousTestCase):
    def test_fixedHost(self) -> None:
        """
        C{[host]:port} resolves the host's addresses without any MX lookup.
        """
        fake = FakeResolver({"smtp.example.net": [A("192.0.2.25")]})
        d = MXResolver(fake, families=("ipv4",)).resolve("[smtp.example.net]:587")
        self.assertEqual(self.successResultOf(d), Resolution((MailHost("smtp.example.net", "192.0.2.25"),)))
        self.assertEqual(fake.queries, [("smtp.example.net", dns.A)])

    def test_fixedAddress(self) -> None:
        """
        C{[192.0.2.1]} needs no DNS at all.
        """
        fake = FakeResolver({})
        d = MXResolver(fake).resolve("[192.0.2.1]")
        self.assertEqual(self.successResultOf(d), Resolution((MailHost("192.0.2.1", "192.0.2.1"),)))
        self.assertEqual(fake.queries, [])

    def test_fixedHostMissingIsTransient(self) -> None:
        """
        A configured host that does not resolve defers instead of bouncing.
        """
        d = MXResolver(FakeResolver({})).resolve("[gone.example]")
        self.assertEqual(self.successResultOf(d), Resolution(failure=DNS_FAILURE))

    def test_domain(self) -> None:
        """
        A bare domain next hop means an MX lookup of that domain.
        """
        zone: dict[str, list[Any]] = {
            "example.com": [MX(1, "mx.example.com")],
            "mx.example.com": [A("192.0.2.1")],
        }
        fake = FakeResolver(zone)
        d = MXResolver(fake, families=("ipv4",)).resolve("example.com")
        self.assertEqual(self.successResultOf(d).hosts, (MailHost("mx.example.com", "192.0.2.1", 1),))

    def test_replyValues(self) -> None:
        """
        Every failure reply is a valid SMTP reply of the intended class.
        """
        for reply, permanent in (
            (NULL_MX, True),
            (NO_SUCH_DOMAIN, True),
            (NO_MAIL_HOST, True),
            (DNS_FAILURE, False),
            (NO_ADDRESS, False),
        ):
            self.assertIsInstance(reply, SMTPReply)
            self.assertEqual(reply.isPermanent, permanent)
