"""
The C{dmarc} policy: record discovery, alignment of SPF and DKIM results,
the domain's policy, and the history for aggregate reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from mailfw.envelope import Envelope, Session
from mailfw.policy import AuthResult, Quarantine, Verdict, _dmarc
from mailfw.policy._dmarc import DMARCPolicy, fromDomain, parseRecord
from mailfw.testing import FakeResolver, PolicyContractTests

SESSION = Session(listener="smtp", peerHost="192.0.2.1", helo="mail.example.net", esmtp=True)
ENVELOPE = Envelope(None, queueID="Q1")
HEADER = b"Received: by mx\r\nFrom: Alice <alice@mail.example.net>\r\nSubject: x\r\n\r\n"


def TXT(text: str) -> dns.Record_TXT:
    return dns.Record_TXT(text.encode("ascii"))


def spf(domain: str, result: str = "pass") -> AuthResult:
    return AuthResult("spf", result, properties=(("smtp.mailfrom", f"bounce@{domain}"),))


def dkim(domain: str, result: str = "pass") -> AuthResult:
    return AuthResult("dkim", result, properties=(("header.d", domain),))


class DMARCTests(SynchronousTestCase):
    def policy(self, zone: dict[str, list[Any]], errors: Any = None, **kw: Any) -> DMARCPolicy:
        return DMARCPolicy("dmarc", FakeResolver(zone, errors or {}), **kw)

    def judge(self, policy: DMARCPolicy, *results: AuthResult, header: bytes = HEADER) -> Verdict:
        check = policy.openMessage(SESSION, ENVELOPE, header)
        assert check is not None
        check.write(b"body\r\n")
        answer = check.end(results)
        verdict: Verdict = self.successResultOf(answer) if isinstance(answer, Deferred) else answer
        return verdict

    def result(self, verdict: Verdict) -> AuthResult:
        [result] = verdict.results
        self.assertEqual(result.method, "dmarc")
        return result

    def test_parseRecord(self) -> None:
        """
        The tags a receiver acts on are read; bad values fall back to the
        defaults, and something that is not a DMARC record is None.
        """
        record = parseRecord("v=DMARC1; p=reject; sp=none; adkim=s; pct=50; rua=mailto:r@example.net")
        assert record is not None
        self.assertEqual(
            (record.p, record.sp, record.adkim, record.aspf, record.pct), ("reject", "none", "s", "r", 50)
        )
        self.assertIsNone(parseRecord("v=spf1 -all"))
        self.assertIsNone(parseRecord("v=DMARC1; p=bogus"))
        fallback = parseRecord("v=DMARC1; p=bogus; rua=mailto:r@example.net")
        assert fallback is not None
        self.assertEqual(fallback.p, "none")

    def test_fromDomain(self) -> None:
        """
        The From domain is found in a folded field; several From fields or
        addresses give None.
        """
        self.assertEqual(fromDomain(b'From: "A, B"\r\n <a@Example.NET>\r\n\r\n'), "example.net")
        self.assertIsNone(fromDomain(b"From: a@example.net\r\nFrom: b@example.net\r\n\r\n"))
        self.assertIsNone(fromDomain(b"From: a@example.net, b@example.org\r\n\r\n"))
        self.assertIsNone(fromDomain(b"Subject: none\r\n\r\n"))

    def test_passByAlignedDKIM(self) -> None:
        """
        DKIM passing for the organisational domain aligns in relaxed mode.
        """
        policy = self.policy({"_dmarc.example.net": [TXT("v=DMARC1; p=reject")]}, enforce=True)
        verdict = self.judge(policy, spf("other.example", "pass"), dkim("example.net"))
        self.assertIsNone(verdict.reply)
        result = self.result(verdict)
        self.assertEqual(result.result, "pass")
        self.assertEqual(result.properties, (("header.from", "mail.example.net"),))

    def test_strictAlignment(self) -> None:
        """
        With aspf=s and adkim=s only the exact From domain aligns.
        """
        zone = {"_dmarc.mail.example.net": [TXT("v=DMARC1; p=none; aspf=s; adkim=s")]}
        verdict = self.judge(self.policy(zone), spf("example.net"), dkim("example.net"))
        self.assertEqual(self.result(verdict).result, "fail")
        verdict = self.judge(self.policy(zone), spf("mail.example.net"))
        self.assertEqual(self.result(verdict).result, "pass")

    def test_failMarkedWithoutEnforce(self) -> None:
        """
        Without enforce, p=reject is only recorded.
        """
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=reject")]}
        verdict = self.judge(self.policy(zone), spf("example.net", "fail"))
        self.assertIsNone(verdict.reply)
        self.assertEqual(self.result(verdict).result, "fail")
        self.assertEqual(self.result(verdict).reason, "p=reject dis=none")

    def test_rejectEnforced(self) -> None:
        """
        With enforce, a failing message of a p=reject domain is refused;
        the record is found at the organisational domain.
        """
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=reject")]}
        verdict = self.judge(
            self.policy(zone, enforce=True), spf("example.net", "fail"), dkim("example.net", "fail")
        )
        assert verdict.reply is not None
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (550, "5.7.1"))
        self.assertEqual(self.result(verdict).result, "fail")

    def test_subdomainPolicy(self) -> None:
        """
        sp applies to a subdomain whose record is the organisational one.
        """
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=reject; sp=none")]}
        verdict = self.judge(self.policy(zone, enforce=True))
        self.assertIsNone(verdict.reply)
        self.assertEqual(self.result(verdict).reason, "p=reject dis=none")

    def test_quarantine(self) -> None:
        """
        p=quarantine holds the message (quarantine = "hold"), or only marks
        it.
        """
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=quarantine")]}
        verdict = self.judge(self.policy(zone, enforce=True))
        self.assertEqual(verdict.edits, (Quarantine("DMARC policy of mail.example.net"),))
        verdict = self.judge(self.policy(zone, enforce=True, quarantine="mark"))
        self.assertEqual(verdict.edits, ())

    def test_percentage(self) -> None:
        """
        Outside the pct sample the next milder policy applies.
        """
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=reject; pct=20")]}
        verdict = self.judge(self.policy(zone, enforce=True, sample=lambda: 0.5))
        self.assertIsNone(verdict.reply)
        self.assertEqual(self.result(verdict).reason, "p=reject dis=quarantine")
        verdict = self.judge(self.policy(zone, enforce=True, sample=lambda: 0.1))
        assert verdict.reply is not None
        self.assertEqual(verdict.reply.code, 550)

    def test_none(self) -> None:
        """
        Without a record the result is none.
        """
        self.assertEqual(self.result(self.judge(self.policy({}))).result, "none")

    def test_temperror(self) -> None:
        """
        A DNS failure is temperror, never a refusal.
        """
        errors = {("_dmarc.mail.example.net", dns.TXT): error.DNSServerError("servfail")}
        verdict = self.judge(self.policy({}, errors, enforce=True))
        self.assertIsNone(verdict.reply)
        self.assertEqual(self.result(verdict).result, "temperror")

    def test_noFrom(self) -> None:
        """
        A message without a single From domain is permerror.
        """
        verdict = self.judge(self.policy({}), header=b"Subject: x\r\n\r\n")
        self.assertEqual(self.result(verdict).result, "permerror")

    def test_ownUsersSkipped(self) -> None:
        """
        Authenticated and relay clients are not evaluated.
        """
        policy = self.policy({})
        for session in (
            Session("smtp", "192.0.2.1", authenticated="a"),
            Session("smtp", "192.0.2.1", relayClient=True),
        ):
            self.assertIsNone(policy.openMessage(session, ENVELOPE, HEADER))

    def test_history(self) -> None:
        """
        Each evaluation with a record is appended to the history file.
        """
        path = Path(self.mktemp())
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=reject; rua=mailto:agg@example.net")]}
        clock = Clock()
        policy = self.policy(zone, history=path, runInThread=lambda work: maybeDeferred(work), clock=clock)
        self.judge(policy, spf("example.net"), dkim("other.example", "fail"))
        clock.advance(_dmarc.HISTORY_INTERVAL)
        [line] = path.read_text().splitlines()
        entry = json.loads(line)
        self.assertEqual(
            (
                entry["queueID"],
                entry["sourceIP"],
                entry["headerFrom"],
                entry["policyDomain"],
                entry["result"],
            ),
            ("Q1", "192.0.2.1", "mail.example.net", "example.net", "pass"),
        )
        self.assertEqual(entry["rua"], "mailto:agg@example.net")
        self.assertEqual(
            entry["auth"],
            [
                {"method": "spf", "result": "pass", "domain": "example.net"},
                {"method": "dkim", "result": "fail", "domain": "other.example"},
            ],
        )

    def test_historyBatched(self) -> None:
        """
        Evaluations are appended at most once a L{HISTORY_INTERVAL}, those
        of the interval in one write, in order; while a write is under way
        the next waits for it; while the disk does not keep up at most
        L{MAX_UNWRITTEN} wait, the oldest dropped first.
        """
        path = Path(self.mktemp())
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=none")]}
        writes: list[Deferred[None]] = []

        def runInThread(work: Callable[[], None]) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            writes.append(d)
            d.addCallback(lambda _: work())
            return d

        clock = Clock()
        policy = self.policy(zone, history=path, runInThread=runInThread, clock=clock)
        for _ in range(3):
            self.judge(policy, spf("example.net"))
        self.assertEqual(writes, [], "written before the interval ended")
        clock.advance(_dmarc.HISTORY_INTERVAL)
        self.assertEqual(len(writes), 1, "the interval's evaluations go in one write")
        self.judge(policy, spf("example.net"))
        clock.advance(_dmarc.HISTORY_INTERVAL)
        self.assertEqual(len(writes), 1, "a second write while the first is under way")
        writes[0].callback(None)
        self.assertEqual(len(path.read_text().splitlines()), 3)
        clock.advance(_dmarc.HISTORY_INTERVAL)
        writes[1].callback(None)
        self.assertEqual(len(path.read_text().splitlines()), 4)
        self.patch(_dmarc, "MAX_UNWRITTEN", 2)
        for _ in range(4):
            self.judge(policy, spf("example.net"))
        clock.advance(_dmarc.HISTORY_INTERVAL)
        writes[2].callback(None)
        self.assertEqual(len(path.read_text().splitlines()), 6)

    def test_historyFlushedAtStop(self) -> None:
        """
        C{flush} writes what waits at once (the server calls it before it
        stops), and the timer does not write it again.
        """
        path = Path(self.mktemp())
        zone = {"_dmarc.example.net": [TXT("v=DMARC1; p=none")]}
        clock = Clock()
        policy = self.policy(zone, history=path, runInThread=lambda work: maybeDeferred(work), clock=clock)
        self.judge(policy, spf("example.net"))
        self.successResultOf(policy.flush())
        self.assertEqual(len(path.read_text().splitlines()), 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class DMARCContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> DMARCPolicy:
        return DMARCPolicy("dmarc", FakeResolver({}))
