"""
Reload and stop against a real C{twistd -n mailfw} on loopback.

  - SIGHUP re-reads the configuration: the next message follows the new
    routing table, a session open across the signal completes its
    transaction, and a broken file keeps the running table with one log
    line saying why.  With C{--workers 2} the parent forwards the signal
    and every process follows the new table.
  - SIGTERM stops accepting at once, lets a session in the middle of its
    message finish it (and get its 250), then exits within the grace
    period; a session that never finishes does not hold the server past
    it.  The same with workers.
"""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import time
from pathlib import Path

from tests.integration._server import MailfwProcess, waitFor

CONFIG = """\
[server]
shutdown_grace = {grace}

[queue]
plugin = "sqlite"

[routing]
plugin = "static"
local_domains = ["one.test"]
local_agent = "boxA"
transport = {{ "one.test" = "{box}" }}

[delivery.boxA]
plugin = "maildir"
path = "mailA/{{domain}}/{{localpart}}"

[delivery.boxB]
plugin = "maildir"
path = "mailB/{{domain}}/{{localpart}}"
"""


def _config(path: Path, box: str, grace: float = 10.0) -> None:
    # Written whole and renamed, so the server never reads half a file.
    partial = path.with_suffix(".tmp")
    partial.write_text(CONFIG.format(box=box, grace=grace))
    partial.replace(path)


def _server(tmp_path: Path, box: str = "boxA", grace: float = 10.0, workers: int = 1) -> MailfwProcess:
    config = tmp_path / "mailfw.toml"
    _config(config, box, grace)
    extra = ("--workers", str(workers)) if workers > 1 else ()
    return MailfwProcess(tmp_path / "data", config=config, extraArgs=extra)


def _delivered(server: MailfwProcess, box: str) -> list[Path]:
    """
    The messages in C{box}'s maildir for C{bob@one.test}.
    """
    new = server.dataDir / ("mailA" if box == "boxA" else "mailB") / "one.test" / "bob" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def _send(server: MailfwProcess, subject: str) -> None:
    with server.smtp() as s:
        s.sendmail("alice@client.test", ["bob@one.test"], f"Subject: {subject}\r\n\r\nbody\r\n")


def _log(server: MailfwProcess) -> str:
    assert server.logPath is not None
    return server.logPath.read_text("utf-8", "replace")


def _openTransaction(server: MailfwProcess) -> smtplib.SMTP:
    """
    A session that has sent MAIL, RCPT, DATA and half of its message.
    """
    s = server.smtp()
    s.ehlo("client.test")
    assert s.mail("alice@client.test")[0] == 250
    assert s.rcpt("bob@one.test")[0] == 250
    assert s.docmd("DATA")[0] == 354
    s.send(b"Subject: open across the signal\r\n\r\nfirst half\r\n")
    return s


def _finish(s: smtplib.SMTP) -> tuple[int, bytes]:
    s.send(b"second half\r\n.\r\n")
    return s.getreply()


def _signal(server: MailfwProcess, number: int) -> None:
    assert server.process is not None
    server.process.send_signal(number)


def _reloads(server: MailfwProcess, word: str) -> int:
    return _log(server).count(f"configuration {word}")


def test_hupFollowsNewTable(tmp_path: Path) -> None:
    """
    After the routing table changes and SIGHUP, the next message is
    delivered by the new table's instance; a session open across the
    signal still gets its 250 and its QUIT; then a broken file is refused
    with one log line and the last good table stays in force.
    """
    server = _server(tmp_path).start()
    try:
        _send(server, "before")
        waitFor(lambda: len(_delivered(server, "boxA")) == 1, what="delivery to boxA")

        session = _openTransaction(server)
        _config(server.config, "boxB")  # type: ignore[arg-type]
        _signal(server, signal.SIGHUP)
        waitFor(lambda: _reloads(server, "reloaded") == 1, what="the reload log line")
        assert _finish(session)[0] == 250, "the session open across SIGHUP lost its message"
        assert session.quit()[0] == 221

        _send(server, "after")
        # Both later deliveries (the open session's and the new one) use
        # the new table.
        waitFor(lambda: len(_delivered(server, "boxB")) == 2, what="delivery to boxB")
        assert len(_delivered(server, "boxA")) == 1

        broken = server.config.read_text().replace('"boxB" }', '"boxC" }')  # type: ignore[union-attr]
        server.config.write_text(broken)  # type: ignore[union-attr]
        _signal(server, signal.SIGHUP)
        waitFor(lambda: _reloads(server, "reload") > 1, what="the failed reload log line")
        [line] = [
            entry
            for entry in _log(server).splitlines()
            if "configuration reload" in entry and "failed" in entry
        ]
        assert "keeping the running configuration" in line and "boxC" in line, line
        _send(server, "after the broken file")
        waitFor(lambda: len(_delivered(server, "boxB")) == 3, what="delivery by the last good table")
        assert len(_delivered(server, "boxA")) == 1
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()


