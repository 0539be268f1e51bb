"""
Tests for L{mailfw.outbound._dane}: TLSA records, matching a peer's
certificate chain against them (RFC 7672), and what counts as usable.
"""

from __future__ import annotations

import hashlib
import time

from cryptography.hazmat.primitives import serialization
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mailfw.outbound._dane import TLSA, SecureAnswer, parseTLSA, tlsaRecords, verifyDANE
from tests._certs import issue, makeCA, selfSigned


def spki(certificate: object) -> bytes:
    return certificate.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def der(certificate: object) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined, no-any-return]


class TLSARecordTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        The RDATA is usage, selector, matching type, then the data.
        """
        self.assertEqual(parseTLSA(b"\x03\x01\x01" + b"x" * 32), TLSA(3, 1, 1, b"x" * 32))
        self.assertRaises(ValueError, parseTLSA, b"\x03\x01")

    def test_problems(self) -> None:
        """
        PKIX usages, unknown usages, selectors and matching types, and hash
        data of the wrong length are unusable, each with its reason.
        """
        self.assertIsNone(TLSA(3, 1, 1, b"x" * 32).problem())
        self.assertIsNone(TLSA(2, 0, 2, b"x" * 64).problem())
        self.assertIn("PKIX-EE", TLSA(1, 1, 1, b"x" * 32).problem() or "")
        self.assertIn("usage 7 (unknown)", TLSA(7, 1, 1, b"x" * 32).problem() or "")
        self.assertIn("selector", TLSA(3, 5, 1, b"x" * 32).problem() or "")
        self.assertIn("matching", TLSA(3, 1, 9, b"x" * 32).problem() or "")
        self.assertIn("32 octets", TLSA(3, 1, 1, b"x" * 31).problem() or "")

    def test_splitUsable(self) -> None:
        """
        L{tlsaRecords} keeps the usable records and says why the others
        are not.
        """
        answer = SecureAnswer(
            (
                dns.UnknownRecord(b"\x03\x01\x01" + b"a" * 32),
                dns.UnknownRecord(b"\x00\x00\x01" + b"b" * 32),
                dns.UnknownRecord(b"\x03"),
            ),
            True,
        )
        usable, problems = tlsaRecords(answer)
        self.assertEqual(usable, [TLSA(3, 1, 1, b"a" * 32)])
        self.assertEqual(len(problems), 2)
        self.assertIn("PKIX-TA", problems[0])
        self.assertIn("malformed", problems[1])


class MatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.peer = selfSigned("mx.example.net").certificate

    def test_everySelectorAndMatching(self) -> None:
        """
        Selector 0 is the whole certificate, 1 its public key; matching 0
        the data, 1 SHA-256, 2 SHA-512.
        """
        for selector, content in ((0, der(self.peer)), (1, spki(self.peer))):
            for matching, data in (
                (0, content),
                (1, hashlib.sha256(content).digest()),
                (2, hashlib.sha512(content).digest()),
            ):
                record = TLSA(3, selector, matching, data)
                self.assertTrue(record.matches(self.peer), (selector, matching))
                self.assertFalse(TLSA(3, selector, matching, b"\0" * len(data)).matches(self.peer))

    def test_daneEE(self) -> None:
        """
        A DANE-EE record matching the peer's own certificate passes with
        no name or issuer check; a mismatching one fails, saying so.
        """
        good = TLSA(3, 1, 1, hashlib.sha256(spki(self.peer)).digest())
        self.assertIsNone(verifyDANE([good], [self.peer], ["other.example"], time.time()))
        bad = TLSA(3, 1, 1, b"\1" * 32)
        self.assertIn(
            "no TLSA record matches", verifyDANE([bad], [self.peer], ["mx.example.net"], time.time()) or ""
        )

    def test_noCertificate(self) -> None:
        self.assertIn("no certificate", verifyDANE([TLSA(3, 1, 1, b"1" * 32)], [], ["x"], time.time()) or "")

    def test_daneTA(self) -> None:
        """
        A DANE-TA record names a CA in the chain: the peer's certificate
        must chain to it and be valid for the MX host or the next hop
        domain.
        """
        ca = makeCA()
        leaf = issue(ca, "mx.example.net").certificate
        anchor = TLSA(2, 1, 1, hashlib.sha256(spki(ca.certificate)).digest())
        chain = [leaf, ca.certificate]
        self.assertIsNone(verifyDANE([anchor], chain, ["mx.example.net", "example.net"], time.time()))
        self.assertIsNone(verifyDANE([anchor], chain, ["other.example", "mx.example.net"], time.time()))
        why = verifyDANE([anchor], chain, ["wrong.example"], time.time())
        self.assertIn("does not chain to the DANE-TA anchor for wrong.example", why or "")

    def test_daneTANotInChain(self) -> None:
        """
        A DANE-TA anchor the server does not present matches nothing.
        """
        ca, other = makeCA(), makeCA("another CA")
        leaf = issue(ca, "mx.example.net").certificate
        anchor = TLSA(2, 0, 1, hashlib.sha256(der(other.certificate)).digest())
        self.assertIn(
            "no TLSA record matches",
            verifyDANE([anchor], [leaf, ca.certificate], ["mx.example.net"], time.time()) or "",
        )

    def test_daneTAExpired(self) -> None:
        """
        Under DANE-TA the dates count: far in the future the chain fails.
        """
        ca = makeCA()
        leaf = issue(ca, "mx.example.net").certificate
        anchor = TLSA(2, 1, 1, hashlib.sha256(spki(ca.certificate)).digest())
        later = time.time() + 365 * 86400
        self.assertIsNotNone(verifyDANE([anchor], [leaf, ca.certificate], ["mx.example.net"], later))
