"""
REQUIRETLS (RFC 8689) end to end through two C{twistd mailfw} servers.

Sender A takes a message with C{MAIL FROM:<...> REQUIRETLS} over STARTTLS
and relays it: to C{b.test}, whose MX host is mailfw B with a DANE-EE
TLSA record (served with the AD bit by a loopback DNS server that A trusts
with C{[dns] dnssec = "trust-ad"}), it goes with REQUIRETLS passed on and
B queues it with the flag; to C{plain.test}, an C{smtp-sink} without any
verified TLS, it never goes at all and the sender gets a 5.7.30 bounce
that returns only the original header (RFC 8689 section 5).  A bounce
whose own way back leads to a host without verified TLS and REQUIRETLS
(C{return.test}, the same C{smtp-sink}) is delivered there, redacted to
the header as Postfix does: only the body was protected, and section 5
says REQUIRETLS should not get the bounce dropped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests._certs import selfSigned
from tests.integration._peers import DEAD, PEER, Sink, startSink, stopSink
from tests.integration._server import MailfwProcess, freePort, waitFor

REPO = Path(__file__).resolve().parents[2]

RECEIVER = """
[tls]
certificate = "{cert}"
key = "{key}"
[routing]
plugin = "static"
relay_domains = ["b.test"]
transport = {{ "b.test" = "onward:[{dead}]:{deadPort}" }}
[delivery.local]
plugin = "maildir"
# Onward to a dead host with verified TLS required: the message stays
# queued (deferred), so the test can read its stored envelope.
[delivery.onward]
plugin = "smtp-relay"
tls = "verify"
connect_timeout = 2
"""

SENDER = """
[dns]
nameservers = ["127.0.0.1:{dnsPort}"]
dnssec = "trust-ad"
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "plain.test" = "outbound:[{peer}]:{sinkPort}", "return.test" = "outbound:[{peer}]:{sinkPort}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
port = {receiverPort}
address_families = ["ipv4"]
connect_timeout = 5
"""


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = startSink(tmp_path)
    yield s
    stopSink(s)


def startDNS(tmp: Path, zone: dict[str, list[list[object]]]) -> tuple[subprocess.Popen[bytes], int]:
    """
    The loopback DNS server as a child process (the C{twistd} children
    ask it while this test blocks), answering with the AD bit.
    """
    zoneFile, portFile = tmp / "zone.json", tmp / "dns.port"
    zoneFile.write_text(json.dumps(zone))
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._dns", str(zoneFile), str(portFile), "--ad"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        waitFor(lambda: portFile.exists() and portFile.read_text().isdigit(), what="the DNS server")
    except AssertionError:
        process.kill()
        raise
    return process, int(portFile.read_text())


def submit(server: MailfwProcess, recipient: str, sender: str = "alice@localhost") -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with server.smtp() as client:
        client.starttls(context=context)
        client.ehlo("client.test")
        assert client.has_extn("requiretls"), client.esmtp_features
        client.sendmail(
            sender,
            [recipient],
            b"Subject: secret\r\nMessage-ID: <rt@test>\r\n\r\nfor your eyes only\r\n",
            mail_options=["REQUIRETLS"],
        )


def test_requireTLSEndToEnd(tmp_path: Path, sink: Sink) -> None:
    """
    With REQUIRETLS, the DANE-verified second mailfw gets the message and
    stores the flag; the sink without verified TLS gets nothing, and the
    sender a 5.7.30 bounce with the original header but not its body.  The
    bounce to a sender behind the sink reaches it, redacted.
    """
    issued = selfSigned("mx.b.test")
    cert, key = issued.write(tmp_path, "receiver")
    receiverConfig = tmp_path / "receiver.toml"
    receiverConfig.write_text(RECEIVER.format(cert=cert, key=key, dead=DEAD, deadPort=freePort()))
    receiver = MailfwProcess(tmp_path / "receiver", config=receiverConfig).start()
    dns = None
    sender = None
    try:
        pin = hashlib.sha256(
            issued.certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).hexdigest()
        dns, dnsPort = startDNS(
            tmp_path,
            {
                "b.test": [["MX", 10, "mx.b.test"]],
                "mx.b.test": [["A", "127.0.0.1"]],
                f"_{receiver.smtpPort}._tcp.mx.b.test": [["TLSA", 3, 1, 1, pin]],
            },
        )
        senderConfig = tmp_path / "sender.toml"
        senderConfig.write_text(
            SENDER.format(dnsPort=dnsPort, peer=PEER, sinkPort=sink.port, receiverPort=receiver.smtpPort)
        )
        sender = MailfwProcess(tmp_path / "sender", config=senderConfig).start()

        submit(sender, "bob@b.test")
        database = receiver.dataDir / "queue.sqlite"

        def flagged() -> list[bool]:
            if not database.exists():
                return []
            with sqlite3.connect(database) as db:
                rows = db.execute("SELECT envelope FROM messages").fetchall()
            return [json.loads(row[0]).get("requireTLS", False) for row in rows]

        waitFor(lambda: flagged() != [], timeout=60, what="the message in the second mailfw's queue")
        assert flagged() == [True]

        submit(sender, "carol@plain.test")
        waitFor(lambda: sender.delivered("alice"), timeout=60, what="the bounce in alice's Maildir")
        [bounce] = sender.delivered("alice")
        text = bounce.read_bytes()
        assert b"5.7.30" in text, text[:2000]
        assert b"carol@plain.test" in text
        assert b"text/rfc822-headers" in text, text[:4000]
        assert b"Subject: secret" in text, text[:4000]
        assert b"for your eyes only" not in text, "the bounce of a REQUIRETLS message returned its body"

        assert sink.messages() == [], "a REQUIRETLS message reached the peer without verified TLS"

        submit(sender, "carol@plain.test", sender="dave@return.test")
        try:
            waitFor(lambda: len(sink.messages()) == 1, timeout=60, what="the bounce to dave@return.test")
        except AssertionError:
            raise AssertionError(f"the redacted bounce did not reach the sink:\n{sender.output()}") from None
        [redacted] = sink.messages()
        assert b"5.7.30" in redacted and b"dave@return.test" in redacted, redacted[:2000]
        assert b"Subject: secret" in redacted, redacted[:4000]
        assert b"for your eyes only" not in redacted, "the bounce to a plain peer returned the protected body"
    finally:
        if sender is not None:
            sender.stop()
        receiver.stop()
        if dns is not None:
            dns.terminate()
            dns.wait(10)
