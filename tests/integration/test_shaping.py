"""
Traffic shaping and RFC 9422 C{LIMITS} through C{twistd mailfw}: a paced
destination measured at Postfix's C{smtp-sink} on real time, and a second
mailfw announcing C{LIMITS RCPTMAX=2} receiving one message in several
transactions.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._peers import PEER, Sink, startSink, stopSink
from tests.integration._server import MailfwProcess, running, waitFor

RATE = 240
"""Messages per minute: one every quarter second."""
COUNT = 30

PACED = """
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "paced.test" = "outbound:[{peer}]:{port}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
tls = "none"
[scheduler]
shaping_wait = 2
[scheduler.destinations."paced.test"]
max_messages_per_minute = {rate}
"""


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = startSink(tmp_path)
    yield s
    stopSink(s)


@pytest.fixture
def paced(tmp_path: Path, sink: Sink) -> Iterator[MailfwProcess]:
    config = tmp_path / "mailfw.toml"
    config.write_text(PACED.format(peer=PEER, port=sink.port, rate=RATE))
    yield from running(tmp_path / "data", config=config)


def test_pacedToSmtpSink(paced: MailfwProcess, sink: Sink) -> None:
    """
    With C{max_messages_per_minute = 240} (and C{shaping_wait = 2}, so most
    of them wait in the queue rather than in memory), 30 messages queued at
    once reach smtp-sink a quarter second apart or more, in about 7.25
    seconds, all delivered and none bounced or counted as failed.
    """
    started = time.monotonic()
    with paced.smtp() as client:
        for n in range(COUNT):
            client.sendmail("alice@localhost", [f"u{n}@paced.test"], b"Subject: paced %d\r\n\r\nbody\r\n" % n)
    queued = time.monotonic() - started
    waitFor(
        lambda: len([m for m in sink.messages() if m.rstrip().endswith(b"body")]) == COUNT,
        timeout=40,
        what=f"{COUNT} messages at smtp-sink",
    )
    arrivals = sorted(p.stat().st_mtime for p in sink.dumps.iterdir())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    span = arrivals[-1] - arrivals[0]
    interval = 60 / RATE
    print(f"queued {COUNT} in {queued:.2f}s; delivered over {span:.2f}s; smallest gap {min(gaps):.3f}s")
    # smtp-sink stamps the dump when the data has arrived; a delivery's
    # start is paced, its end may drift by a few milliseconds.
    assert min(gaps) > interval - 0.05, gaps
    assert (COUNT - 1) * interval - 0.1 <= span <= (COUNT - 1) * interval + 2.0, span
    assert paced.logPath is not None
    log = paced.logPath.read_text("utf-8", "replace")
    assert "4.4.7" not in log
    assert not paced.delivered("alice"), "a notice came back to the sender"
    relayed = re.findall(r"Relayed to u\d+@paced\.test via .*: 250", log)
    assert len(relayed) == COUNT, log


RECEIVER = """
[routing]
plugin = "static"
local_domains = ["b.test"]
[delivery.local]
plugin = "maildir"
[smtp]
max_recipients = 2
"""

SENDER = """
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


def test_limitsSplitTransactions(tmp_path: Path) -> None:
    """
    A mailfw announcing C{LIMITS RCPTMAX=2} gets a 5-recipient message from
    another mailfw in three transactions (three queue IDs in its Received
    headers, for 2, 2 and 1 recipients), every recipient delivered and
    none refused with 452.
    """
    receiverConfig = tmp_path / "receiver.toml"
    receiverConfig.write_text(RECEIVER)
    receiver = MailfwProcess(tmp_path / "receiver", config=receiverConfig).start()
    try:
        senderConfig = tmp_path / "sender.toml"
        senderConfig.write_text(SENDER.format(port=receiver.smtpPort))
        sender = MailfwProcess(tmp_path / "sender", config=senderConfig).start()
        try:
            users = [f"user{n}" for n in range(5)]
            with sender.smtp() as client:
                client.sendmail(
                    "alice@localhost",
                    [f"{u}@b.test" for u in users],
                    b"Subject: many\r\nMessage-ID: <many@test>\r\n\r\nhi\r\n",
                )
            waitFor(
                lambda: all(receiver.delivered(u, "b.test") for u in users),
                what="all five recipients at the second mailfw",
            )
            ids: dict[str, int] = {}
            for u in users:
                [path] = receiver.delivered(u, "b.test")
                match = re.search(rb"by mx\.test with ESMTPS? id (\S+)", path.read_bytes())
                assert match is not None
                queueID = match.group(1).decode().rstrip(";")
                ids[queueID] = ids.get(queueID, 0) + 1
            assert sorted(ids.values()) == [1, 2, 2], ids
            assert sender.logPath is not None
            log = sender.logPath.read_text("utf-8", "replace")
            assert "452 4.5.3" not in log
            assert "Sending 5 recipients to 127.0.0.1 in 3 transactions (RCPTMAX 2)" in log, log[-3000:]
        finally:
            sender.stop()
    finally:
        receiver.stop()
