"""
End to end: the C{aliases} delivery agent in a real C{twistd mailfw}.
Expansions are new queued mail delivered to Maildirs, C{|command} targets
run as real processes, loops and unknown aliases bounce to the sender, and
an edited alias file is picked up without a restart.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, running, waitFor

CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost", "lists.test"]
transport = { "lists.test" = "aliases" }

[delivery.local]
plugin = "maildir"

[delivery.aliases]
plugin = "aliases"
file = "aliases"
"""

SCRIPT = """\
import sys
with open(sys.argv[1], "wb") as f:
    f.write(sys.stdin.buffer.read())
"""


def aliasFile(script: Path, out: Path) -> str:
    command = " ".join(shlex.quote(str(p)) for p in (sys.executable, script, out))
    return (
        "# aliases for lists.test\n"
        f'team: alice@localhost, bob@localhost,\n    "|{command}/{{recipient}}"\n'
        "self: self\n"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailfwProcess]:
    base = tmp_path_factory.mktemp("aliases")
    dataDir = base / "data"
    dataDir.mkdir()
    out = base / "out"
    out.mkdir()
    script = base / "capture.py"
    script.write_text(SCRIPT)
    (dataDir / "aliases").write_text(aliasFile(script, out))
    config = base / "mailfw.toml"
    config.write_text(CONFIG)
    yield from running(dataDir, config=config)


def send(server: MailfwProcess, sender: str, recipient: str, subject: str) -> None:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message.set_content("Hello.\n")
    with server.smtp() as client:
        assert client.send_message(message, sender, [recipient]) == {}


def containing(server: MailfwProcess, localpart: str, text: bytes) -> list[bytes]:
    found = [p.read_bytes() for p in server.delivered(localpart)]
    return [data for data in found if text in data]


def test_expandsToMaildirsAndCommand(server: MailfwProcess) -> None:
    """
    Mail to an alias reaches each address target's Maildir and the command
    target's standard input, each copy with C{Delivered-To:} naming the
    alias.
    """
    send(server, "carol@localhost", "team@lists.test", "team news")
    for user in ("alice", "bob"):
        waitFor(lambda user=user: containing(server, user, b"Subject: team news"), what=f"delivery to {user}")
        [copy] = containing(server, user, b"Subject: team news")
        assert b"Delivered-To: team@lists.test" in copy
        assert b"Return-Path: <carol@localhost>" in copy
    captured = server.dataDir.parent / "out" / "team@lists.test"
    waitFor(captured.exists, what="the command's output")
    waitFor(lambda: b"Hello." in captured.read_bytes(), what="the whole message on stdin")
    data = captured.read_bytes()
    assert data.startswith(b"Delivered-To: team@lists.test\r\n")
    assert b"Subject: team news" in data


def test_loopAndUnknownBounce(server: MailfwProcess) -> None:
    """
    An alias that expands to itself bounces after one round with 5.4.6, and
    an unknown alias bounces with 5.1.1, both to the original sender.
    """
    send(server, "dave@localhost", "self@lists.test", "loop")
    send(server, "erin@localhost", "nobody@lists.test", "unknown")
    waitFor(lambda: containing(server, "dave", b"5.4.6"), what="the loop bounce")
    waitFor(lambda: containing(server, "erin", b"5.1.1"), what="the unknown-alias bounce")
    [bounce] = containing(server, "dave", b"5.4.6")
    assert b"self@lists.test" in bounce


def test_editedFileReread(server: MailfwProcess) -> None:
    """
    An alias added to the file while the server runs is used for the next
    message.
    """
    path = server.dataDir / "aliases"
    path.write_text(path.read_text() + "late: frank@localhost\n")
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    send(server, "carol@localhost", "late@lists.test", "late")
    waitFor(lambda: containing(server, "frank", b"Subject: late"), what="delivery to frank")
