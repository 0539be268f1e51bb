"""
Policy delegation with a real policy server: Debian's postgrey, started by
the test on a loopback port with a 2-second delay, greylists through a
real C{twistd mailfw}'s C{policy-server} policy.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, freePort, requireTool, waitFor

DELAY = 2

MAILFW_CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
[policy.greylist]
plugin = "policy-server"
address = "inet:127.0.0.1:{port}"
"""


@pytest.fixture
def postgrey(tmp_path: Path) -> Iterator[int]:
    program = requireTool("postgrey")
    directory = tmp_path / "postgrey"
    directory.mkdir()
    port = freePort()
    log = (directory / "postgrey.log").open("wb")
    child = subprocess.Popen(
        [
            program,
            f"--inet=127.0.0.1:{port}",
            f"--dbdir={directory}",
            f"--delay={DELAY}",
            "--user=root",
            "--group=root",
            f"--pidfile={directory / 'pid'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        waitFor(
            lambda: (
                b"Binding to TCP port" in (directory / "postgrey.log").read_bytes()
                or child.poll() is not None
            ),
            what="postgrey",
        )
        assert child.poll() is None, (directory / "postgrey.log").read_text()
        yield port
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        log.close()


def test_greylistedThenAccepted(tmp_path: Path, postgrey: int) -> None:
    """
    The first attempt of a triplet gets 450; the retry after the delay is
    accepted and carries postgrey's X-Greylist header.
    """
    config = tmp_path / "mailfw.toml"
    config.write_text(MAILFW_CONFIG.format(port=postgrey))
    server = MailfwProcess(tmp_path / "data", config=config).start()
    message = b"From: <a@example.net>\r\nSubject: greylisted\r\n\r\nhello\r\n"
    try:
        with server.smtp() as client:
            client.ehlo()
            assert client.mail("a@example.net")[0] == 250
            code, text = client.rcpt("bob@localhost")
            assert code == 450, (code, text)
            assert b"Greylisted" in text
        time.sleep(DELAY + 1.5)
        with server.smtp() as client:
            assert client.sendmail("a@example.net", ["bob@localhost"], message) == {}
        waitFor(lambda: server.delivered("bob"), what="delivery")
        [path] = server.delivered("bob")
        assert "delayed" in message_from_bytes(path.read_bytes())["X-Greylist"]
    finally:
        server.stop()
