"""
SCRAM-SHA-256 and SCRAM-SHA-256-PLUS against a real C{twistd mailfw}: a
password file made by C{mailfw passwd} (which stores SCRAM keys), and
scramp, an independent implementation, as the client inside Python's
C{smtplib} over a real socket with STARTTLS.

Python's C{ssl} module gives only the C{tls-unique} channel binding
(C{ssl.CHANNEL_BINDING_TYPES}), so C{-PLUS} is shown here on TLS 1.2;
C{tls-exporter} on TLS 1.3 is covered over real in-memory TLS in
C{tests/test_smtp_scram.py}.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
import scramp

from mailfw.tls import makeSelfSigned
from tests.integration._server import MailfwProcess, waitFor

MAILFW = str(Path(sys.executable).parent / "mailfw")
USER = "alice@localhost"
PASSWORD = "correct horse battery"
TIMEOUT = 30

CONFIG = """
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
passwords = "passwd"
failure_delay = 0.1
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailfwProcess]:
    tmp = tmp_path_factory.mktemp("scram")
    data = tmp / "data"
    data.mkdir()
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    makeSelfSigned("mx.test", cert, key)
    made = subprocess.run(
        [MAILFW, "passwd", "add", USER, "--file", str(data / "passwd"), "--sender", "@localhost"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert made.returncode == 0, made.stderr
    config = tmp / "mailfw.toml"
    config.write_text(CONFIG.format(cert=cert, key=key))
    process = MailfwProcess(data, config=config)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def scramObject(client: scramp.ScramClient) -> Callable[..., str]:
    """
    An C{smtplib} C{authobject} that runs C{client}: the client-first
    message as the initial response, the client-final message for the
    server-first challenge, and the empty response to the server-final
    one, which scramp checks (it raises if the server's signature is
    wrong).
    """
    challenges: list[str] = []

    def respond(challenge: bytes | None = None) -> str:
        if challenge is None:
            return str(client.get_client_first())
        challenges.append(challenge.decode())
        if len(challenges) == 1:
            client.set_server_first(challenges[0])
            return str(client.get_client_final())
        client.set_server_final(challenges[1])
        return ""

    return respond


def startTLS(server: MailfwProcess, maximum: ssl.TLSVersion | None = None) -> smtplib.SMTP:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    client = smtplib.SMTP("127.0.0.1", server.submissionPort, local_hostname="client.test", timeout=TIMEOUT)
    client.starttls(context=context)
    client.ehlo()
    return client


def send(client: smtplib.SMTP, to: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = USER
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("hello\n")
    assert client.send_message(msg) == {}


def delivered(server: MailfwProcess, user: str, subject: str) -> None:
    waitFor(
        lambda: any(f"Subject: {subject}".encode() in p.read_bytes() for p in server.delivered(user)),
        what=f"delivery of {subject!r} to {user}",
    )


def test_scramSha256(server: MailfwProcess) -> None:
    """
    After STARTTLS (TLS 1.3) both SCRAMs are offered before PLAIN and
    LOGIN; scramp logs in with SCRAM-SHA-256 (no binding) and a message
    arrives.  A wrong password gets 535.
    """
    with startTLS(server) as client:
        assert client.sock.version() == "TLSv1.3"  # type: ignore[union-attr]
        offered = client.esmtp_features["auth"].split()
        assert offered == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN", "LOGIN"]
        scram = scramp.ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)
        assert client.auth("SCRAM-SHA-256", scramObject(scram))[0] == 235
        send(client, "carol@localhost", "scram")
    delivered(server, "carol", "scram")
    with startTLS(server) as client:
        wrong = scramp.ScramClient(["SCRAM-SHA-256"], USER, "wrong")
        with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
            client.auth("SCRAM-SHA-256", scramObject(wrong))
        assert (raised.value.smtp_code, raised.value.smtp_error[:5]) == (535, b"5.7.8")


def test_scramSha256Plus(server: MailfwProcess) -> None:
    """
    On TLS 1.2 scramp binds to the connection with C{tls-unique} from
    Python's C{ssl} and logs in with SCRAM-SHA-256-PLUS; a message
    arrives.
    """
    assert "tls-unique" in ssl.CHANNEL_BINDING_TYPES
    with startTLS(server, ssl.TLSVersion.TLSv1_2) as client:
        assert client.sock.version() == "TLSv1.2"  # type: ignore[union-attr]
        assert "SCRAM-SHA-256-PLUS" in client.esmtp_features["auth"].split()
        binding = ("tls-unique", client.sock.get_channel_binding("tls-unique"))  # type: ignore[union-attr]
        scram = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], USER, PASSWORD, channel_binding=binding)
        assert client.auth("SCRAM-SHA-256-PLUS", scramObject(scram))[0] == 235
        send(client, "dave@localhost", "scram plus")
    delivered(server, "dave", "scram plus")
