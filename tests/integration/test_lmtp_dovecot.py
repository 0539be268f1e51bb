"""
The LMTP agent against a real Dovecot LMTP server (Debian's
C{dovecot-lmtpd}), started by the test in a temporary directory with its
own configuration, listening on a unix socket and on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.endpoints import UNIXClientEndpoint

from mailfw.address import Address
from mailfw.config import ComponentContext
from mailfw.delivery._lmtp import LMTPDeliveryAgent, fromConfig
from mailfw.delivery._memory import BytesBody
from mailfw.envelope import Envelope, Recipient

pytestmark = pytest.mark.integration

DOVECOT = "/usr/sbin/dovecot"
USERS = ("alice", "bob")

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = mailfw-test-{port}
protocols = lmtp
listen = 127.0.0.1
ssl = no
{users}
auth_username_format = %Ln
first_valid_uid = {uid}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
service lmtp {{
  unix_listener lmtp-mailfw {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Dovecot:
    """
    A throwaway Dovecot serving LMTP for the users in L{USERS}.
    """

    def __init__(self) -> None:
        # Short path: unix socket names are limited to about 100 octets.
        self.root = Path(tempfile.mkdtemp(prefix="mfdv"))
        self.port = freePort()
        self.socket = self.root / "run" / "lmtp-mailfw"
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            # Dovecot will not deliver as root; mail belongs to nobody.
            mailUID, mailGID = 65534, 65534
            users = ""
        else:
            mailUID, mailGID = uid, gid
            name = pwd.getpwuid(uid).pw_name
            users = f"default_internal_user = {name}\ndefault_login_user = {name}"
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir()
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "mail", 0o777)
        (self.root / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}x:{mailUID}:{mailGID}::{self.root}/mail/{user}::\n" for user in USERS)
        )
        (self.root / "dovecot.conf").write_text(
            CONFIG.format(root=self.root, port=self.port, users=users, uid=min(mailUID, 500))
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [DOVECOT, "-c", str(self.root / "dovecot.conf"), "-F"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.output()}")
            if self.socket.exists() and self._listening():
                return
            time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start: {self.output()}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def output(self) -> str:
        log = self.root / "dovecot.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def messages(self, user: str) -> list[bytes]:
        new = self.root / "mail" / user / "Maildir" / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    if not os.access(DOVECOT, os.X_OK):
        # A failure, not a skip: CI installs it (.ci/run), and a silently
        # skipped real-server test would hide a broken LMTP client.
        pytest.fail("Dovecot is not installed (Debian: dovecot-lmtpd)")
    server = Dovecot()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


MESSAGE = (
    b"From: sender@example.net\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: LMTP test\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
)


def envelopeTo(*localparts: str) -> Envelope:
    return Envelope(
        sender=Address("sender", "example.net"),
        recipients=tuple(Recipient(Address(lp, "example.org")) for lp in localparts),
    )


def agentFor(dovecot: Dovecot, endpoint: str) -> LMTPDeliveryAgent:
    context = ComponentContext(reactor=reactor(), hostname="mx.example", dataDir=dovecot.root)
    return fromConfig(context, "dovecot", {"endpoint": endpoint, "command_timeout": 30})


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_perRecipientOutcomesOverUnixSocket(dovecot: Dovecot) -> None:
    """
    Over the unix socket, known users get 250 and their copy (dot-stuffing
    undone), an unknown user gets 550 5.1.1, in envelope order.
    """
    agent = agentFor(dovecot, f"unix:{dovecot.socket}")
    outcomes = await agent.deliver(envelopeTo("alice", "nobody", "bob"), BytesBody(MESSAGE), None)
    summary = [(str(o.recipient.address), o.reply.code, o.reply.enhanced) for o in outcomes]
    assert summary == [
        ("alice@example.org", 250, "2.0.0"),
        ("nobody@example.org", 550, "5.1.1"),
        ("bob@example.org", 250, "2.0.0"),
    ], dovecot.output()
    assert outcomes[0].remoteMTA
    for user in ("alice", "bob"):
        [stored] = dovecot.messages(user)
        assert stored.replace(b"\r\n", b"\n").endswith(MESSAGE.replace(b"\r\n", b"\n"))
        assert b"Return-Path: <sender@example.net>" in stored


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_largeMessageOverTCP(dovecot: Dovecot) -> None:
    """
    A message of several megabytes streams over TCP and arrives intact.
    """
    line = b"." + b"x" * 76 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * 40_000  # about 3 MB, every line dot-stuffed
    agent = agentFor(dovecot, f"tcp:host=127.0.0.1:port={dovecot.port}")
    [outcome] = await agent.deliver(envelopeTo("alice"), BytesBody(big), None)
    assert (outcome.reply.code, outcome.reply.enhanced) == (250, "2.0.0"), dovecot.output()
    [stored] = dovecot.messages("alice")
    assert stored.replace(b"\r\n", b"\n").endswith(big.replace(b"\r\n", b"\n"))


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_connectionRefusedDefers(tmp_path: Path) -> None:
    """
    With no server on the socket, every recipient is deferred with 4.4.1.
    """
    agent = LMTPDeliveryAgent(
        "lmtp",
        UNIXClientEndpoint(reactor(), str(tmp_path / "absent")),
        reactor(),
        "mx.example",
    )
    outcomes = await agent.deliver(envelopeTo("alice", "bob"), BytesBody(MESSAGE), None)
    assert [(o.reply.code, o.reply.enhanced) for o in outcomes] == [(451, "4.4.1")] * 2
