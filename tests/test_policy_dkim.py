"""
Tests for the C{dkim} policy (L{mailfw.policy._dkim}) and the streaming
body hashes it shares with C{dkim-sign} (L{mailfw.policy._dkimstream}).

Messages are signed with dkimpy's own C{dkim.sign}, keys are served by an
in-memory resolver, DNS timeouts run on a L{Clock}.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import time
import tracemalloc
from pathlib import Path
from typing import Any

import dkim
from dkim.canonicalization import Relaxed, Simple
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._contract import runInOtherThread
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IMessageCheck, IPolicy, IPolicyFactory
from mailfw.plugin import findPlugin
from mailfw.policy._chain import PolicyChain
from mailfw.policy._contract import PolicyContractTests
from mailfw.policy._dkim import DKIMVerifier, fromConfig
from mailfw.policy._dkimsign import generateKey, signedFields, signHeader
from mailfw.policy._dkimstream import BodyCanonicalizer, BodyHashes
from mailfw.testing import FakeResolver
from mailfw.verdict import AuthResult, Verdict

# In the past: dkimpy checks t= against the real time.
NOW = 1_790_000_000.0

RSA_PRIVATE, RSA_KEY = generateKey("rsa", "example.com", "rsa1")
ED_PRIVATE, ED_KEY = generateKey("ed25519", "example.com", "ed1")

HEADER = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: the quarterly  report\r\n"
    b"Date: Mon, 7 Dec 2026 18:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
)
BODY = b"Hello Bob,  \r\n\r\nthe numbers\tare  in. \t\r\n indented line\r\n\r\n\r\n"

# A body with every case the canonicalizations treat: runs of spaces and
# tabs inside and at the end of lines, lines of white space only, a lone
# CR, empty lines inside and at the end.
TRICKY = b"a  b\t\tc \r\n \t \r\n\r\nx\ry  \r\n\t\r\nend\t \r\n\r\n \r\n\r\n"

SESSION = Session(listener="smtp", peerHost="192.0.2.1", helo="client.example", esmtp=True)
ENVELOPE = Envelope(
    sender=Address.parse("alice@example.com"),
    recipients=(Recipient(Address.parse("bob@example.net")),),
    helo="client.example",
    peerHost="192.0.2.1",
)


def zone(*keys: Any) -> dict[str, list[Any]]:
    return {f"{k.selector}._domainkey.{k.domain}": [dns.Record_TXT(k.record.encode("ascii"))] for k in keys}


def signed(
    header: bytes = HEADER,
    body: bytes = BODY,
    key: Any = RSA_KEY,
    private: bytes = RSA_PRIVATE,
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    length: bool = False,
) -> bytes:
    """
    C{header + body} with a DKIM-Signature from dkimpy on top (returned:
    the new header section).
    """
    field = dkim.sign(
        header + body,
        key.selector.encode(),
        key.domain.encode(),
        private,
        canonicalize=canonicalize,
        signature_algorithm=key.algorithm,
        length=length,
    )
    return bytes(field) + header


def syncRunner(calls: list[int]) -> Any:
    def run(work: Any) -> Deferred[Any]:
        calls.append(1)
        return succeed(work())

    return run


def canonical(relaxed: bool, body: bytes, cuts: tuple[int, ...]) -> bytes:
    out: list[bytes] = []
    canonicalizer = BodyCanonicalizer(relaxed, out.append)
    start = 0
    for cut in cuts:
        canonicalizer.write(body[start:cut])
        start = cut
    canonicalizer.write(body[start:])
    canonicalizer.end()
    return b"".join(out)


class CanonicalizerTests(SynchronousTestCase):
    """
    The streaming canonicalizer gives what dkimpy gives for the whole body,
    wherever the chunks are cut.
    """

    bodies = (TRICKY, BODY, b"", b"\r\n", b"\r\n\r\n", b"  \r\n", b"no final line end", b"x \t", b"x\r")

    def assertSameAsDkimpy(self, body: bytes, cuts: tuple[int, ...]) -> None:
        for relaxed, algorithm in ((False, Simple), (True, Relaxed)):
            self.assertEqual(
                canonical(relaxed, body, cuts),
                algorithm.canonicalize_body(body),
                f"{algorithm.__name__} canonicalization of {body!r} cut at {cuts}",
            )

    def test_everySingleCut(self) -> None:
        """
        Cut once at each position (inside CRLF, inside white space runs).
        """
        for body in self.bodies:
            for cut in range(len(body) + 1):
                self.assertSameAsDkimpy(body, (cut,))

    def test_everyPairOfCuts(self) -> None:
        """
        Cut twice, at every pair of positions of the tricky body.
        """
        for first, second in itertools.combinations(range(len(TRICKY) + 1), 2):
            self.assertSameAsDkimpy(TRICKY, (first, second))

    def test_oneOctetChunks(self) -> None:
        for body in self.bodies:
            self.assertSameAsDkimpy(body, tuple(range(len(body) + 1)))

    def test_manyTrailingEmptyLines(self) -> None:
        """
        Trailing empty lines are held as a count, written when text follows.
        """
        body = b"a\r\n" + b"\r\n" * 100_000 + b"b\r\n" + b"\r\n" * 100_000
        for relaxed, algorithm in ((False, Simple), (True, Relaxed)):
            self.assertEqual(canonical(relaxed, body, (7, 1000, 200_003)), algorithm.canonicalize_body(body))

    def test_lengthLimit(self) -> None:
        """
        C{l=} hashes only the first octets of the canonical body.
        """
        hashes = BodyHashes()
        whole = hashes.add(True, "sha256")
        limited = hashes.add(True, "sha256", 10)
        hashes.write(TRICKY[:5])
        hashes.write(TRICKY[5:])
        hashes.end()
        body = Relaxed.canonicalize_body(TRICKY)
        self.assertEqual(hashes.digest(whole), hashlib.sha256(body).digest())
        self.assertEqual(hashes.digest(limited), hashlib.sha256(body[:10]).digest())
        self.assertEqual(hashes.length(limited), len(body))

    def test_sharedHashes(self) -> None:
        """
        Signatures asking for the same hash share one.
        """
        hashes = BodyHashes()
        self.assertEqual(hashes.add(True, "sha256"), hashes.add(True, "sha256"))
        self.assertNotEqual(hashes.add(True, "sha256"), hashes.add(False, "sha256"))


class VerifierTests(SynchronousTestCase):
    """
    L{DKIMVerifier} at the end-of-data stage.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.threadCalls: list[int] = []
        self.resolver = FakeResolver(zone(RSA_KEY, ED_KEY))

    def verifier(self, **kwargs: Any) -> DKIMVerifier:
        return DKIMVerifier("dkim", self.resolver, self.clock, syncRunner(self.threadCalls), **kwargs)

    def verify(
        self, header: bytes, body: bytes = BODY, chunk: int = 7, verifier: DKIMVerifier | None = None
    ) -> tuple[AuthResult, ...]:
        check = (verifier or self.verifier()).openMessage(SESSION, ENVELOPE, header)
        for start in range(0, len(body), chunk):
            check.write(body[start : start + chunk])
        verdict = self.successResultOf(check.end(()))
        self.assertIsInstance(verdict, Verdict)
        self.assertIsNone(verdict.reply)
        return tuple(verdict.results)

    def assertResults(self, results: tuple[AuthResult, ...], *expected: str) -> None:
        self.assertEqual([r.result for r in results], list(expected), results)
        for r in results:
            self.assertEqual(r.method, "dkim")

    def test_rsaPass(self) -> None:
        """
        An rsa-sha256 signature passes, with the properties DMARC reads.
        """
        header = signed()
        (result,) = self.verify(header)
        self.assertEqual(result.result, "pass")
        self.assertEqual(result.property("header.d"), "example.com")
        self.assertEqual(result.property("header.i"), "@example.com")
        self.assertEqual(result.property("header.s"), "rsa1")
        self.assertEqual(result.property("header.a"), "rsa-sha256")
        b = dkim.util.parse_tag_value(header.split(b"\r\n\r\n")[0].split(b":", 1)[1])[b"b"]
        self.assertEqual(result.property("header.b"), b"".join(b.split())[:8].decode())
        self.assertEqual(self.threadCalls, [1])

    def test_ed25519Pass(self) -> None:
        """
        An ed25519-sha256 signature (RFC 8463) passes.
        """
        (result,) = self.verify(signed(key=ED_KEY, private=ED_PRIVATE))
        self.assertEqual((result.result, result.property("header.a")), ("pass", "ed25519-sha256"))

    def test_canonicalizations(self) -> None:
        """
        Every canonicalization pair passes with the tricky body, fed in chunks
        of every size from 1 to 9 octets.
        """
        for head, tail in itertools.product((b"simple", b"relaxed"), repeat=2):
            c = (head, tail)
            header = signed(body=TRICKY, canonicalize=c)
            for chunk in range(1, 10):
                self.assertResults(self.verify(header, TRICKY, chunk), "pass")

    def test_bothAlgorithms(self) -> None:
        """
        One result per signature, in order.
        """
        header = signed(key=ED_KEY, private=ED_PRIVATE, header=signed())
        results = self.verify(header)
        self.assertResults(results, "pass", "pass")
        self.assertEqual([r.property("header.s") for r in results], ["ed1", "rsa1"])

    def test_bodyChanged(self) -> None:
        """
        A changed body fails with a body hash mismatch, without dkimpy.
        """
        (result,) = self.verify(signed(), BODY.replace(b"numbers", b"figures"))
        self.assertEqual((result.result, result.reason), ("fail", "body hash mismatch"))
        self.assertEqual(self.threadCalls, [])

    def test_headerChanged(self) -> None:
        """
        A changed signed field fails the signature.
        """
        header = signed().replace(b"quarterly", b"annual")
        (result,) = self.verify(header)
        self.assertEqual((result.result, result.reason), ("fail", "signature did not verify"))

    def test_addedFrom(self) -> None:
        """
        A second From field added above the signed one fails (dkimpy signs
        From once more than it verifies).
        """
        (result,) = self.verify(b"From: mallory@example.org\r\n" + signed())
        self.assertEqual(result.result, "fail")

    def test_length(self) -> None:
        """
        With C{l=}, text appended after the signed length still passes.
        """
        header = signed(length=True)
        self.assertResults(self.verify(header, BODY + b"appended by a list\r\n"), "pass")

    def test_none(self) -> None:
        """
        An unsigned message gets C{dkim=none} and no lookup.
        """
        self.assertResults(self.verify(HEADER), "none")
        self.assertEqual(self.resolver.queries, [])

    def test_malformedSignature(self) -> None:
        """
        A signature missing tags, with bad base64 or an unknown algorithm is
        a permerror without a lookup.
        """
        for field in [
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa1\r\n",
            b"DKIM-Signature: garbage without tags\r\n",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa1; h=from; bh=!!!!; b=AAAA\r\n",
            b"DKIM-Signature: v=1; a=rsa-md5; d=example.com; s=rsa1; h=from; bh=AAAA; b=AAAA\r\n",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; i=example.com; s=rsa1; h=from; bh=AAAA; b=AAAA\r\n",
            b"DKIM-Signature: v=1; a=rsa-sha256; c=odd/simple; d=example.com; s=rsa1; h=from; bh=AAAA; b=AAAA\r\n",
            b"DKIM-Signature: v=1; v=1; a=rsa-sha256\r\n",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=exa mple.com; s=rsa1; h=from; bh=AAAA; b=AAAA\r\n",
            b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=../x; h=from; bh=AAAA; b=AAAA\r\n",
            "DKIM-Signature: v=1; a=rsa-sha256; d=bücher.example; s=s; h=from; bh=AAAA; b=AAAA\r\n".encode(),
        ]:
            (result,) = self.verify(field + HEADER)
            self.assertEqual(result.result, "permerror", field)
            self.assertTrue(result.reason, field)
        self.assertEqual(self.resolver.queries, [])

    def test_expired(self) -> None:
        """
        A signature whose C{x=} passed (by the policy's clock) is a permerror.
        """
        header = signed()
        expires = int(time.time()) + 30 * 86400
        self.clock.advance(expires - NOW + 1)
        (result,) = self.verify(header.replace(b"; h=", b"; x=%d; h=" % expires, 1))
        self.assertEqual((result.result, result.reason), ("permerror", "signature expired"))

    def test_missingKey(self) -> None:
        """
        NXDOMAIN or no TXT record for the key is a permerror.
        """
        self.resolver.zone = {"rsa1._domainkey.example.com": []}
        (result,) = self.verify(signed())
        self.assertEqual((result.result, result.reason), ("permerror", "no key for signature"))
        self.resolver.zone = {}
        (result,) = self.verify(signed())
        self.assertEqual((result.result, result.reason), ("permerror", "no key for signature"))

    def test_badKeys(self) -> None:
        """
        A malformed, revoked, non-email or wrong-type key record is a
        permerror, never a crash.
        """
        name = "rsa1._domainkey.example.com"
        for record, reason in [
            (b"v=DKIM1; k=rsa; p=bm90IGEga2V5", "bad key"),
            (b"v=DKIM1; k=rsa; p=", "key revoked"),
            (b"this is not a key record", "malformed key record"),
            (b"v=DKIM1; k=rsa; s=tlsrpt-only; p=" + RSA_KEY.public.encode(), "key is not for email"),
            (b"v=DKIM1; k=ed25519; p=" + ED_KEY.public.encode(), "key type does not match a="),
            (b"v=DKIM2; p=" + RSA_KEY.public.encode(), "bad key"),
            (b"v=DKIM1; k=dsa; p=AAAA", "bad key"),
        ]:
            self.resolver.zone = {name: [dns.Record_TXT(record)]}
            (result,) = self.verify(signed())
            self.assertEqual(result.result, "permerror", record)
            self.assertIn(reason, result.reason or "", record)

    def test_twoKeyRecords(self) -> None:
        name = "rsa1._domainkey.example.com"
        record = RSA_KEY.record.encode()
        self.resolver.zone = {name: [dns.Record_TXT(record), dns.Record_TXT(record)]}
        self.assertResults(self.verify(signed()), "permerror")

    def test_splitTXT(self) -> None:
        """
        A key record in several strings is joined.
        """
        record = RSA_KEY.record.encode()
        self.resolver.zone = {"rsa1._domainkey.example.com": [dns.Record_TXT(record[:100], record[100:])]}
        self.assertResults(self.verify(signed()), "pass")

    def test_servfail(self) -> None:
        """
        SERVFAIL or a refused query is a temperror.
        """
        name = "rsa1._domainkey.example.com"
        for problem in [error.DNSServerError(name), error.DNSQueryRefusedError(name)]:
            self.resolver.errors = {(name, dns.TXT): problem}
            self.assertResults(self.verify(signed()), "temperror")

    def test_timeout(self) -> None:
        """
        A lookup that does not answer within C{dnsTimeout} is a temperror.
        """
        name = "rsa1._domainkey.example.com"
        self.resolver.errors = {(name, dns.TXT): Deferred()}
        check = self.verifier(dnsTimeout=3).openMessage(SESSION, ENVELOPE, signed())
        check.write(BODY)
        d = check.end(())
        self.assertNoResult(d)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        (result,) = self.successResultOf(d).results
        self.assertEqual((result.result, result.reason), ("temperror", "key lookup timed out"))

    def test_lookupStartsEarly(self) -> None:
        """
        The key is asked for when the header section is complete, while the
        body still arrives; one lookup per key name.
        """
        header = signed(header=signed())
        self.verifier().openMessage(SESSION, ENVELOPE, header)
        self.assertEqual(self.resolver.queries, [("rsa1._domainkey.example.com", dns.TXT)])

    def test_abort(self) -> None:
        """
        An aborted message cancels its lookups.
        """
        cancelled: list[object] = []
        pending: Deferred[Any] = Deferred(cancelled.append)
        self.resolver.errors = {("rsa1._domainkey.example.com", dns.TXT): pending}
        check = self.verifier().openMessage(SESSION, ENVELOPE, signed())
        check.write(BODY)
        check.abort()
        self.assertEqual(cancelled, [pending])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_tooManySignatures(self) -> None:
        """
        Signatures beyond C{maxSignatures} are reported neutral, unlooked-up.
        """
        header = HEADER
        for _ in range(4):
            header = signed(header=header)
        results = self.verify(header, verifier=self.verifier(maxSignatures=2))
        self.assertResults(results, "pass", "pass", "neutral", "neutral")
        self.assertEqual(len(self.resolver.queries), 1)

    def test_unparseableHeader(self) -> None:
        (result,) = self.verify(b"\x01bad header line\r\n" + signed())
        self.assertEqual(result.result, "permerror")

    def test_inAThread(self) -> None:
        """
        With a runner that uses another thread, the header check gives the
        same result there (dkimpy shares nothing with the reactor thread).
        """
        verifier = DKIMVerifier("dkim", self.resolver, self.clock, runInOtherThread)
        self.assertResults(self.verify(signed(key=ED_KEY, private=ED_PRIVATE), verifier=verifier), "pass")

    def test_chain(self) -> None:
        """
        Through the policy chain, the end-of-data verdict carries the results.
        """
        chain = PolicyChain([self.verifier()], 30, self.clock)
        checks = chain.openMessage(SESSION, ENVELOPE, signed(), "192.0.2.1")
        assert checks is not None
        checks.write(BODY)
        verdict = self.successResultOf(checks.end((AuthResult("spf", "pass"),)))
        self.assertEqual([r.result for r in verdict.results], ["pass"])

    def test_bigBodyBoundedMemory(self) -> None:
        """
        A 35 MiB body verifies, and hashing it as it streams in 64 KiB chunks
        allocates at most a few chunks' worth at once.
        """
        line = b"0123456789 abcdefghij\tklmnopqrstuvwxyz  ABCDEFGHIJKLMNOPQRSTUVWXYZ \r\n"
        count = 35 * 1024 * 1024 // len(line)
        body = line * count
        # dkimpy would take 20 s over the whole body; its canonical form is
        # dkimpy's canonical form of one line, repeated.
        bodyHash = hashlib.sha256(Relaxed.canonicalize_body(line) * count).digest()
        include = signedFields([b"From", b"To", b"Subject"])
        field = signHeader(HEADER, RSA_KEY, include, bodyHash, int(NOW))
        header = b"DKIM-Signature: " + field.encode() + b"\r\n" + HEADER
        verifier = self.verifier()
        gc.collect()
        tracemalloc.start()
        try:
            check = verifier.openMessage(SESSION, ENVELOPE, header)
            view = memoryview(body)
            for start in range(0, len(body), 65536):
                check.write(bytes(view[start : start + 65536]))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1024 * 1024, f"peak {peak} octets while hashing {len(body)}")
        self.assertResults(tuple(self.successResultOf(check.end(())).results), "pass")


class DKIMContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> IPolicy:
        return DKIMVerifier("dkim", FakeResolver({}), Clock(), syncRunner([]))


class ConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        return ComponentContext(
            reactor=Clock(), hostname="mx.example.org", dataDir=Path("."), nameservers=(("127.0.0.1", 5353),)
        )

    def test_plugin(self) -> None:
        """
        The bundled plugin C{dkim} builds a verifier with the options given
        and the configured name servers.
        """
        factory = findPlugin(IPolicyFactory, "dkim")
        policy = factory.fromConfig(
            self.context(), "verify", {"plugin": "dkim", "dns_timeout": 2, "max_signatures": 3}
        )
        assert isinstance(policy, DKIMVerifier)
        self.assertEqual((policy.name, policy.dnsTimeout, policy.maxSignatures), ("verify", 2.0, 3))
        self.assertEqual(policy.resolver.servers, [("127.0.0.1", 5353)])
        self.assertTrue(IMessageCheck.providedBy(policy.openMessage(SESSION, ENVELOPE, HEADER)))

    def test_badOptions(self) -> None:
        for options, message in [
            ({"dns_timout": 2}, "unknown option 'dns_timout'"),
            ({"max_signatures": 0}, "max_signatures: must be at least 1"),
            ({"dns_timeout": "soon"}, "dns_timeout: expected a number"),
        ]:
            e = self.assertRaises(ConfigError, fromConfig, self.context(), "verify", options)
            self.assertIn("[policy.verify]", str(e))
            self.assertIn(message, str(e))

    def test_documented(self) -> None:
        """
        docs/configuration.rst lists exactly the keys C{fromConfig} reads.
        """
        from tests.test_docs import ROOT, documentedKeys, recordingKeys

        with recordingKeys() as asked:
            fromConfig(self.context(), "verify", {"plugin": "dkim"})
        documented = documentedKeys(ROOT / "docs" / "configuration.rst")
        self.assertEqual(documented["[policy] dkim"], asked["[policy.verify]"] - {"plugin"})
