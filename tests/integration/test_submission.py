"""
Message submission end to end: a real C{twistd mailfw} with a password
file made by C{mailfw passwd}, a throw-away self-signed certificate, and
real clients (Python's C{smtplib}, swaks) over real TLS on loopback:
STARTTLS + AUTH on the submission port, implicit TLS on an C{ssl:}
listener, and authenticated relaying to a remote domain (smtp-sink) that
the same server refuses to anonymous clients.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailfw.tls import makeSelfSigned
from tests.integration._peers import PEER, Sink, startSink, stopSink
from tests.integration._server import MailfwProcess, freePort, requireTool, waitFor

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
transport = {{ "remote.test" = "outbound:[{peer}]:{sink}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
"""


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    started = startSink(tmp_path_factory.mktemp("sink"))
    try:
        yield started
    finally:
        stopSink(started)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[MailfwProcess]:
    tmp = tmp_path_factory.mktemp("submission")
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
    assert (data / "passwd").stat().st_mode & 0o777 == 0o600
    config = tmp / "mailfw.toml"
    config.write_text(CONFIG.format(cert=cert, key=key, peer=PEER, sink=sink.port))
    submissions = freePort()
    process = MailfwProcess(
        data,
        config=config,
        extraArgs=(f"--submissions=ssl:{submissions}:interface=127.0.0.1:privateKey={key}:certKey={cert}",),
    )
    process.submissionsPort = submissions  # type: ignore[attr-defined]
    process.start()
    try:
        yield process
    finally:
        process.stop()


def tlsContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def submission(server: MailfwProcess) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.submissionPort, local_hostname="client.test", timeout=TIMEOUT)


def message(to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = USER
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("hello\n")
    return msg


def test_starttlsThenLogin(server: MailfwProcess, sink: Sink) -> None:
    """
    On 587, AUTH is not offered before STARTTLS (AUTH PLAIN gets 538, MAIL
    530); after it smtplib's login() works and a message to a remote
    domain is accepted (RCPT 250) and relayed, marked ESMTPSA, with the
    Date and Message-ID the client left out.
    """
    with submission(server) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert client.docmd("AUTH", f"PLAIN {plain}")[0] == 538
        assert client.docmd("MAIL", f"FROM:<{USER}>")[0] == 530
        client.starttls(context=tlsContext())
        client.ehlo()
        assert client.has_extn("auth")
        assert client.esmtp_features["auth"].split()[-2:] == ["PLAIN", "LOGIN"]
        assert client.login(USER, PASSWORD)[0] == 235
        assert client.mail(USER)[0] == 250
        assert client.rcpt("bob@remote.test")[0] == 250
        code, _ = client.data(
            b"From: alice@localhost\r\nTo: bob@remote.test\r\nSubject: via 587\r\n\r\nhello\r\n"
        )
        assert code == 250
    waitFor(
        lambda: any(b"via 587" in m and m.rstrip().endswith(b"hello") for m in sink.messages()),
        what="the relayed message at smtp-sink",
    )
    [dump] = [m for m in sink.messages() if b"via 587" in m]
    assert b" with ESMTPSA id " in dump
    assert b"\nDate: " in dump
    assert b"\nMessage-ID: <" in dump
    assert USER.encode() not in dump.split(b"From: ")[0].split(b"Received:")[-1]


def test_senderMismatch(server: MailfwProcess) -> None:
    """
    An authenticated user may not use a sender outside its patterns (553).
    """
    with submission(server) as client:
        client.starttls(context=tlsContext())
        client.login(USER, PASSWORD)
        code, text = client.mail("mallory@elsewhere.test")
        assert (code, text[:5]) == (553, b"5.7.1")


def test_wrongPassword(server: MailfwProcess) -> None:
    """
    A wrong password gets 535 5.7.8 (smtplib raises).
    """
    with submission(server) as client:
        client.starttls(context=tlsContext())
        with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
            client.login(USER, "wrong")
        assert raised.value.smtp_code == 535


def test_implicitTLS(server: MailfwProcess) -> None:
    """
    On the C{ssl:} listener (465) the session is TLS at once: AUTH is
    offered in the first EHLO and a message for a local user is delivered.
    """
    port = server.submissionsPort  # type: ignore[attr-defined]
    with smtplib.SMTP_SSL(
        "127.0.0.1", port, local_hostname="client.test", context=tlsContext(), timeout=TIMEOUT
    ) as client:
        client.ehlo()
        assert client.has_extn("auth")
        assert not client.has_extn("starttls")
        client.login(USER, PASSWORD)
        assert client.send_message(message("carol@localhost", "via 465")) == {}
    waitFor(lambda: server.delivered("carol"), what="delivery to carol")
    [path] = server.delivered("carol")
    text = path.read_bytes()
    assert b"Subject: via 465" in text
    assert b" with ESMTPSA id " in text


def test_swaks(server: MailfwProcess, sink: Sink) -> None:
    """
    swaks with STARTTLS and AUTH PLAIN, then AUTH LOGIN, relays to the
    remote domain.
    """
    swaks = requireTool("swaks")
    for mechanism in ("PLAIN", "LOGIN"):
        result = subprocess.run(
            [
                swaks,
                "--server",
                "127.0.0.1",
                "--port",
                str(server.submissionPort),
                "--helo",
                "client.test",
                "--tls",
                "--auth",
                mechanism,
                "--auth-user",
                USER,
                "--auth-password",
                PASSWORD,
                "--from",
                USER,
                "--to",
                "dave@remote.test",
                "--header",
                f"Subject: swaks {mechanism}",
                "--timeout",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0 Authentication successful" in result.stdout
        waitFor(
            lambda mechanism=mechanism: any(f"swaks {mechanism}".encode() in m for m in sink.messages()),
            what=f"the swaks {mechanism} message at smtp-sink",
        )


def test_anonymousRelayRefused(server: MailfwProcess) -> None:
    """
    Without AUTH the same remote recipient is refused on the MX port
    (554 5.7.1), and the submission port wants AUTH first (530).
    """
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("someone@example.net")[0] == 250
        code, text = client.rcpt("bob@remote.test")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert not client.has_extn("auth")
    with submission(server) as client:
        client.starttls(context=tlsContext())
        client.ehlo()
        assert client.mail(USER)[0] == 530
