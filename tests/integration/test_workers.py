"""
A real C{twistd -n mailfw --workers 2} on loopback: both processes accept
mail from the shared listening socket, every message is delivered exactly
once, and stopping twistd leaves no worker behind.
"""

from __future__ import annotations

import os
import re
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, waitFor

MESSAGES = 200
CONNECTIONS = 20


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return found


def _send(server: MailfwProcess, numbers: range) -> None:
    for n in numbers:
        with smtplib.SMTP("127.0.0.1", server.smtpPort, local_hostname="client.test", timeout=60) as s:
            s.sendmail(
                "sender@client.test",
                ["bob@localhost"],
                f"Subject: message {n}\r\nMessage-ID: <n{n}@client.test>\r\n\r\nbody {n}\r\n",
            )


@pytest.mark.parametrize("logfile", [True, False], ids=["logfile", "stdout"])
def test_twoProcessesShareTheWork(tmp_path: Path, logfile: bool) -> None:
    """
    With C{--workers 2}, 200 messages over 20 parallel connections are
    each delivered once, both processes accepted some, and SIGTERM to
    twistd ends the worker too; the worker's lines are in the log whether
    they pass through the parent (C{--logfile}) or are written by the
    worker to the standard output it shares with the parent, and no line
    is torn.
    """
    server = MailfwProcess(tmp_path / "data", extraArgs=("--workers", "2"), logfile=logfile).start()
    try:
        assert server.process is not None
        waitFor(lambda: len(_children(server.process.pid)) == 1, what="one worker process")
        [worker] = _children(server.process.pid)
        assert server.logPath is not None
        logPath = server.logPath
        waitFor(
            lambda: "worker 1] SMTPFactory starting on" in logPath.read_text(),
            what="the worker to adopt the sockets",
        )
        per = MESSAGES // CONNECTIONS
        with ThreadPoolExecutor(CONNECTIONS) as pool:
            list(pool.map(lambda i: _send(server, range(i * per, (i + 1) * per)), range(CONNECTIONS)))
        waitFor(lambda: len(server.delivered("bob")) >= MESSAGES, timeout=60, what="deliveries")
        time.sleep(1)
        files = server.delivered("bob")
        ids = sorted(
            re.search(rb"Message-ID: <n(\d+)@", f.read_bytes()).group(1)  # type: ignore[union-attr]
            for f in files
        )
        assert ids == sorted(str(n).encode() for n in range(MESSAGES))
        # Either process may deliver what the other accepted (they share
        # the queue), so count who accepted: the worker's lines say so.
        log = logPath.read_text()
        accepted = re.findall(r"\[mailfw\.smtp\._server\.SMTPServerProtocol#info( worker 1)?\] accepted", log)
        assert 0 < accepted.count(" worker 1") < MESSAGES
        torn = [
            line
            for line in log.splitlines()
            if not re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[|\t", line)
        ]
        assert torn == []
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.returncode is not None
    waitFor(lambda: not os.path.exists(f"/proc/{worker}"), timeout=10, what="the worker to end")
