"""
DKIM end to end: a real C{twistd mailfw} whose C{[dns]} name server is a
loopback DNS server publishing the keys.

 - Verify: a message signed by dkimpy (RSA and Ed25519 test keys) arrives
   on port 25 and is delivered to the Maildir with
   C{Authentication-Results: mx.test; dkim=pass ...} for each signature.
 - Sign: keys made with C{mailfw dkim keygen} (whose printed records are
   what the DNS server publishes); a message submitted with AUTH reaches
   smtp-sink signed twice, and dkimpy's C{dkimverify} (its C{main}, with
   dnspython pointed at the loopback server) says each signature is good.
 - C{mailfw dkim check} finds the published records and says they match.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import dkim
import pytest

from mailfw.policy._dkimsign import generateKey
from mailfw.tls import makeSelfSigned
from tests.integration._dns import dnsServer
from tests.integration._peers import PEER, Sink, startSink, stopSink
from tests.integration._server import MailfwProcess, waitFor

MAILFW = str(Path(sys.executable).parent / "mailfw")
USER = "alice@example.net"
PASSWORD = "correct horse battery"
TIMEOUT = 30

# The keys of a remote sender whose mail mailfw verifies.
THEIR_RSA_PRIVATE, THEIR_RSA = generateKey("rsa", "sender.test", "rsa")
THEIR_ED_PRIVATE, THEIR_ED = generateKey("ed25519", "sender.test", "ed")

CONFIG = """
[dns]
nameservers = ["{nameserver}"]
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
passwords = "passwd"
penalty_delay = 0.1
[routing]
plugin = "static"
local_domains = ["localhost"]
transport = {{ "remote.test" = "outbound:[{peer}]:{sink}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
[policy.verify]
plugin = "dkim"
dns_timeout = 5
[policy.sign]
plugin = "dkim-sign"
listeners = ["submission", "submissions"]
[policy.sign.domains."example.net"]
keys = [
  {{ selector = "rsa2026", key = "dkim/example.net.rsa2026.key" }},
  {{ selector = "ed2026", key = "dkim/example.net.ed2026.key" }},
]
"""


@dataclass
class Setup:
    server: MailfwProcess
    sink: Sink
    dnsPort: int
    config: Path


def keygen(data: Path, selector: str, algorithm: str) -> tuple[str, str]:
    """
    Run C{mailfw dkim keygen}; return the record name and text it printed.
    """
    output = data / "dkim" / f"example.net.{selector}.key"
    made = subprocess.run(
        [MAILFW, "dkim", "keygen", "example.net", selector, "--algorithm", algorithm, "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert made.returncode == 0, made.stderr
    assert output.stat().st_mode & 0o777 == 0o600
    [line] = [line for line in made.stdout.splitlines() if " IN TXT " in line]
    name = line.split(" IN TXT ")[0].rstrip(".")
    text = "".join(re.findall(r'"([^"]*)"', line))
    return name, text


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("dkim")
    data = tmp / "data"
    (data / "dkim").mkdir(parents=True)
    published = dict(
        [keygen(data, "rsa2026", "rsa"), keygen(data, "ed2026", "ed25519")],
    )
    assert set(published) == {"rsa2026._domainkey.example.net", "ed2026._domainkey.example.net"}
    zone = {name: [["TXT", text]] for name, text in published.items()}
    for key in (THEIR_RSA, THEIR_ED):
        zone[f"{key.selector}._domainkey.{key.domain}"] = [["TXT", key.record]]
    cert, certKey = tmp / "cert.pem", tmp / "key.pem"
    makeSelfSigned("mx.test", cert, certKey)
    made = subprocess.run(
        [MAILFW, "passwd", "add", USER, "--file", str(data / "passwd"), "--sender", "@example.net"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert made.returncode == 0, made.stderr
    sink = startSink(tmp)
    try:
        with dnsServer(zone, tmp / "dns") as dnsPort:
            config = tmp / "mailfw.toml"
            config.write_text(
                CONFIG.format(
                    nameserver=f"127.0.0.1:{dnsPort}", cert=cert, key=certKey, peer=PEER, sink=sink.port
                )
            )
            server = MailfwProcess(data, config=config).start()
            try:
                yield Setup(server, sink, dnsPort, config)
            finally:
                server.stop()
    finally:
        stopSink(sink)


def test_verifiedIntoMaildir(setup: Setup) -> None:
    """
    Both of dkimpy's signatures pass; the Maildir copy says so in one
    Authentication-Results field with our authserv-id.
    """
    message = (
        b"From: Sender <news@sender.test>\r\n"
        b"To: <bob@localhost>\r\n"
        b"Subject: signed by dkimpy\r\n"
        b"Message-ID: <dkim-e2e@sender.test>\r\n"
        b"\r\n"
        b"Hello Bob,\r\n"
        b".a line that needs dot-stuffing\r\n"
        b"end  \r\n"
    )
    for key, private in ((THEIR_RSA, THEIR_RSA_PRIVATE), (THEIR_ED, THEIR_ED_PRIVATE)):
        message = (
            dkim.sign(
                message,
                key.selector.encode(),
                key.domain.encode(),
                private,
                signature_algorithm=key.algorithm,
                canonicalize=(b"relaxed", b"simple"),
            )
            + message
        )
    with setup.server.smtp() as client:
        client.sendmail("news@sender.test", ["bob@localhost"], message)
    waitFor(lambda: setup.server.delivered("bob"), timeout=TIMEOUT, what="delivery to bob's Maildir")
    [path] = setup.server.delivered("bob")
    delivered = path.read_bytes()
    header = delivered.split(b"\n\n", 1)[0].decode()
    [field] = re.findall(r"^Authentication-Results:.*(?:\n[ \t].*)*", header, re.MULTILINE)
    assert field.startswith("Authentication-Results: mx.test;"), field
    results = re.findall(r"dkim=(\w+) header\.d=(\S+) header\.i=\S+ header\.s=(\w+)", field)
    assert sorted(results) == [("pass", "sender.test", "ed"), ("pass", "sender.test", "rsa")], field


def submit(setup: Setup, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = f"Alice <{USER}>"
    msg["To"] = "bob@remote.test"
    msg["Subject"] = subject
    msg.set_content("A signed message.\n\nWith  spaces \t and\ttabs.  \n")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", setup.server.submissionPort, timeout=TIMEOUT) as client:
        client.starttls(context=context)
        client.login(USER, PASSWORD)
        client.send_message(msg)


DKIMVERIFY = """
import sys
import dns.resolver
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = int(sys.argv.pop(1))
dns.resolver.default_resolver = resolver
from dkim.dkimverify import main
main()
"""


def dkimverify(setup: Setup, message: bytes, index: int) -> subprocess.CompletedProcess[str]:
    """
    dkimpy's C{dkimverify} command (its C{main}), with dnspython asking the
    loopback DNS server instead of /etc/resolv.conf.
    """
    return subprocess.run(
        [sys.executable, "-c", DKIMVERIFY, str(setup.dnsPort), "--index", str(index)],
        input=message.decode("utf-8"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_submissionSigned(setup: Setup) -> None:
    """
    A message submitted with AUTH reaches smtp-sink with an rsa-sha256 and
    an ed25519-sha256 signature, and dkimverify says both are good.
    """
    submit(setup, "dkim-sign end to end")
    waitFor(
        lambda: any(b"dkim-sign end to end" in m for m in setup.sink.messages()),
        timeout=TIMEOUT,
        what="the signed message at smtp-sink",
    )
    [dump] = [m for m in setup.sink.messages() if b"dkim-sign end to end" in m]
    signatures = [
        dkim.util.parse_tag_value(v) for name, v in dkim.rfc822_parse(dump)[0] if name == b"DKIM-Signature"
    ]
    assert sorted((s[b"a"], s[b"s"]) for s in signatures) == [
        (b"ed25519-sha256", b"ed2026"),
        (b"rsa-sha256", b"rsa2026"),
    ]
    for index in range(2):
        checked = dkimverify(setup, dump, index)
        assert (checked.returncode, checked.stdout.strip()) == (0, "signature ok"), (index, checked.stderr)
    tampered = dump.replace(b"A signed message.", b"A changed message.")
    assert dkimverify(setup, tampered, 0).returncode == 1


def test_keyCheck(setup: Setup, tmp_path: Path) -> None:
    """
    C{mailfw dkim check} finds each published record matching the key the
    configuration names; another key does not match (exit status 1).
    """
    for selector in ("rsa2026", "ed2026"):
        checked = subprocess.run(
            [
                MAILFW,
                "dkim",
                "check",
                "example.net",
                selector,
                "-c",
                str(setup.config),
                "-d",
                str(setup.server.dataDir),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "matches the key" in checked.stdout
    other = tmp_path / "other.key"
    other.write_bytes(generateKey("rsa", "example.net", "rsa2026")[0])
    checked = subprocess.run(
        [
            MAILFW,
            "dkim",
            "check",
            "example.net",
            "rsa2026",
            "--key",
            str(other),
            "--nameserver",
            f"127.0.0.1:{setup.dnsPort}",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert checked.returncode == 1
    assert "publishes a different key" in checked.stdout
    missing = subprocess.run(
        [
            MAILFW,
            "dkim",
            "check",
            "example.net",
            "nosuch",
            "--key",
            str(other),
            "--nameserver",
            f"127.0.0.1:{setup.dnsPort}",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert missing.returncode == 1
    assert "no TXT record found" in missing.stdout
