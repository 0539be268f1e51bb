"""
End to end: the C{mailfw} command steering a running server's queue.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, freePort, running, waitFor

MAILFW = str(Path(sys.executable).parent / "mailfw")

# Mail for example.net goes to a port where nothing listens, so it stays
# deferred in the queue for the operator to look at.
CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "example.net" = "outbound:[127.0.0.1]:{port}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
"""


@pytest.fixture
def deferring(tmp_path: Path) -> Iterator[MailfwProcess]:
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(port=freePort()))
    yield from running(tmp_path / "data", config=config)


def mailfw(server: MailfwProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILFW, *args, "--data-dir", str(server.dataDir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(server: MailfwProcess) -> list[dict]:  # type: ignore[type-arg]
    result = mailfw(server, "queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_queueCommands(deferring: MailfwProcess) -> None:
    """
    A deferred message shows in C{queue list} with its last reply; hold,
    release, flush and delete act on it, and C{show} prints its headers;
    C{bounce} returns another one to its local sender's Maildir as a DSN.
    """
    with deferring.smtp() as client:
        client.sendmail("alice@localhost", ["bob@example.net"], b"Subject: stuck\r\n\r\nhi\r\n")
    waitFor(
        lambda: any(r["attempts"] for m in listed(deferring) for r in m["recipients"]),
        what="a failed first attempt",
    )
    [message] = listed(deferring)
    [recipient] = message["recipients"]
    assert recipient["address"] == "bob@example.net"
    assert recipient["lastReply"].startswith("4")

    text = mailfw(deferring, "queue", "list")
    assert message["queueID"] in text.stdout and "<bob@example.net>" in text.stdout

    shown = mailfw(deferring, "queue", "show", message["queueID"])
    assert "Subject: stuck" in shown.stdout

    assert mailfw(deferring, "queue", "hold", message["queueID"]).stdout.strip() == "hold: 1 recipients"
    assert listed(deferring)[0]["recipients"][0]["state"] == "hold"
    assert (
        mailfw(deferring, "queue", "release", "--domain", "example.net").stdout.strip()
        == "release: 1 recipients"
    )
    assert mailfw(deferring, "queue", "flush").returncode == 0

    refused = mailfw(deferring, "queue", "delete")
    assert refused.returncode == 1 and "needs a selector" in refused.stderr
    assert mailfw(deferring, "queue", "delete", message["queueID"]).stdout.strip() == "delete: 1 recipients"
    assert listed(deferring) == []
    assert deferring.delivered("alice") == []

    # bounce: the next deferred message goes back to its (local) sender.
    with deferring.smtp() as client:
        client.sendmail("alice@localhost", ["carol@example.net"], b"Subject: return me\r\n\r\nhi\r\n")
    waitFor(
        lambda: any(r["attempts"] for m in listed(deferring) for r in m["recipients"]),
        what="a failed first attempt",
    )
    [message] = listed(deferring)
    refused = mailfw(deferring, "queue", "bounce")
    assert refused.returncode == 1 and "needs a selector" in refused.stderr
    bounced = mailfw(deferring, "queue", "bounce", message["queueID"])
    assert bounced.stdout.strip() == "bounce: 1 recipients", bounced.stderr
    waitFor(lambda: deferring.delivered("alice"), what="the bounce in alice's Maildir")
    [dsn] = deferring.delivered("alice")
    returned = dsn.read_bytes()
    assert b'multipart/report; report-type="delivery-status"' in returned
    assert b"Final-Recipient: rfc822; carol@example.net" in returned
    assert b"Status: 5.0.0" in returned
    assert b"Message returned by the mail system administrator" in returned
    assert b"Subject: return me" in returned
    waitFor(lambda: listed(deferring) == [], what="the bounced message to leave the queue")


def test_notRunning(tmp_path: Path) -> None:
    """
    Without a server the command fails with one clear line.
    """
    result = subprocess.run(
        [MAILFW, "queue", "list", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.startswith("mailfw: the mailfw server is not running")


def test_configCheck(tmp_path: Path) -> None:
    """
    C{mailfw config check} accepts a good file and names the bad key of a
    bad one, creating nothing in the data directory.
    """
    good = tmp_path / "good.toml"
    good.write_text(CONFIG.format(port=2))
    result = subprocess.run(
        [MAILFW, "config", "check", str(good)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.format(port=2) + 'pth = "x"\n')
    result = subprocess.run([MAILFW, "config", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "mailfw: [delivery.outbound]: unknown option 'pth'"
    assert not (tmp_path / "mailfw-data").exists()
