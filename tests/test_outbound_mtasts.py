"""
Tests for L{mailfw.outbound._mtasts}: parsing RFC 8461 TXT records and
policies, MX patterns, and L{STSPolicies} with in-memory DNS, an
in-memory HTTPS fetcher and a task clock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.names import error as dnserror
from twisted.trial.unittest import SynchronousTestCase

from mailfw.outbound._mtasts import PolicyError, STSPolicies, mxMatches, parsePolicy, parseSTSRecord

T = TypeVar("T")

POLICY = "version: STSv1\nmode: enforce\nmx: mx1.example.net\nmx: *.backup.example.net\nmax_age: 86400\n"


def inline(work: Callable[[], T]) -> Deferred[T]:
    return succeed(work())


class ParseTests(SynchronousTestCase):
    def test_record(self) -> None:
        """
        The id of the one STSv1 record; none without one; several are an
        error (RFC 8461 3.1), as is a malformed id.
        """
        self.assertEqual(parseSTSRecord(["v=spf1 -all", "v=STSv1; id=20240101T0000;"]), "20240101T0000")
        self.assertIsNone(parseSTSRecord(["v=spf1 -all"]))
        self.assertRaises(PolicyError, parseSTSRecord, ["v=STSv1; id=1", "v=STSv1; id=2"])
        self.assertRaises(PolicyError, parseSTSRecord, ["v=STSv1; id=has space"])
        self.assertRaises(PolicyError, parseSTSRecord, ["v=STSv1; id"])

    def test_policy(self) -> None:
        policy = parsePolicy(POLICY.replace("\n", "\r\n"), "abc", 5.0)
        self.assertEqual(policy.mode, "enforce")
        self.assertEqual(policy.mx, ("mx1.example.net", "*.backup.example.net"))
        self.assertEqual((policy.maxAge, policy.id, policy.fetched), (86400, "abc", 5.0))
        self.assertTrue(policy.allows("MX1.example.net"))
        self.assertTrue(policy.allows("a.backup.example.net"))
        self.assertFalse(policy.allows("mx2.example.net"))

    def test_maxAgeCapped(self) -> None:
        """
        max_age is at most a year (RFC 8461 3.2).
        """
        self.assertEqual(parsePolicy(POLICY.replace("86400", "999999999")).maxAge, 31_557_600)

    def test_badPolicies(self) -> None:
        """
        Every malformed policy is refused with a reason.
        """
        for text, why in [
            (POLICY.replace("STSv1", "STSv2"), "version"),
            (POLICY.replace("enforce", "strict"), "mode"),
            (POLICY.replace("max_age: 86400", "max_age: soon"), "max_age"),
            ("version: STSv1\nmode: enforce\nmax_age: 5\n", "no mx"),
            (POLICY + "garbage\n", "without ':'"),
        ]:
            with self.assertRaises(PolicyError) as raised:
                parsePolicy(text)
            self.assertIn(why, str(raised.exception))

    def test_patterns(self) -> None:
        """
        A wildcard matches exactly one more label on the left.
        """
        self.assertTrue(mxMatches("*.example.net", "mx.example.net"))
        self.assertFalse(mxMatches("*.example.net", "a.mx.example.net"))
        self.assertFalse(mxMatches("*.example.net", "example.net"))
        self.assertTrue(mxMatches("mx.example.net.", "MX.example.net"))


class PoliciesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.txt: dict[str, list[str]] = {"_mta-sts.example.net": ["v=STSv1; id=one"]}
        self.served: str | Exception = POLICY
        self.fetches: list[str] = []
        self.pending: Deferred[str] | None = None
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def lookup(self, name: str) -> Deferred[list[str]]:
        if name not in self.txt:
            return fail(dnserror.DNSNameError(name))
        return succeed(self.txt[name])

    def fetch(self, domain: str) -> Deferred[str]:
        self.fetches.append(domain)
        if self.pending is not None:
            return self.pending
        if isinstance(self.served, Exception):
            return fail(self.served)
        return succeed(self.served)

    def policies(self, cacheDir: Path | None = None) -> STSPolicies:
        return STSPolicies(self.clock, self.lookup, self.fetch, inline, cacheDir)

    def logged(self, word: str) -> list[dict[str, Any]]:
        return [e for e in self.events if word in str(e.get("why", ""))]

    def test_fetchedOnceAndCached(self) -> None:
        policies = self.policies()
        first = self.successResultOf(policies.policyFor("example.net"))
        assert first is not None
        self.assertEqual((first.mode, first.id), ("enforce", "one"))
        self.successResultOf(policies.policyFor("Example.NET."))
        self.assertEqual(self.fetches, ["example.net"])

    def test_noRecordNoPolicy(self) -> None:
        self.assertIsNone(self.successResultOf(self.policies().policyFor("example.com")))
        self.assertEqual(self.fetches, [])

    def test_fetchFailureLogged(self) -> None:
        """
        A failed fetch means no policy (RFC 8461 5), logged with the
        domain and the reason; a malformed policy likewise.
        """
        self.served = PolicyError("certificate verify failed")
        self.assertIsNone(self.successResultOf(self.policies().policyFor("example.net")))
        [event] = self.logged("certificate verify failed")
        self.assertEqual(event["nexthop"], "example.net")
        self.served = "nonsense"
        self.assertIsNone(self.successResultOf(self.policies().policyFor("example.net")))
        self.assertTrue(self.logged("line without"))

    def test_idChangeRefreshesInBackground(self) -> None:
        """
        With a new id the cached policy is used while the new one is
        fetched; later lookups see the new one.
        """
        policies = self.policies()
        self.successResultOf(policies.policyFor("example.net"))
        self.txt["_mta-sts.example.net"] = ["v=STSv1; id=two"]
        self.served = POLICY.replace("enforce", "testing")
        self.pending = Deferred()
        now = self.successResultOf(policies.policyFor("example.net"))
        assert now is not None
        self.assertEqual(now.mode, "enforce")
        self.pending.callback(self.served)
        self.pending = None
        later = self.successResultOf(policies.policyFor("example.net"))
        assert later is not None
        self.assertEqual((later.mode, later.id), ("testing", "two"))

    def test_concurrentFetchesShared(self) -> None:
        self.pending = Deferred()
        policies = self.policies()
        a, b = policies.policyFor("example.net"), policies.policyFor("example.net")
        self.assertNoResult(a)
        self.pending.callback(POLICY)
        self.assertEqual(self.successResultOf(a), self.successResultOf(b))
        self.assertEqual(self.fetches, ["example.net"])

    def test_cachedWithoutRecordAndExpiry(self) -> None:
        """
        A cached policy applies while the TXT record is gone, until its
        max_age has passed.
        """
        policies = self.policies()
        self.successResultOf(policies.policyFor("example.net"))
        del self.txt["_mta-sts.example.net"]
        self.assertIsNotNone(self.successResultOf(policies.policyFor("example.net")))
        self.clock.advance(86401)
        self.assertIsNone(self.successResultOf(policies.policyFor("example.net")))

    def test_modeNone(self) -> None:
        self.served = POLICY.replace("enforce", "none")
        self.assertIsNone(self.successResultOf(self.policies().policyFor("example.net")))

    def test_diskCache(self) -> None:
        """
        A policy written to the cache directory is read by a new instance
        (a restart) without fetching.
        """
        directory = Path(self.mktemp())
        self.successResultOf(self.policies(directory).policyFor("example.net"))
        self.assertTrue((directory / "example.net.json").exists())
        again = self.successResultOf(self.policies(directory).policyFor("example.net"))
        assert again is not None
        self.assertEqual(again.mx[0], "mx1.example.net")
        self.assertEqual(self.fetches, ["example.net"])
