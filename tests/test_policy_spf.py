"""
The C{spf} policy: pyspf's evaluation, fed by the server's resolver.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.envelope import Session
from mailfw.policy import AuthResult, Verdict
from mailfw.policy._spf import SPFPolicy, fromConfig
from mailfw.testing import MX, A, FakeResolver, PolicyContractTests

SESSION = Session(listener="smtp", peerHost="192.0.2.1", helo="mail.example.net", esmtp=True)
SENDER = Address.parse("alice@example.net")


def TXT(text: str) -> dns.Record_TXT:
    return dns.Record_TXT(text.encode("ascii"))


def synchronously(f: Any) -> Any:
    """
    A blocking call into the "reactor" for tests: the resolver's Deferreds
    fire at once.
    """
    results: list[Any] = []
    f().addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result


def makePolicy(zone: dict[str, list[Any]], errors: Any = None, **kw: Any) -> SPFPolicy:
    resolver = FakeResolver(zone, errors or {})
    return SPFPolicy("spf", resolver, lambda work: maybeDeferred(work), synchronously, "mx.example.org", **kw)


class SPFTests(SynchronousTestCase):
    def check(
        self, policy: SPFPolicy, session: Session = SESSION, sender: Address | None = SENDER
    ) -> Verdict:
        answer = policy.checkSender(session, sender, {})
        verdict: Verdict = self.successResultOf(answer) if isinstance(answer, Deferred) else answer
        return verdict

    def result(self, verdict: Verdict) -> AuthResult:
        [result] = verdict.results
        self.assertEqual(result.method, "spf")
        return result

    def test_pass(self) -> None:
        """
        A client inside the sender domain's record passes; the result names
        the MAIL FROM identity.
        """
        policy = makePolicy({"example.net": [TXT("v=spf1 ip4:192.0.2.0/24 -all")]})
        verdict = self.check(policy)
        self.assertIsNone(verdict.reply)
        result = self.result(verdict)
        self.assertEqual(result.result, "pass")
        self.assertEqual(result.properties, (("smtp.mailfrom", "alice@example.net"),))

    def test_includeRedirectAndMX(self) -> None:
        """
        include, redirect and mx mechanisms are followed through the
        resolver.
        """
        zone: dict[str, list[Any]] = {
            "example.net": [TXT("v=spf1 include:_spf.example.net -all")],
            "_spf.example.net": [TXT("v=spf1 redirect=_mx.example.net")],
            "_mx.example.net": [TXT("v=spf1 mx -all"), MX(10, "mail.example.net")],
            "mail.example.net": [A("192.0.2.1")],
        }
        self.assertEqual(self.result(self.check(makePolicy(zone))).result, "pass")

    def test_failMarkedByDefault(self) -> None:
        """
        A client outside the record fails; by default that is only
        recorded.
        """
        policy = makePolicy({"example.net": [TXT("v=spf1 ip4:198.51.100.0/24 -all")]})
        verdict = self.check(policy)
        self.assertIsNone(verdict.reply)
        self.assertEqual(self.result(verdict).result, "fail")

    def test_failRejected(self) -> None:
        """
        With C{fail = "reject"} a fail is refused with 550 5.7.23.
        """
        policy = makePolicy({"example.net": [TXT("v=spf1 -all")]}, fail="reject")
        verdict = self.check(policy)
        assert verdict.reply is not None
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (550, "5.7.23"))
        self.assertEqual(self.result(verdict).result, "fail")

    def test_softfailAndNeutral(self) -> None:
        """
        ~all and ?all give softfail and neutral, never a refusal.
        """
        for record, expected in (("v=spf1 ~all", "softfail"), ("v=spf1 ?all", "neutral")):
            policy = makePolicy({"example.net": [TXT(record)]}, fail="reject")
            verdict = self.check(policy)
            self.assertIsNone(verdict.reply)
            self.assertEqual(self.result(verdict).result, expected)

    def test_none(self) -> None:
        """
        A domain without a record gives none.
        """
        self.assertEqual(
            self.result(self.check(makePolicy({"example.net": [A("192.0.2.9")]}))).result, "none"
        )

    def test_dnsFailureIsTemporary(self) -> None:
        """
        SERVFAIL or a timeout is temperror, recorded but not refused; with
        C{temperror = "defer"} it is 451 4.4.3, never a 5xx.
        """
        for problem in (error.DNSServerError("servfail"), error.DNSQueryTimeoutError("example.net")):
            errors = {("example.net", dns.TXT): problem}
            verdict = self.check(makePolicy({}, errors))
            self.assertIsNone(verdict.reply)
            self.assertEqual(self.result(verdict).result, "temperror")
            verdict = self.check(makePolicy({}, errors, temperror="defer", fail="reject"))
            assert verdict.reply is not None
            self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (451, "4.4.3"))

    def test_lookupLimit(self) -> None:
        """
        More than 10 mechanisms that query DNS is permerror (RFC 7208
        4.6.4).
        """
        includes = " ".join(f"include:i{n}.example.net" for n in range(11))
        zone: dict[str, list[Any]] = {"example.net": [TXT(f"v=spf1 {includes} -all")]}
        for n in range(11):
            zone[f"i{n}.example.net"] = [TXT("v=spf1 ip4:203.0.113.1 -all")]
        self.assertEqual(self.result(self.check(makePolicy(zone))).result, "permerror")

    def test_voidLookupLimit(self) -> None:
        """
        More than two lookups that find nothing is permerror.
        """
        record = "v=spf1 a:v1.example.net a:v2.example.net a:v3.example.net -all"
        zone = {"example.net": [TXT(record)]}
        self.assertEqual(self.result(self.check(makePolicy(zone))).result, "permerror")

    def test_malformedRecord(self) -> None:
        """
        A record that does not parse is permerror, not a crash.
        """
        zone = {"example.net": [TXT("v=spf1 ip4:300.1.1.1 frobnicate -all")]}
        self.assertEqual(self.result(self.check(makePolicy(zone))).result, "permerror")

    def test_nullSenderUsesHelo(self) -> None:
        """
        For C{<>} the HELO identity is checked.
        """
        zone = {"mail.example.net": [TXT("v=spf1 ip4:192.0.2.1 -all")]}
        result = self.result(self.check(makePolicy(zone), sender=None))
        self.assertEqual(result.result, "pass")
        self.assertEqual(result.properties, (("smtp.helo", "mail.example.net"),))

    def test_ownUsersSkipped(self) -> None:
        """
        Authenticated sessions and relay clients are not checked.
        """
        policy = makePolicy({"example.net": [TXT("v=spf1 -all")]}, fail="reject")
        for session in (
            Session(listener="smtp", peerHost="192.0.2.1", helo="x", authenticated="alice"),
            Session(listener="smtp", peerHost="192.0.2.1", helo="x", relayClient=True),
        ):
            self.assertEqual(self.check(policy, session), Verdict())

    def test_resultKeptForTheAnswersTTL(self) -> None:
        """
        The same client, sender and HELO get the kept result, without a
        DNS question, until the shortest TTL of the answers it came from
        ends; another sender is evaluated.
        """
        clock = Clock()
        zone = {
            "example.net": [dns.Record_TXT(b"v=spf1 include:_spf.example.net -all", ttl=600)],
            "_spf.example.net": [dns.Record_TXT(b"v=spf1 ip4:192.0.2.0/24 -all", ttl=60)],
        }
        policy = makePolicy(zone, clock=clock)
        resolver = policy._resolver
        self.assertEqual(self.result(self.check(policy)).result, "pass")
        asked = len(resolver.queries)
        clock.advance(59)
        answer = policy.checkSender(SESSION, SENDER, {})
        assert isinstance(answer, Verdict), "a kept result is answered at once"
        self.assertEqual(self.result(answer).result, "pass")
        self.assertEqual(len(resolver.queries), asked)
        self.check(policy, sender=Address.parse("bob@example.net"))
        self.assertEqual(len(resolver.queries), 2 * asked)
        clock.advance(1)
        self.check(policy)
        self.assertEqual(len(resolver.queries), 3 * asked)

    def test_temporaryResultNotKept(self) -> None:
        """
        C{temperror} is evaluated again; an answer without a TTL (a name
        that does not exist, without an SOA) keeps nothing.
        """
        clock = Clock()
        errors = {("example.net", dns.TXT): error.DNSServerError("servfail")}
        policy = makePolicy({}, errors, clock=clock)
        for _ in range(2):
            self.assertEqual(self.result(self.check(policy)).result, "temperror")
        self.assertEqual(len(policy._resolver.queries), 2)
        policy = makePolicy({}, clock=clock)
        for _ in range(2):
            self.assertEqual(self.result(self.check(policy)).result, "none")
        self.assertEqual(len(policy._resolver.queries), 2)

    def test_config(self) -> None:
        """
        fromConfig reads its options and refuses bad ones.
        """
        context = ComponentContext(reactor=None, hostname="mx.example.org", dataDir=None)  # type: ignore[arg-type]
        policy = fromConfig(context, "spf", {"plugin": "spf", "fail": "reject", "temperror": "defer"})
        self.assertEqual((policy.fail, policy.temperror), ("reject", "defer"))
        with self.assertRaises(ConfigError):
            fromConfig(context, "spf", {"plugin": "spf", "fail": "bounce"})


class SPFContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> SPFPolicy:
        return makePolicy({"example.net": [TXT("v=spf1 ip4:192.0.2.0/24 -all")]})
