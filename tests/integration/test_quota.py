"""
Sending quotas end to end: a real C{twistd mailfw} with C{[auth.quotas]
messages_per_hour = 5}, two users made by C{mailfw passwd}, and Python's
C{smtplib} over STARTTLS on the submission port.  The counters live in the
SQLite queue's shared state, so they survive a restart, and C{mailfw user
quota} reads them from the running server.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

from mailfw.tls import makeSelfSigned
from tests.integration._server import MailfwProcess

MAILFW = str(Path(sys.executable).parent / "mailfw")
TIMEOUT = 30
ALICE, BOB = "alice@localhost", "bob@localhost"
PASSWORD = "correct horse battery"

CONFIG = """
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
passwords = "passwd"
[auth.quotas]
messages_per_hour = 5
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
"""


def _mailfw(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILFW, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT)


def _send(server: MailfwProcess, user: str, subject: str) -> tuple[int, bytes]:
    """
    Log in as C{user} and send one message; the MAIL reply if refused,
    else the end-of-data reply.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", server.submissionPort, local_hostname="client.test", timeout=TIMEOUT) as c:
        c.starttls(context=context)
        c.login(user, PASSWORD)
        code, text = c.mail(user)
        if code != 250:
            return code, text
        assert c.rcpt("carol@localhost")[0] == 250
        return c.data(f"From: {user}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())


def test_sixthMessageDeferred(tmp_path: Path) -> None:
    """
    User A sends 5 messages, the sixth gets 450 4.7.1 while user B still
    sends; C{mailfw user quota} shows A's 5/5; after a restart A is still
    over its quota.
    """
    data = tmp_path / "data"
    data.mkdir()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    makeSelfSigned("mx.test", cert, key)
    for user in (ALICE, BOB):
        made = _mailfw("passwd", "add", user, "--file", str(data / "passwd"), stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(cert=cert, key=key))

    server = MailfwProcess(data, config=config).start()
    try:
        for n in range(5):
            code, text = _send(server, ALICE, f"alice {n}")
            assert code == 250, text
        code, text = _send(server, ALICE, "alice 5")
        assert (code, text) == (450, b"4.7.1 Sending quota exceeded, try again later")
        code, text = _send(server, BOB, "bob 0")
        assert code == 250, text
        shown = _mailfw("user", "quota", ALICE, "-c", str(config), "-d", str(data))
        assert shown.returncode == 0, shown.stderr
        assert "messages_per_hour    5/5" in shown.stdout, shown.stdout
        log = server.logPath.read_text() if server.logPath else ""
        assert log.count(f"sending quota: {ALICE} is over 5 messages per hour") == 1, log[-3000:]
    finally:
        server.stop()

    restarted = MailfwProcess(data, config=config).start()
    try:
        code, text = _send(restarted, ALICE, "after restart")
        assert code == 450, text
        code, text = _send(restarted, BOB, "bob 1")
        assert code == 250, text
    finally:
        restarted.stop()
