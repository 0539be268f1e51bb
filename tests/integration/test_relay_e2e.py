"""
End to end through C{twistd mailfw}: relaying to real SMTP servers, and a
permanent refusal turned into a DSN in the sender's mailbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

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
    assert b"multipart/report; report-type=\"delivery-status\"" in text
    assert b"Final-Recipient: rfc822; carol@reject.test" in text
    assert b"Action: failed" in text
    assert b"Status: 5.1.1" in text
    assert b"Return-Path: <>" in text
    assert b"bob@accept.test" not in text.split(b"message/delivery-status")[1].split(b"\n--")[0]
