"""
Tests for L{mailfw.outbound._policy}: DANE > MTA-STS > the policy table >
REQUIRETLS, with an in-memory validating resolver and MTA-STS source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mailfw.outbound._dane import TLSA, TLSA_TYPE, DNSFailure, SecureAnswer
from mailfw.outbound._mtasts import STSPolicy
from mailfw.outbound._policy import REQUIRETLS_FAILED, TLSPolicy, TLSPolicyResolver
from mailfw.routing._mx import MailHost

HOSTS = (MailHost("mx1.example.net", "192.0.2.1", 10), MailHost("mx2.example.net", "192.0.2.2", 20))
EE = b"\x03\x01\x01" + b"a" * 32


class MemoryDNSSEC:
    """
    A validating resolver in memory: C{zone} maps (name, type) to
    (records, authenticated); C{broken} names fail.
    """

    def __init__(
        self, zone: dict[tuple[str, int], tuple[list[Any], bool]], broken: frozenset[str] = frozenset()
    ) -> None:
        self.zone = zone
        self.broken = broken
        self.asked: list[tuple[str, int]] = []

    def query(self, name: str, kind: int) -> Deferred[SecureAnswer]:
        self.asked.append((name, kind))
        if name in self.broken:
            return fail(DNSFailure("SERVFAIL"))
        records, ad = self.zone.get((name, kind), ([], True))
        return succeed(SecureAnswer(tuple(dns.UnknownRecord(r) for r in records), ad))


class MemorySTS:
    def __init__(self, policies: dict[str, STSPolicy]) -> None:
        self.policies = policies

    def policyFor(self, domain: str) -> Deferred[STSPolicy | None]:
        return succeed(self.policies.get(domain))


SECURE_MX = {("example.net", dns.MX): ([b"mx"], True)}
ENFORCE = STSPolicy("enforce", ("mx1.example.net",), 86400, "one")
TESTING = STSPolicy("testing", ("mx1.example.net",), 86400, "one")


class PolicyTests(SynchronousTestCase):
    def resolve(
        self,
        dnssec: MemoryDNSSEC | None = None,
        sts: dict[str, STSPolicy] | None = None,
        level: str = "auto",
        table: dict[str, str] | None = None,
        nexthop: str = "example.net",
        **kw: Any,
    ) -> TLSPolicy:
        resolver = TLSPolicyResolver(
            Clock(),
            level,
            table,
            dnssec,
            MemorySTS(sts or {}),  # type: ignore[arg-type]
        )
        return self.successResultOf(resolver.policyFor(nexthop, HOSTS, 25, **kw))

    def test_opportunisticByDefault(self) -> None:
        policy = self.resolve()
        self.assertEqual((policy.source, policy.forHost("mx1.example.net").level), ("table", "may"))
        self.assertIn("no DANE or MTA-STS", policy.why)

    def test_daneBeatsMTASTS(self) -> None:
        """
        Authenticated TLSA records make their host C{dane}, even when an
        MTA-STS policy exists (RFC 8461 2); a host without TLSA records
        stays opportunistic.
        """
        zone = dict(SECURE_MX)
        zone[("_25._tcp.mx1.example.net", TLSA_TYPE)] = ([EE], True)
        policy = self.resolve(MemoryDNSSEC(zone), {"example.net": ENFORCE})
        self.assertEqual(policy.source, "dane")
        mx1 = policy.forHost("mx1.example.net")
        self.assertEqual((mx1.level, mx1.tlsa), ("dane", (TLSA(3, 1, 1, b"a" * 32),)))
        self.assertEqual(mx1.names, ("mx1.example.net", "example.net"))
        self.assertEqual(policy.forHost("mx2.example.net").level, "may")

    def test_unauthenticatedIgnored(self) -> None:
        """
        TLSA records without the AD bit, or under an unsigned MX RRset, are
        not DANE; MTA-STS then applies.
        """
        zone = {
            ("example.net", dns.MX): ([b"mx"], False),
            ("_25._tcp.mx1.example.net", TLSA_TYPE): ([EE], True),
        }
        self.assertEqual(self.resolve(MemoryDNSSEC(zone), {"example.net": ENFORCE}).source, "mta-sts")
        zone = dict(SECURE_MX)
        zone[("_25._tcp.mx1.example.net", TLSA_TYPE)] = ([EE], False)
        self.assertEqual(self.resolve(MemoryDNSSEC(zone)).source, "table")

    def test_unusableRecordsMeanEncrypt(self) -> None:
        """
        Only unusable TLSA records (PKIX-EE here): TLS mandatory, not
        authenticated (RFC 7672 2.2).
        """
        zone = dict(SECURE_MX)
        zone[("_25._tcp.mx1.example.net", TLSA_TYPE)] = ([b"\x01\x01\x01" + b"a" * 32], True)
        self.assertEqual(self.resolve(MemoryDNSSEC(zone)).forHost("mx1.example.net").level, "encrypt")

    def test_addressLiteralHasNoTLSA(self) -> None:
        """
        A fixed next hop given as an IP address is never looked up.
        """
        dnssec = MemoryDNSSEC({})
        resolver = TLSPolicyResolver(Clock(), "auto", None, dnssec, None)
        d = resolver.policyFor("[192.0.2.7]:2525", (MailHost("192.0.2.7", "192.0.2.7"),), 2525)
        self.assertEqual(self.successResultOf(d).source, "table")
        self.assertEqual(dnssec.asked, [])

    def test_tlsaLookupFailureSkipsHost(self) -> None:
        zone = dict(SECURE_MX)
        zone[("_25._tcp.mx2.example.net", TLSA_TYPE)] = ([EE], True)
        policy = self.resolve(MemoryDNSSEC(zone, frozenset({"_25._tcp.mx1.example.net"})))
        refusal = policy.forHost("mx1.example.net").refusal
        assert refusal is not None
        self.assertEqual((refusal.code, refusal.enhanced), (451, "4.7.5"))
        self.assertIsNone(policy.forHost("mx2.example.net").refusal)

    def test_mtaSTSEnforce(self) -> None:
        """
        An enforced policy: listed hosts need a verified certificate, the
        others are refused with a 4.7.5 (the mail waits).
        """
        policy = self.resolve(sts={"example.net": ENFORCE})
        self.assertEqual(policy.forHost("mx1.example.net").level, "verify")
        refusal = policy.forHost("mx2.example.net").refusal
        assert refusal is not None
        self.assertEqual(refusal.enhanced, "4.7.5")
        self.assertTrue(refusal.isTransient)

    def test_mtaSTSTesting(self) -> None:
        policy = self.resolve(sts={"example.net": TESTING})
        self.assertEqual(policy.forHost("mx2.example.net").level, "may")
        self.assertIsNone(policy.forHost("mx2.example.net").refusal)

    def test_table(self) -> None:
        """
        A tls_policy entry applies where nothing is published; C{dane} or
        C{mta-sts} there make that mechanism mandatory.
        """
        self.assertEqual(
            self.resolve(table={"example.net": "verify"}).forHost("mx1.example.net").level, "verify"
        )
        self.assertEqual(self.resolve(level="encrypt").forHost("mx1.example.net").level, "encrypt")
        fixed = self.resolve(table={"[relay.example]": "none"}, nexthop="[relay.example]:2525")
        self.assertEqual(fixed.level, "none")
        for level in ("dane", "mta-sts"):
            policy = self.resolve(table={"example.net": level})
            assert policy.failure is not None
            self.assertEqual(policy.failure.enhanced, "4.7.5")

    def test_requireTLSNeedsVerified(self) -> None:
        """
        REQUIRETLS mail: no verified mechanism means 5.7.30 for all; under
        DANE the hosts without TLSA are refused; MTA-STS testing counts as
        enforce (RFC 8689 4.2.1).
        """
        self.assertIs(self.resolve(requireTLS=True).failure, REQUIRETLS_FAILED)
        zone = dict(SECURE_MX)
        zone[("_25._tcp.mx1.example.net", TLSA_TYPE)] = ([EE], True)
        policy = self.resolve(MemoryDNSSEC(zone), requireTLS=True)
        self.assertIsNone(policy.failure)
        self.assertIsNone(policy.forHost("mx1.example.net").refusal)
        self.assertIs(policy.forHost("mx2.example.net").refusal, REQUIRETLS_FAILED)
        testing = self.resolve(sts={"example.net": TESTING}, requireTLS=True)
        self.assertEqual(testing.forHost("mx1.example.net").level, "verify")
        self.assertIsNotNone(testing.forHost("mx2.example.net").refusal)
        self.assertIsNone(self.resolve(level="verify", requireTLS=True).failure)

    def test_optOut(self) -> None:
        """
        C{TLS-Required: No} switches DANE and MTA-STS off (at most
        opportunistic), but not for a REQUIRETLS message.
        """
        policy = self.resolve(sts={"example.net": ENFORCE}, optOut=True)
        self.assertEqual((policy.source, policy.forHost("mx2.example.net").level), ("opt-out", "may"))
        self.assertEqual(self.resolve(table={"example.net": "none"}, optOut=True).level, "none")
        both = self.resolve(sts={"example.net": ENFORCE}, optOut=True, requireTLS=True)
        self.assertEqual(both.source, "mta-sts")


class ConfigTests(SynchronousTestCase):
    def load(self, text: str) -> Any:
        from mailfw.config import loadConfig

        path = Path(self.mktemp())
        path.write_text(text)
        return loadConfig(str(path))

    def test_dnssec(self) -> None:
        """
        C{[dns] dnssec = "trust-ad"} reaches the components' context; it
        needs the (local validating) name servers named.
        """
        from mailfw.config import ConfigError

        config = self.load('[dns]\nnameservers = ["127.0.0.1"]\ndnssec = "trust-ad"\n')
        self.assertEqual(config.context(None).dnssec, "trust-ad")
        self.assertEqual(self.load("").context(None).dnssec, "off")
        with self.assertRaises(ConfigError) as raised:
            self.load('[dns]\ndnssec = "trust-ad"\n')
        self.assertIn("needs nameservers", str(raised.exception))
        self.assertRaises(ConfigError, self.load, '[dns]\ndnssec = "yes"\n')

    def test_relayOptions(self) -> None:
        """
        The agent's C{tls} defaults to C{auto}; C{tls_policy} entries are
        checked (next hop syntax, level) and reach the resolver.
        """
        from mailfw.config import ComponentContext, ConfigError
        from mailfw.delivery._relay import fromConfig

        context = ComponentContext(
            Clock(), "relay.example", Path(self.mktemp()), nameservers=(("127.0.0.1", 53),)
        )
        agent = fromConfig(context, "out", {"plugin": "smtp-relay", "tls_policy": {"Example.NET": "dane"}})
        assert agent.tlsPolicy is not None
        self.assertEqual(agent.tlsPolicy.level, "auto")
        self.assertEqual(agent.tlsPolicy.table, {"example.net": "dane"})
        self.assertIsNone(agent.tlsPolicy.dnssec)
        for bad in ({"example.net": "strict"}, {"[bad": "may"}):
            self.assertRaises(
                ConfigError, fromConfig, context, "out", {"plugin": "smtp-relay", "tls_policy": bad}
            )
