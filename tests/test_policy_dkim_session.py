"""
The C{dkim} and C{dkim-sign} policies in a real SMTP session (on a
L{StringTransport}): what is queued carries the results and signatures.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import dkim
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mailfw.policy._dkim import DKIMVerifier
from mailfw.policy._dkimsign import DKIMSigner, generateKey
from mailfw.testing import FakeResolver
from tests._smtpdoubles import HOSTNAME, PROLOGUE, connect

PRIVATE, KEY = generateKey("ed25519", "example.net", "sel")
RSA_PRIVATE, RSA_KEY = generateKey("rsa", "example.net", "rsa")
MESSAGE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: through a session\r\n"
    b"\r\n"
    b"line one  \r\n"
    b"..a line that was dot-stuffed\r\n"
    b"\r\n"
)
# As the client sends it: dot-stuffed.
WIRE = MESSAGE.replace(b"\r\n..", b"\r\n...")


def now(work: Any) -> Any:
    return succeed(work())


def published(name: bytes, timeout: float = 5) -> bytes:
    return {b"sel._domainkey.example.net.": KEY.record, b"rsa._domainkey.example.net.": RSA_KEY.record}[
        name
    ].encode()


class SessionTests(SynchronousTestCase):
    def test_verified(self) -> None:
        """
        A message signed by dkimpy arrives with C{dkim=pass} in the
        Authentication-Results field on top of the queued copy.
        """
        signature = dkim.sign(MESSAGE, b"sel", b"example.net", PRIVATE, signature_algorithm=b"ed25519-sha256")
        zone = {"sel._domainkey.example.net": [dns.Record_TXT(KEY.record.encode())]}
        clock = Clock()
        verifier = DKIMVerifier("dkim", FakeResolver(zone), clock, now)
        conn = connect(policies=[verifier], clock=clock)
        conn.send(PROLOGUE + signature + WIRE + b".\r\n")
        self.assertEqual(conn.newCodes()[-1], b"250")
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(
            incoming.header.startswith(
                f"Authentication-Results: {HOSTNAME};\r\n\tdkim=pass header.d=example.net".encode()
            ),
            incoming.header,
        )

    def test_signed(self) -> None:
        """
        A relay client's message is queued with both signatures on top, and
        dkimpy verifies them on the queued copy.
        """
        signer = DKIMSigner(
            "sign", {"example.net": [KEY, RSA_KEY]}, Clock(), now, [ipaddress.ip_network("192.0.2.0/24")]
        )
        conn = connect(policies=[signer], peer="192.0.2.1")
        conn.send(PROLOGUE + WIRE + b".\r\n")
        self.assertEqual(conn.newCodes()[-1], b"250")
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.data.startswith(b"DKIM-Signature: v=1; a="), incoming.data[:200])
        self.assertTrue(incoming.data.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1]))
        for index in range(2):
            self.assertTrue(dkim.DKIM(incoming.data).verify(idx=index, dnsfunc=published), index)
