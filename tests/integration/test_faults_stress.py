"""
Stress mode against a real C{twistd mailfw} on loopback: a flood of idle
connections past C{[smtp] stress_threshold} makes the sessions that begin
under stress time out after C{stress_idle_timeout}, while those that began
before keep the normal idle timeout; entering and leaving stress mode are
logged once each.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

from tests.integration._server import MailfwProcess, waitFor

CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]

[delivery.local]
plugin = "discard"

[smtp]
max_connections = 40
stress_threshold = 12
stress_idle_timeout = 2
idle_timeout = 60
"""

CALM = 8
STRESSED = 10
THRESHOLD = 12


def greeted(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert s.recv(512).startswith(b"220 "), "no greeting"
    return s


def closedWithin(sockets: list[socket.socket], seconds: float) -> dict[socket.socket, bytes]:
    """
    What each of C{sockets} that the server closed within C{seconds} was
    told before the close (their greetings were already read).
    """
    said: dict[socket.socket, bytes] = {s: b"" for s in sockets}
    closed: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + seconds
    while len(closed) < len(sockets) and time.monotonic() < deadline:
        waiting = [s for s in sockets if s not in closed]
        readable, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
        for s in readable:
            data = s.recv(512)
            if data:
                said[s] += data
            else:
                closed[s] = said[s]
    return closed


def test_stressShortensIdleTimeout(tmp_path: Path) -> None:
    """
    With 8 idle sessions open, 10 more push the listener past its
    threshold of 12: the 7 sessions that began under stress get 421 after
    the 2 s stress idle timeout while the first 8 are told nothing (their
    idle timeout is 60 s), and once all close stress mode ends; each change
    is one log line.
    """
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG)
    server = MailfwProcess(tmp_path / "data", config=config).start()
    sockets: list[socket.socket] = []
    try:
        calm = [greeted(server.smtpPort) for _ in range(CALM)]
        sockets += calm
        started = time.monotonic()
        flood = [greeted(server.smtpPort) for _ in range(STRESSED)]
        sockets += flood
        # Connection 12 (the threshold) is the fourth of the flood.
        stressed = flood[THRESHOLD - CALM - 1 :]
        closed = closedWithin(stressed, 8.0)
        elapsed = time.monotonic() - started
        assert len(closed) == len(stressed), (len(closed), server.output())
        for s in stressed:
            assert closed[s].startswith(b"421 "), closed[s]
        assert 2.0 <= elapsed < 8.0, elapsed
        readable, _, _ = select.select(calm, [], [], 0)
        assert readable == [], "a calm session was told something or closed"
        print(f"\nstress: {len(stressed)} sessions begun under stress closed after {elapsed:.1f} s idle")
        for s in sockets:
            s.close()
        waitFor(lambda: "stress mode off" in server.output(), timeout=10, what="stress mode to end")
        log = server.output()
        assert log.count("stress mode on") == 1, log
        assert log.count("stress mode off") == 1, log
    finally:
        for s in sockets:
            s.close()
        server.stop()
