"""
End to end: the embedded default accepts mail from real clients and
delivers it into a Maildir.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
from email.message import EmailMessage
from pathlib import Path

from tests.integration._server import TWISTD, MailfwProcess, freePort, requireTool, waitFor


def test_smtplibToMaildir(mailfw: MailfwProcess) -> None:
    """
    A message sent with smtplib gets 250 and lands in the recipient's
    Maildir under the data directory, with a Received: header naming the
    queue ID.
    """
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "bob@localhost"
    message["Subject"] = "hello"
    message.set_content("Hello Bob.\n.leading dot\n")
    with mailfw.smtp() as client:
        refused = client.send_message(message)
        assert refused == {}
    waitFor(lambda: mailfw.delivered("bob"), what="delivery to bob's Maildir")
    [path] = mailfw.delivered("bob")
    data = path.read_bytes()
    assert b"Received: from client.test" in data
    assert b"Subject: hello" in data
    assert b"\r\n.leading dot\r\n" in data or b"\n.leading dot\n" in data


def test_relayRefused(mailfw: MailfwProcess) -> None:
    """
    The embedded default is no open relay: a remote recipient is refused.
    """
    with mailfw.smtp() as client:
        client.ehlo()
        client.mail("alice@example.org")
        code, _ = client.rcpt("victim@example.net")
    assert code == 554


def test_smtputf8(mailfw: MailfwProcess) -> None:
    """
    An internationalised message is accepted with SMTPUTF8 and delivered.
    """
    message = EmailMessage()
    message["From"] = "jörg@example.org"
    message["To"] = "dörte@localhost"
    message["Subject"] = "grüße"
    message.set_content("Grüße\n")
    with mailfw.smtp() as client:
        client.send_message(message)  # smtplib adds SMTPUTF8 and BODY=8BITMIME itself
    waitFor(lambda: mailfw.delivered("dörte"), what="delivery to dörte's Maildir")


def test_swaks(mailfw: MailfwProcess) -> None:
    """
    swaks, with PIPELINING, delivers a message.
    """
    swaks = requireTool("swaks")
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{mailfw.smtpPort}",
            "--pipeline",
            "--from",
            "carol@example.org",
            "--to",
            "dave@localhost",
            "--header",
            "Subject: via swaks",
            "--helo",
            "client.test",
        ],
        capture_output=True,
        timeout=60,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    waitFor(lambda: mailfw.delivered("dave"), what="delivery to dave's Maildir")


def test_portInUseStopsStartUp(tmp_path: Path) -> None:
    """
    A listener that cannot be bound ends twistd at start-up with the reason,
    instead of leaving a server running that receives no mail.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "mailfw",
                f"--data-dir={tmp_path}",
                f"--smtp=tcp:{port}:interface=127.0.0.1",
                f"--submission=tcp:{freePort()}:interface=127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "Address already in use" in result.stdout + result.stderr


def test_bdatRaw(mailfw: MailfwProcess) -> None:
    """
    CHUNKING (RFC 3030), which smtplib does not speak: a message sent raw
    in two BDAT chunks, the last with LAST, is accepted and delivered byte
    for byte (BDAT data is not dot-stuffed).
    """
    first = b"Subject: chunked\r\n\r\n.not stuffed\r\n"
    second = b"second chunk\r\n"
    with socket.create_connection(("127.0.0.1", mailfw.smtpPort), timeout=30) as s:
        reader = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if line[3:4] != b"-":
                    return line

        assert reply().startswith(b"220")
        s.sendall(b"EHLO client.test\r\n")
        assert reply().startswith(b"250")
        s.sendall(b"MAIL FROM:<carol@example.org>\r\nRCPT TO:<erin@localhost>\r\n")
        assert reply().startswith(b"250") and reply().startswith(b"250")
        s.sendall(b"BDAT %d\r\n" % len(first) + first)
        assert reply().startswith(b"250")
        s.sendall(b"BDAT %d LAST\r\n" % len(second) + second)
        assert reply().startswith(b"250 2.0.0")
        s.sendall(b"QUIT\r\n")
        assert reply().startswith(b"221")
    waitFor(lambda: mailfw.delivered("erin"), what="delivery to erin's Maildir")
    [path] = mailfw.delivered("erin")
    data = path.read_bytes().replace(b"\r\n", b"\n")
    assert b"\n.not stuffed\nsecond chunk\n" in data


def test_twist(tmp_path: Path) -> None:
    """
    The same plugin runs under C{twist} (the service-manager friendly
    runner): it accepts a message and delivers it.
    """
    twist = str(Path(TWISTD).parent / "twist")
    port = freePort()
    process = subprocess.Popen(
        [
            twist,
            "mailfw",
            f"--data-dir={tmp_path / 'data'}",
            "--hostname=mx.test",
            f"--smtp=tcp:{port}:interface=127.0.0.1",
            f"--submission=tcp:{freePort()}:interface=127.0.0.1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        waitFor(accepting, what="twist mailfw listening")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            assert (
                client.sendmail("a@example.org", ["frank@localhost"], b"Subject: twist\r\n\r\nhi\r\n") == {}
            )
        waitFor(
            lambda: any((tmp_path / "data" / "mail" / "localhost" / "frank" / "new").glob("*")),
            what="delivery under twist",
        )
    finally:
        process.terminate()
        process.wait(15)
