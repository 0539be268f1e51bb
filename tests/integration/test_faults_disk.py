"""
A full disk and a read-only disk under a running C{twistd mailfw}: the data
directory (the SQLite queue) and the Maildir root (its C{mail/}
subdirectory) are two small tmpfs mounts that the test fills or makes
read-only in turn.

While the queue's disk is full, DATA gets 452 4.3.1 and nothing of the
refused message stays queued; while the Maildir's disk is full, delivery
defers with 4.3.1 and the message waits in the queue.  When space returns,
everything that got a 250 is delivered, once, with no operator action.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._faults import (
    attempt,
    deliveredCounts,
    ext4,
    fill,
    logOf,
    mounted,
    remount,
    summary,
)
from tests.integration._server import MailfwProcess, waitFor

MAILFW = str(Path(sys.executable).parent / "mailfw")

CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]

[delivery.local]
plugin = "maildir"

[scheduler]
first_retry = 1
backoff = 1
max_retry = 1
jitter = 0
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MailfwProcess]:
    """
    mailfw with its data directory on a 24 MiB tmpfs and its Maildirs on a
    2 MiB tmpfs of their own.
    """
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG)
    data = tmp_path / "data"
    with mounted(data, 24 * 1024), mounted(data / "mail", 2 * 1024):
        process = MailfwProcess(data, config=config)
        # The log goes beside the data directory, not on the small disks.
        try:
            yield process.start()
        finally:
            process.stop()


def queued(server: MailfwProcess) -> list[dict]:  # type: ignore[type-arg]
    result = subprocess.run(
        [MAILFW, "queue", "list", "--json", "--data-dir", str(server.dataDir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def send(server: MailfwProcess, prefix: str, count: int, acknowledged: set[str]) -> list[int]:
    codes = []
    for n in range(count):
        ident = f"{prefix}-{n}"
        code = attempt(server.smtpPort, ident)
        codes.append(code)
        if code == 250:
            acknowledged.add(ident)
    return codes


def test_diskFull(server: MailfwProcess) -> None:
    """
    A full Maildir disk defers delivery (4.3.1) and a full queue disk
    refuses DATA with 452 4.3.1; when both have room again every
    acknowledged message is delivered exactly once, and no refused one.
    """
    maildir = server.maildir("user")
    acknowledged: set[str] = set()
    assert send(server, "before", 5, acknowledged) == [250] * 5
    waitFor(lambda: len(deliveredCounts(maildir)) == 5, what="the first messages delivered")

    mailFiller = fill(server.dataDir / "mail")
    assert send(server, "mailfull", 10, acknowledged) == [250] * 10, "the queue had room"
    waitFor(lambda: "4.3.1" in logOf(server), what="a delivery deferred with 4.3.1")
    assert len(deliveredCounts(maildir)) == 5

    queueFiller = fill(server.dataDir)
    codes = send(server, "queuefull", 10, acknowledged)
    refused = [c for c in codes if c != 250]
    print(f"\nwhile the queue's disk was full: replies {sorted(set(codes))}")
    assert refused and set(refused) <= {452}, codes
    assert len(queued(server)) == 10, "a refused message was queued, or one was lost"

    queueFiller.unlink()
    mailFiller.unlink()
    waitFor(
        lambda: set(deliveredCounts(maildir)) >= acknowledged,
        timeout=30,
        what="every acknowledged message delivered after space returned",
    )
    waitFor(lambda: queued(server) == [], timeout=15, what="the queue to empty")
    counts = deliveredCounts(maildir)
    print(summary(acknowledged, counts, refused452=len(refused)))
    assert set(counts) == acknowledged, f"delivered but never acknowledged: {set(counts) - acknowledged}"
    assert max(counts.values()) == 1, counts


def test_readOnly(tmp_path: Path) -> None:
    """
    A read-only Maildir disk defers delivery.  A queue disk that turns
    read-only under the server (a disk error on ext4 with
    C{errors=remount-ro}) gets a 4xx for every DATA and no 250, and the
    server stays up and answers; after the operator repairs the disk and
    restarts mailfw, everything acknowledged is delivered once.
    """
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG)
    data = tmp_path / "data"
    acknowledged: set[str] = set()
    with ext4(data, 32) as disk, mounted(data / "mail", 2 * 1024):
        server = MailfwProcess(data, config=config).start()
        try:
            maildir = server.maildir("user")
            assert send(server, "before", 3, acknowledged) == [250] * 3
            waitFor(lambda: len(deliveredCounts(maildir)) == 3, what="the first messages delivered")

            remount(data / "mail", "ro")
            assert send(server, "mailro", 5, acknowledged) == [250] * 5, "the queue had its disk"
            waitFor(lambda: "Read-only file system" in logOf(server), what="a delivery deferred")
            assert len(deliveredCounts(maildir)) == 3

            disk.fail()
            codes = send(server, "queuero", 5, acknowledged)
            print(f"\nwhile the queue's disk was read-only: replies {sorted(set(codes))}")
            assert all(400 <= c < 500 for c in codes), codes
            with server.smtp() as client:
                assert client.noop()[0] == 250, "the server stopped answering"
            remount(data / "mail", "rw")
        finally:
            server.stop()
        # The Maildirs' tmpfs sits inside the data directory: count what it
        # holds, and give the repaired disk a fresh one.
        before = deliveredCounts(maildir)
        subprocess.run(["umount", str(data / "mail")], check=True, capture_output=True)
        disk.repair()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data / "mail")], check=True)
        server.start()
        try:
            waitFor(
                lambda: set(before + deliveredCounts(maildir)) >= acknowledged,
                timeout=30,
                what="every acknowledged message delivered after the repair",
            )
            counts = before + deliveredCounts(maildir)
            print(summary(acknowledged, counts, refused=len(codes)))
            assert set(counts) == acknowledged
            assert max(counts.values()) == 1, counts
        finally:
            server.stop()
