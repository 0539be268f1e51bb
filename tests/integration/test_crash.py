"""
Crash safety: a message that got its 250 survives a SIGKILL of the server
at any moment, and is delivered after a restart.
"""

from __future__ import annotations

import smtplib
import threading
from email.parser import BytesHeaderParser
from pathlib import Path

from tests.integration._server import MailfwProcess, waitFor

SENDERS = 4
ACKED_BEFORE_KILL = 150


def deliveredIDs(server: MailfwProcess) -> list[str]:
    """
    The Message-ID of every file in victim@localhost's Maildir (with
    duplicates, if any).
    """
    parser = BytesHeaderParser()
    ids = []
    for path in server.delivered("victim"):
        with path.open("rb") as f:
            ids.append(str(parser.parse(f)["Message-ID"]))
    return ids


def test_sigkillLosesNothingAcknowledged(tmp_path: Path) -> None:
    """
    Several clients send a stream of messages; the server is killed with
    SIGKILL in the middle and restarted on the same data; every message that
    was answered 250 is delivered afterwards, none more than twice.
    """
    server = MailfwProcess(tmp_path / "data").start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(worker: int) -> None:
        try:
            with server.smtp() as client:
                for n in range(100_000):
                    if stop.is_set():
                        return
                    messageID = f"<{worker}.{n}@crash.test>"
                    client.sendmail(
                        "sender@example.org",
                        ["victim@localhost"],
                        f"Message-ID: {messageID}\r\nSubject: {n}\r\n\r\n{'x' * 900}\r\n".encode(),
                    )
                    with lock:
                        acked.append(messageID)
        except (smtplib.SMTPException, OSError):
            return  # the server died under us: expected

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
    try:
        for thread in threads:
            thread.start()
        waitFor(lambda: len(acked) >= ACKED_BEFORE_KILL, timeout=60, what="messages acknowledged")
        server.kill()
        stop.set()
        for thread in threads:
            thread.join(30)
        with lock:
            survivors = set(acked)
        assert len(survivors) >= ACKED_BEFORE_KILL
        beforeRestart = set(deliveredIDs(server))
        print(f"acknowledged {len(survivors)}, delivered before the restart {len(beforeRestart & survivors)}")

        server.start()
        waitFor(
            lambda: survivors <= set(deliveredIDs(server)),
            timeout=60,
            what=f"all {len(survivors)} acknowledged messages delivered after restart",
        )
        ids = deliveredIDs(server)
        duplicates = {i for i in ids if ids.count(i) > 2}
        assert not duplicates, f"delivered more than twice: {sorted(duplicates)[:5]}"
    finally:
        stop.set()
        server.stop()
