"""
Tests for the C{dkim-sign} policy (L{mailfw.policy._dkimsign}): what it
signs is checked with dkimpy's own verifier.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._contract import runInOtherThread
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IPolicy, IPolicyFactory
from mailfw.plugin import findPlugin
from mailfw.policy._contract import PolicyContractTests
from mailfw.policy._dkimsign import (
    OVERSIGNED,
    DKIMSigner,
    SigningKey,
    generateKey,
    loadKey,
    signedFields,
)
from mailfw.verdict import AddHeader, Verdict

NOW = 1_790_000_000.0

RSA_PRIVATE, RSA_KEY = generateKey("rsa", "example.com", "r2026")
ED_PRIVATE, ED_KEY = generateKey("ed25519", "example.com", "e2026")

HEADER = (
    b"Received: from client.example by mail.example.com\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: signed\r\n"
    b"Date: Mon, 7 Dec 2026 18:00:00 +0000\r\n"
    b"Message-ID: <2@example.com>\r\n"
    b"X-Mailer: none of your business\r\n"
    b"\r\n"
)
BODY = b"Dear Bob,\r\n\r\n  relaxed   body \t\r\n\r\n\r\n"

SUBMISSION = Session(listener="submission", peerHost="192.0.2.7", authenticated="alice", relayClient=True)
NETWORK = Session(listener="smtp", peerHost="192.0.2.8")
STRANGER = Session(listener="smtp", peerHost="203.0.113.9")
ENVELOPE = Envelope(
    sender=Address.parse("alice@example.com"),
    recipients=(Recipient(Address.parse("bob@example.net")),),
    queueID="Q1",
)


def publish(*keys: SigningKey) -> Any:
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): k.record.encode() for k in keys}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def dkimpyVerifies(message: bytes, count: int, *keys: SigningKey) -> list[bool]:
    results = []
    for i in range(count):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=publish(*keys))))
        except dkim.ValidationError:
            # dkimpy raises on a body hash mismatch.
            results.append(False)
    return results


class SignerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.threadCalls: list[int] = []

        def run(work: Any) -> Deferred[Any]:
            self.threadCalls.append(1)
            return succeed(work())

        self.keys: dict[str, list[SigningKey]] = {"example.com": [RSA_KEY, ED_KEY]}
        self.signer = DKIMSigner("sign", self.keys, self.clock, run, [ipaddress.ip_network("192.0.2.0/24")])

    def sign(
        self, header: bytes = HEADER, body: bytes = BODY, session: Session = SUBMISSION, chunk: int = 5
    ) -> tuple[AddHeader, ...] | None:
        check = self.signer.openMessage(session, ENVELOPE, header)
        if check is None:
            return None
        for start in range(0, len(body), chunk):
            check.write(body[start : start + chunk])
        result = check.end(())
        assert isinstance(result, Deferred)
        verdict = self.successResultOf(result)
        self.assertIsInstance(verdict, Verdict)
        self.assertIsNone(verdict.reply)
        for edit in verdict.edits:
            assert isinstance(edit, AddHeader)
            self.assertEqual((edit.name, edit.index), ("DKIM-Signature", 0))
            # Folded lines, each short.
            lines = edit.value.split("\r\n")
            self.assertTrue(all(line[:1] == " " and "\n" not in line for line in lines[1:]), lines)
            self.assertTrue(all(len(line) <= 78 for line in lines), lines)
        return tuple(e for e in verdict.edits if isinstance(e, AddHeader))

    def queued(self, edits: tuple[AddHeader, ...], header: bytes = HEADER, body: bytes = BODY) -> bytes:
        """
        The message as the session queues it: each edit inserted at the top.
        """
        for edit in edits:
            header = f"{edit.name}: {edit.value}\r\n".encode() + header
        return header + body

    def test_bothAlgorithms(self) -> None:
        """
        With an RSA and an Ed25519 key, the message gets two signatures and
        dkimpy verifies both; the work ran through the thread runner.
        """
        edits = self.sign()
        assert edits is not None
        self.assertEqual(len(edits), 2)
        self.assertEqual(dkimpyVerifies(self.queued(edits), 2, RSA_KEY, ED_KEY), [True, True])
        algorithms = sorted(dkim.util.parse_tag_value(e.value.encode())[b"a"] for e in edits)
        self.assertEqual(algorithms, [b"ed25519-sha256", b"rsa-sha256"])
        self.assertEqual(self.threadCalls, [1])

    def test_tags(self) -> None:
        """
        relaxed/relaxed, d= and s= of the key, t= from the clock, and the
        header list: present fields plus From, To and Subject once more.
        """
        edits = self.sign()
        assert edits is not None
        tags = dkim.util.parse_tag_value(edits[0].value.encode())
        self.assertEqual(tags[b"c"], b"relaxed/relaxed")
        self.assertEqual(tags[b"d"], b"example.com")
        self.assertEqual(tags[b"t"], str(int(NOW)).encode())
        signed = [h.strip() for h in tags[b"h"].split(b":")]
        self.assertEqual(
            signed, [b"from", b"to", b"subject", b"date", b"message-id", b"from", b"to", b"subject"]
        )
        self.assertNotIn(b"received", signed)
        self.assertNotIn(b"x-mailer", signed)

    def test_chunks(self) -> None:
        """
        Whatever the chunks, the body hash is dkimpy's.
        """
        for chunk in (1, 2, 3, 7, 64):
            edits = self.sign(chunk=chunk)
            assert edits is not None
            self.assertEqual(dkimpyVerifies(self.queued(edits), 2, RSA_KEY, ED_KEY), [True, True], chunk)

    def test_oversigned(self) -> None:
        """
        A From, To or Subject added after signing breaks the signatures.
        """
        edits = self.sign()
        assert edits is not None
        for added in (b"From: mallory@example.org\r\n", b"To: x@y\r\n", b"Subject: changed\r\n"):
            header = HEADER.replace(b"\r\n\r\n", b"\r\n" + added + b"\r\n")
            self.assertEqual(dkimpyVerifies(self.queued(edits, header), 2, RSA_KEY, ED_KEY), [False, False])

    def test_bodyChanged(self) -> None:
        edits = self.sign()
        assert edits is not None
        message = self.queued(edits, body=BODY + b"more\r\n")
        self.assertEqual(dkimpyVerifies(message, 2, RSA_KEY, ED_KEY), [False, False])

    def test_relayNetwork(self) -> None:
        """
        A client from C{relay_networks} is signed for too, without AUTH.
        """
        self.assertIsNotNone(self.sign(session=NETWORK))
        self.assertIsNone(self.sign(session=replace(NETWORK, peerHost="198.51.100.8")))
        self.assertIsNotNone(self.sign(session=replace(STRANGER, relayClient=True)))

    def test_notRelayClient(self) -> None:
        """
        Mail from a client that may not relay (inbound MX mail) is not signed.
        """
        self.assertIsNone(self.sign(session=STRANGER))

    def test_otherDomain(self) -> None:
        """
        No key for the From domain: not signed.
        """
        self.assertIsNone(self.sign(header=HEADER.replace(b"alice@example.com>", b"alice@example.org>")))
        self.assertIsNone(self.sign(header=HEADER.replace(b"From: Alice <alice@example.com>\r\n", b"")))
        self.assertIsNone(self.sign(header=HEADER.replace(b"<alice@example.com>", b"undisclosed")))

    def test_subdomain(self) -> None:
        """
        Mail from a subdomain is signed with the parent domain's key (d= the
        parent: relaxed DMARC alignment).
        """
        edits = self.sign(header=HEADER.replace(b"alice@example.com", b"alice@Lists.Example.COM"))
        assert edits is not None
        self.assertEqual(dkim.util.parse_tag_value(edits[0].value.encode())[b"d"], b"example.com")

    def test_oneKey(self) -> None:
        self.keys["example.com"] = [ED_KEY]
        signer = DKIMSigner("sign", self.keys, self.clock, lambda work: succeed(work()))
        self.signer = signer
        edits = self.sign()
        assert edits is not None
        self.assertEqual(len(edits), 1)
        self.assertEqual(dkimpyVerifies(self.queued(edits), 1, ED_KEY), [True])

    def test_inAThread(self) -> None:
        self.signer = DKIMSigner("sign", self.keys, self.clock, runInOtherThread)
        edits = self.sign()
        assert edits is not None
        self.assertEqual(dkimpyVerifies(self.queued(edits), 2, RSA_KEY, ED_KEY), [True, True])

    def test_signedFields(self) -> None:
        self.assertEqual(
            signedFields([b"Received", b"From", b"Cc", b"CC", b"X-Spam"]),
            [b"from", b"cc", b"cc", *OVERSIGNED],
        )


class KeyTests(SynchronousTestCase):
    def test_generated(self) -> None:
        """
        Generated keys load back to the same public key; RSA keys have 2048
        bits.
        """
        self.assertEqual(loadKey(RSA_PRIVATE, "example.com", "r2026"), RSA_KEY)
        self.assertEqual(loadKey(ED_PRIVATE, "example.com", "e2026"), ED_KEY)
        public = serialization.load_der_public_key(base64.b64decode(RSA_KEY.public))
        assert isinstance(public, rsa.RSAPublicKey)
        self.assertEqual(public.key_size, 2048)
        self.assertTrue(RSA_KEY.record.startswith("v=DKIM1; k=rsa; p="))
        self.assertTrue(ED_KEY.record.startswith("v=DKIM1; k=ed25519; p="))
        self.assertEqual(len(base64.b64decode(ED_KEY.public)), 32)

    def test_pkcs8(self) -> None:
        """
        PKCS#8 PEM keys (as C{openssl genpkey} writes them) load too.
        """
        edKey = ed25519.Ed25519PrivateKey.generate()
        pem = edKey.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        loaded = loadKey(pem, "example.com", "s")
        raw = edKey.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(
            (loaded.algorithm, loaded.public), (b"ed25519-sha256", base64.b64encode(raw).decode())
        )
        rsaPem = serialization.load_pem_private_key(RSA_PRIVATE, None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.assertEqual(loadKey(rsaPem, "example.com", "r2026"), RSA_KEY)

    def test_bad(self) -> None:
        for data, message in [
            (b"not a key at all!", "not a PEM key"),
            (base64.b64encode(b"short"), "32 octets"),
            (b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", "unreadable PEM"),
        ]:
            e = self.assertRaises(ValueError, loadKey, data, "example.com", "s")
            self.assertIn(message, str(e))


class SignerContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> IPolicy:
        return DKIMSigner("sign", {"example.com": [RSA_KEY]}, Clock(), lambda work: succeed(work()))


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dataDir = Path(self.mktemp())
        (self.dataDir / "dkim").mkdir(parents=True)
        for name, data in (("r.key", RSA_PRIVATE), ("e.key", ED_PRIVATE)):
            path = self.dataDir / "dkim" / name
            path.write_bytes(data)
            os.chmod(path, 0o600)
        self.context = ComponentContext(reactor=Clock(), hostname="mail.example.com", dataDir=self.dataDir)

    def build(self, options: dict[str, Any]) -> Any:
        return findPlugin(IPolicyFactory, "dkim-sign").fromConfig(
            self.context, "sign", {"plugin": "dkim-sign", **options}
        )

    def test_oneKey(self) -> None:
        policy = self.build({"domains": {"Example.COM": {"selector": "r2026", "key": "dkim/r.key"}}})
        self.assertIsInstance(policy, DKIMSigner)
        self.assertEqual(policy.keys, {"example.com": (RSA_KEY,)})

    def test_relayNetworks(self) -> None:
        r = {"selector": "r2026", "key": "dkim/r.key"}
        policy = self.build(
            {"domains": {"example.com": r}, "relay_networks": ["10.0.0.0/8", "2001:db8::/32"]}
        )
        self.assertEqual([str(n) for n in policy.relayNetworks], ["10.0.0.0/8", "2001:db8::/32"])
        e = self.assertRaises(
            ConfigError, self.build, {"domains": {"example.com": r}, "relay_networks": ["ten"]}
        )
        self.assertIn("relay_networks: bad network 'ten'", str(e))

    def test_twoKeys(self) -> None:
        keys = [{"selector": "r2026", "key": "dkim/r.key"}, {"selector": "e2026", "key": "dkim/e.key"}]
        policy = self.build({"domains": {"example.com": {"keys": keys}}})
        self.assertEqual(policy.keys, {"example.com": (RSA_KEY, ED_KEY)})

    def test_errors(self) -> None:
        r = {"selector": "r2026", "key": "dkim/r.key"}
        for options, message in [
            ({}, "needs 'domains'"),
            ({"domains": {}}, "at least one domain"),
            ({"domains": {"example.com": "dkim/r.key"}}, "domains.example.com: expected a table"),
            ({"domains": {"example.com": {"selector": "s"}}}, "needs 'key'"),
            ({"domains": {"example.com": {"selector": "s", "key": "dkim/none"}}}, "cannot read"),
            ({"domains": {"example.com": {"keys": [r, r]}}}, "two rsa-sha256 keys"),
            ({"domains": {"example.com": {**r, "algo": "x"}}}, "unknown option 'algo'"),
            ({"domains": {"example.com": r}, "sign_all": True}, "unknown option 'sign_all'"),
        ]:
            e = self.assertRaises(ConfigError, self.build, options)
            self.assertIn("[policy.sign]", str(e))
            self.assertIn(message, str(e))

    def test_badKeyFile(self) -> None:
        (self.dataDir / "dkim" / "bad.key").write_bytes(b"garbage")
        e = self.assertRaises(
            ConfigError, self.build, {"domains": {"example.com": {"selector": "s", "key": "dkim/bad.key"}}}
        )
        self.assertIn("not a PEM key", str(e))

    def test_documented(self) -> None:
        """
        docs/configuration.rst lists exactly the keys C{fromConfig} reads
        from the section (each domain's keys are described under C{domains}).
        """
        from tests.test_docs import ROOT, documentedKeys, recordingKeys

        with recordingKeys() as asked:
            self.build({"domains": {"example.com": {"selector": "r2026", "key": "dkim/r.key"}}})
        documented = documentedKeys(ROOT / "docs" / "configuration.rst")
        self.assertEqual(documented["[policy] dkim-sign"], asked["[policy.sign]"] - {"plugin"})
        self.assertEqual(asked["[policy.sign] domains.example.com"], {"selector", "key"})
