"""
End to end through C{twistd mailfw}: relaying to real SMTP servers, and a
permanent refusal turned into a DSN in the sender's mailbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._peers import PEER, Sink, startSink, stopSink
from tests.integration._server import MailfwProcess, running, waitFor

CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "accept.test" = "outbound:[{peer}]:{accepting}", "reject.test" = "outbound:[{peer}]:{rejecting}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
"""


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[tuple[Sink, Sink]]:
    accepting = startSink(tmp_path)
    try:
        rejecting = startSink(tmp_path, "-f", "RCPT", "-B", "550 5.1.1 No such user here")
        try:
            yield accepting, rejecting
        finally:
            stopSink(rejecting)
    finally:
        stopSink(accepting)


@pytest.fixture
def relay(tmp_path: Path, sinks: tuple[Sink, Sink]) -> Iterator[MailfwProcess]:
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(peer=PEER, accepting=sinks[0].port, rejecting=sinks[1].port))
    yield from running(tmp_path / "data", config=config)


def test_relayAndBounce(relay: MailfwProcess, sinks: tuple[Sink, Sink]) -> None:
    """
    One message to an accepting and a refusing server: the first copy
    reaches smtp-sink intact; the refused recipient comes back to the
    (local) sender as an RFC 3464 DSN naming the recipient and the reply.
    """
    accepting, _ = sinks
    with relay.smtp() as client:
        client.sendmail(
            "alice@localhost",
            ["bob@accept.test", "carol@reject.test"],
            b"Subject: relayed\r\nMessage-ID: <e2e@test>\r\n\r\n.dot line\r\nbody\r\n",
        )
    # smtp-sink creates its dump file when the transaction starts and
    # writes it as the data arrives: wait for the whole message.
    waitFor(
        lambda: any(m.rstrip().endswith(b"body") for m in accepting.messages()),
        what="the whole message at smtp-sink",
    )
    [dump] = accepting.messages()
    assert b"Subject: relayed" in dump
    assert b"bob@accept.test" in dump

    waitFor(lambda: relay.delivered("alice"), what="the bounce in alice's Maildir")
    [bounce] = relay.delivered("alice")
    text = bounce.read_bytes()
    assert b'multipart/report; report-type="delivery-status"' in text
    assert b"Final-Recipient: rfc822; carol@reject.test" in text
    assert b"Action: failed" in text
    assert b"Status: 5.1.1" in text
    assert b"Return-Path: <>" in text
    assert b"bob@accept.test" not in text.split(b"message/delivery-status")[1].split(b"\n--")[0]


MAILFW_TO_MAILFW = """
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "b.test" = "outbound:[127.0.0.1]:{port}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
"""

RECEIVER = """
[routing]
plugin = "static"
local_domains = ["b.test"]
[delivery.local]
plugin = "maildir"
"""


def test_mailfwToMailfw(tmp_path: Path) -> None:
    """
    One mailfw relays to another over SMTP with opportunistic STARTTLS (the
    receiver's self-signed certificate): the message lands in the
    receiver's Maildir with both servers' Received headers.
    """
    receiverConfig = tmp_path / "receiver.toml"
    receiverConfig.write_text(RECEIVER)
    receiver = MailfwProcess(tmp_path / "receiver", config=receiverConfig).start()
    try:
        senderConfig = tmp_path / "sender.toml"
        senderConfig.write_text(MAILFW_TO_MAILFW.format(port=receiver.smtpPort))
        sender = MailfwProcess(tmp_path / "sender", config=senderConfig).start()
        try:
            with sender.smtp() as client:
                client.sendmail(
                    "alice@localhost", ["bob@b.test"], b"Subject: hop\r\nMessage-ID: <hop@test>\r\n\r\nhi\r\n"
                )
            waitFor(lambda: receiver.delivered("bob", "b.test"), what="the message at the second mailfw")
            [path] = receiver.delivered("bob", "b.test")
            text = path.read_bytes()
            assert b"Subject: hop" in text
            assert text.count(b"Received: from") == 2
            assert b"with ESMTPS" in text  # the hop between the two used STARTTLS
        finally:
            sender.stop()
    finally:
        receiver.stop()