def test_hupWithWorkers(tmp_path: Path) -> None:
    """
    With C{--workers 2} the parent forwards SIGHUP: both processes reload
    and every later message, whichever process takes it, follows the new
    table.
    """
    server = _server(tmp_path, workers=2).start()
    try:
        waitFor(lambda: "worker 1] SMTPFactory starting on" in _log(server), what="the worker")
        _config(server.config, "boxB")  # type: ignore[arg-type]
        _signal(server, signal.SIGHUP)
        waitFor(lambda: _reloads(server, "reloaded") == 2, what="a reload in each process")
        assert "worker 1" in next(
            line
            for line in _log(server).splitlines()
            if "configuration reloaded" in line and "worker" in line
        )
        for n in range(10):
            _send(server, f"message {n}")
        waitFor(lambda: len(_delivered(server, "boxB")) == 10, what="deliveries to boxB")
        assert _delivered(server, "boxA") == []
    finally:
        server.stop()


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_termFinishesTransaction(tmp_path: Path) -> None:
    """
    SIGTERM: new connections are refused at once, a session in the middle
    of its message gets its 250 when it finishes, then 421, and the
    process exits well within the grace period; the message is durable
    and delivered after a restart.
    """
    grace = 10.0
    server = _server(tmp_path, grace=grace).start()
    assert server.process is not None
    session = _openTransaction(server)
    started = time.monotonic()
    _signal(server, signal.SIGTERM)
    waitFor(lambda: _refused(server.smtpPort), timeout=5, what="the listener to close")
    assert server.process.poll() is None, "stopped without waiting for the open transaction"
    code, _ = _finish(session)
    assert code == 250, "the transaction under way at SIGTERM was refused"
    assert session.getreply()[0] == 421
    server.process.wait(grace)
    assert time.monotonic() - started < grace
    # twistd ends itself with the signal that stopped it.
    assert server.process.returncode == -signal.SIGTERM
    # (The start-up check's own connection may still count.)
    assert re.search(r"stopping: waiting up to 10s for [12] sessions", _log(server))
    assert "Traceback" not in _log(server)

    server.start()
    try:
        waitFor(lambda: len(_delivered(server, "boxA")) == 1, what="the message accepted while stopping")
    finally:
        server.stop()


def test_termGraceExpires(tmp_path: Path) -> None:
    """
    A session that never finishes its message does not keep the server
    past the grace period: it is cut off and the process exits.
    """
    grace = 3.0
    server = _server(tmp_path, grace=grace).start()
    assert server.process is not None
    session = _openTransaction(server)
    started = time.monotonic()
    _signal(server, signal.SIGTERM)
    server.process.wait(grace + 10)
    elapsed = time.monotonic() - started
    assert grace - 0.5 <= elapsed < grace + 10, elapsed
    assert "1 sessions still open after the grace period" in _log(server)
    session.close()


def test_termWithWorkers(tmp_path: Path) -> None:
    """
    With C{--workers 2}, sessions in the middle of a message in either
    process get their 250 after SIGTERM, and the whole server exits
    within the grace period.
    """
    grace = 10.0
    server = _server(tmp_path, grace=grace, workers=2).start()
    assert server.process is not None
    waitFor(lambda: "worker 1] SMTPFactory starting on" in _log(server), what="the worker")
    sessions = [_openTransaction(server) for _ in range(6)]
    started = time.monotonic()
    _signal(server, signal.SIGTERM)
    waitFor(lambda: _refused(server.smtpPort), timeout=5, what="the listeners to close")
    assert [_finish(s)[0] for s in sessions] == [250] * len(sessions)
    server.process.wait(grace + 5)
    assert time.monotonic() - started < grace + 5
    assert "worker 1 stopped" in _log(server)
    for s in sessions:
        s.close()
    server.start()
    try:
        waitFor(lambda: len(_delivered(server, "boxA")) == len(sessions), what="every accepted message")
    finally:
        server.stop()
