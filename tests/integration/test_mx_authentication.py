"""
SPF, DKIM and DMARC end to end: a real C{twistd mailfw} asks a DNS server
on loopback (a child process serving SPF, DKIM key and DMARC records), and
its verdicts show on the wire and in the delivered copy's one
C{Authentication-Results:} field.
"""

from __future__ import annotations

from email import message_from_bytes
from pathlib import Path

import dkim
import pytest

from mailfw.policy._dkimsign import generateKey
from tests.integration._dns import dnsServer
from tests.integration._server import MailfwProcess, waitFor

# good.example signs its mail.
PRIVATE, KEY = generateKey("rsa", "good.example", "sel")

ZONE = {
    "sel._domainkey.good.example": [["TXT", KEY.record]],
    # Mail from 127.0.0.1 passes SPF for good.example.
    "good.example": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
    "_dmarc.good.example": [["TXT", "v=DMARC1; p=reject"]],
    # forged.example sends from elsewhere and asks receivers to reject.
    "forged.example": [["TXT", "v=spf1 ip4:192.0.2.0/24 -all"]],
    "_dmarc.forged.example": [["TXT", "v=DMARC1; p=reject; rua=mailto:agg@forged.example"]],
}

CONFIG = """
[dns]
nameservers = ["127.0.0.1:{port}"]
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
[policy.spf]
plugin = "spf"
[policy.dkim]
plugin = "dkim"
[policy.dmarc]
plugin = "dmarc"
enforce = {enforce}
"""


@pytest.fixture
def dnsPort(tmp_path: Path):  # type: ignore[no-untyped-def]
    with dnsServer(ZONE, tmp_path / "dns") as port:
        yield port


def start(tmp_path: Path, port: int, enforce: bool) -> MailfwProcess:
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(port=port, enforce="true" if enforce else "false"))
    return MailfwProcess(tmp_path / "data", config=config).start()


def send(server: MailfwProcess, sender: str, subject: str, sign: bool = False) -> tuple[int, bytes]:
    message = f"From: <{sender}>\r\nTo: <alice@localhost>\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    if sign:
        message = (
            dkim.sign(message, b"sel", b"good.example", PRIVATE, include_headers=[b"from", b"to", b"subject"])
            + message
        )
    with server.smtp() as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        assert client.rcpt("alice@localhost")[0] == 250
        return client.data(message)


def delivered(server: MailfwProcess, count: int) -> list[bytes]:
    waitFor(lambda: len(server.delivered("alice")) >= count, what=f"{count} messages in the Maildir")
    return [path.read_bytes() for path in server.delivered("alice")]


def test_passingMessageMarked(tmp_path: Path, dnsPort: int) -> None:
    """
    A message signed by dkimpy whose sender passes SPF is delivered with
    spf=pass, dkim=pass and dmarc=pass in one Authentication-Results field
    naming this server.
    """
    server = start(tmp_path, dnsPort, enforce=True)
    try:
        code, _ = send(server, "bob@good.example", "good", sign=True)
        assert code == 250
        [copy] = delivered(server, 1)
        [results] = message_from_bytes(copy).get_all("Authentication-Results", [])
        text = " ".join(results.split())
        assert text.startswith("mx.test;"), text
        assert "spf=pass smtp.mailfrom=bob@good.example" in text, text
        assert "dkim=pass header.d=good.example" in text, text
        assert "dmarc=pass" in text and "header.from=good.example" in text, text
    finally:
        server.stop()


def test_forgedRefusedWhenEnforcing(tmp_path: Path, dnsPort: int) -> None:
    """
    SPF fail with DMARC p=reject is refused at the end of data when the
    policy is enforced, and the log names the policy; the DMARC history
    records it for the aggregate report.
    """
    server = start(tmp_path, dnsPort, enforce=True)
    try:
        code, text = send(server, "ceo@forged.example", "forged")
        assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
        log = server.output()
        assert "policy dmarc refused end-of-data" in log, log
        path = server.dataDir / "dmarc-history.jsonl"
        # Appended by a thread of the policy's, after the reply.
        waitFor(lambda: path.exists() and "forged.example" in path.read_text(), what="the DMARC history")
        history = path.read_text()
        assert '"headerFrom":"forged.example"' in history and '"disposition":"reject"' in history, history
    finally:
        server.stop()
    assert server.delivered("alice") == []


def test_forgedMarkedWithoutEnforce(tmp_path: Path, dnsPort: int) -> None:
    """
    Without enforce the same message is delivered, marked spf=fail and
    dmarc=fail.
    """
    server = start(tmp_path, dnsPort, enforce=False)
    try:
        code, _ = send(server, "ceo@forged.example", "forged")
        assert code == 250
        [copy] = delivered(server, 1)
        text = " ".join(message_from_bytes(copy)["Authentication-Results"].split())
        assert "spf=fail" in text and "dmarc=fail" in text, text
    finally:
        server.stop()
