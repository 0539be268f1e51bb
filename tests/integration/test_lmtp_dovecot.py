"""
The LMTP agent against a real Dovecot LMTP server (Debian's
C{dovecot-lmtpd}), started by the test in a temporary directory with its
own configuration, listening on a unix socket and on 127.0.0.1.
"""

from __future__ import annotations

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
from tests.integration._peers import Dovecot, requireDovecot

pytestmark = pytest.mark.integration


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    requireDovecot()
    server = Dovecot()
    try:
        server.start()
        yield server
    finally:
        server.remove()


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
