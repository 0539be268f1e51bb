"""
A real clamd through the C{clamav} policy: Debian's C{clamd}, started by
the test as a private process (a unix socket and a loopback TCP port) with
a one-signature database the test writes itself, scans what a real
C{twistd mailfw} receives.  A message carrying the signature is refused
with 554 naming it; a clean one is delivered.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, freePort, requireTool, waitFor

MARKER = b"MAILFW-TEST-SIGNATURE-7f3a9c"

CLAMD_CONFIG = """\
LocalSocket {directory}/clamd.sock
TCPSocket {port}
TCPAddr 127.0.0.1
Foreground yes
DatabaseDirectory {directory}/db
PidFile {directory}/clamd.pid
TemporaryDirectory {directory}
LogFile {directory}/clamd.log
User {user}
StreamMaxLength 25M
"""

MAILFW_CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
[policy.virus]
plugin = "clamav"
address = "{address}"
"""


@pytest.fixture(scope="module")
def clamd() -> Iterator[tuple[Path, int]]:
    """
    A private clamd with one signature (an .ndb body pattern matching
    L{MARKER}); yields its unix socket and TCP port.
    """
    program = requireTool("clamd")
    # Short path: unix socket names are limited to about 100 octets.
    directory = Path(tempfile.mkdtemp(prefix="mfclam"))
    (directory / "db").mkdir()
    (directory / "db" / "mailfw.ndb").write_text(f"Mailfw.Test.Signature:0:*:{MARKER.hex()}\n")
    port = freePort()
    user = "root" if os.getuid() == 0 else ""
    config = CLAMD_CONFIG.format(directory=directory, port=port, user=user)
    if not user:
        config = config.replace("User \n", "")
    (directory / "clamd.conf").write_text(config)
    log = (directory / "stderr.log").open("wb")
    child = subprocess.Popen(
        [program, "-c", str(directory / "clamd.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        socket = directory / "clamd.sock"
        waitFor(lambda: socket.exists() or child.poll() is not None, timeout=60, what="clamd")
        assert child.poll() is None, (directory / "stderr.log").read_text()
        yield socket, port
    finally:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def start(tmp_path: Path, address: str) -> MailfwProcess:
    config = tmp_path / "mailfw.toml"
    config.write_text(MAILFW_CONFIG.format(address=address))
    return MailfwProcess(tmp_path / "data", config=config).start()


def message(text: bytes) -> bytes:
    return b"From: Alice <alice@example.org>\r\nTo: bob@localhost\r\nSubject: files\r\n\r\n" + text + b"\r\n"


def test_signatureRefused(tmp_path: Path, clamd: tuple[Path, int]) -> None:
    """
    Over the unix socket: the message carrying the signature is refused at
    the end of DATA with 554 5.7.1 naming it; nothing is delivered.
    """
    socket, _ = clamd
    server = start(tmp_path, f"unix:{socket}")
    try:
        with server.smtp() as client, pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.org", ["bob@localhost"], message(b"here it is: " + MARKER))
        assert refused.value.smtp_code == 554, refused.value
        error = refused.value.smtp_error
        assert isinstance(error, bytes), error
        assert error.startswith(b"5.7.1 ") and b"Mailfw.Test.Signature" in error, error
        assert server.delivered("bob") == []
    finally:
        server.stop()


def test_cleanAccepted(tmp_path: Path, clamd: tuple[Path, int]) -> None:
    """
    Over TCP: a clean message, and a large one streamed in many chunks,
    are delivered.
    """
    _, port = clamd
    server = start(tmp_path, f"inet:127.0.0.1:{port}")
    try:
        with server.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@localhost"], message(b"nothing to see")) == {}
            large = message(b"A line of an attachment, nothing more.\r\n" * 50000)
            assert client.sendmail("alice@example.org", ["bob@localhost"], large) == {}
        waitFor(lambda: len(server.delivered("bob")) == 2, what="delivery")
    finally:
        server.stop()
