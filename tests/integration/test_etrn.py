"""
End to end: ETRN (RFC 1985) against a real C{twistd mailfw}, with Postfix's
C{smtp-sink} as the customer's intermittently connected server.
"""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._peers import PEER, Sink, freePortOn, startSink, stopSink
from tests.integration._server import MailfwProcess, requireTool, running, waitFor

MAILFW = str(Path(sys.executable).parent / "mailfw")

# customer.test is held until ETRN; etrn.example is retried normally, but its
# next hop starts only later.  Only 127.0.0.1 may ask.
CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "customer.test" = "outbound:[{peer}]:{held}", "etrn.example" = "outbound:[{peer}]:{later}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
[etrn]
domains = ["customer.test", "etrn.example"]
clients = ["127.0.0.1/32"]
hold = ["customer.test"]
"""

OUTSIDER = "127.0.0.4"
"""A loopback address outside the allowed clients."""


def startSinkOn(tmp: Path, port: int) -> Sink:
    """
    An C{smtp-sink} on a port chosen beforehand (the next hop that comes
    up).
    """
    binary = requireTool("smtp-sink")
    dumps = tmp / f"sink-{port}"
    dumps.mkdir()
    process = subprocess.Popen(
        [binary, "-u", "root", "-h", "customer.test", "-d", f"{dumps}/m.", f"{PEER}:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sink = Sink(port, dumps, process)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"smtp-sink exited with {process.returncode}")
        with socket.socket() as s:
            return s.connect_ex((PEER, port)) == 0

    try:
        waitFor(listening, timeout=10, what="smtp-sink")
    except BaseException:
        stopSink(sink)
        raise
    return sink


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Sink]:
    sink = startSink(tmp_path)
    try:
        yield sink
    finally:
        stopSink(sink)


@pytest.fixture
def server(tmp_path: Path, held: Sink) -> Iterator[tuple[MailfwProcess, int]]:
    later = freePortOn(PEER)
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(peer=PEER, held=held.port, later=later))
    for process in running(tmp_path / "data", config=config):
        yield process, later


def listed(server: MailfwProcess) -> list[dict[str, Any]]:
    result = subprocess.run(
        [MAILFW, "queue", "list", "--json", "--data-dir", str(server.dataDir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def recipients(server: MailfwProcess) -> dict[str, dict[str, Any]]:
    return {r["address"]: r for m in listed(server) for r in m["recipients"]}


def etrn(server: MailfwProcess, node: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    with smtplib.SMTP(
        "127.0.0.1",
        server.smtpPort,
        local_hostname="customer.test",
        timeout=30,
        source_address=(source, 0),
    ) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("etrn")
        return client.docmd("ETRN", node)


def arrived(sink: Sink, marker: bytes) -> bool:
    return any(m.rstrip().endswith(marker) for m in sink.messages())


def test_holdUntilETRN(server: tuple[MailfwProcess, int], held: Sink) -> None:
    """
    Mail for a hold-for-ETRN domain waits in state etrn without any
    attempt; an outsider's ETRN and an ETRN for a domain that is not an
    ETRN domain get 459 and move nothing; the allowed client's ETRN gets
    253 and the mail reaches smtp-sink within seconds.
    """
    mailfw, _ = server
    with mailfw.smtp() as client:
        client.sendmail("alice@localhost", ["bob@customer.test"], b"Subject: held\r\n\r\nheld body\r\n")
    waitFor(
        lambda: recipients(mailfw).get("bob@customer.test", {}).get("state") == "etrn",
        what="the recipient held for ETRN",
    )
    bob = recipients(mailfw)["bob@customer.test"]
    assert bob["attempts"] == 0
    assert bob["nextAttempt"] > time.time() + 3600
    time.sleep(1)
    assert held.messages() == []

    code, text = etrn(mailfw, "customer.test", source=OUTSIDER)
    assert (code, text) == (459, b"4.7.1 Node customer.test not allowed: not authorised for this client")
    code, _ = etrn(mailfw, "other.test")
    assert code == 459
    assert recipients(mailfw)["bob@customer.test"]["state"] == "etrn"

    code, text = etrn(mailfw, "customer.test")
    assert (code, text) == (253, b"2.0.0 OK, 1 pending recipients for node customer.test started")
    waitFor(lambda: arrived(held, b"held body"), timeout=10, what="the held message at smtp-sink")
    waitFor(lambda: listed(mailfw) == [], timeout=10, what="the queue to empty")
    [dump] = held.messages()
    assert b"Subject: held" in dump


def test_nextHopBackUp(server: tuple[MailfwProcess, int], tmp_path: Path) -> None:
    """
    Mail for etrn.example is deferred while its next hop is down, with the
    retry minutes away; once the next hop is up, ETRN from the allowed
    client delivers it within seconds, and ETRN again finds nothing.
    """
    mailfw, later = server
    with mailfw.smtp() as client:
        client.sendmail("alice@localhost", ["carol@etrn.example"], b"Subject: late\r\n\r\nlate body\r\n")
    waitFor(
        lambda: recipients(mailfw).get("carol@etrn.example", {}).get("attempts", 0) >= 1,
        what="the failed first attempt",
    )
    carol = recipients(mailfw)["carol@etrn.example"]
    assert carol["state"] == "ready"
    assert carol["nextAttempt"] > time.time() + 200
    sink = startSinkOn(tmp_path, later)
    try:
        code, _ = etrn(mailfw, "etrn.example", source=OUTSIDER)
        assert code == 459
        time.sleep(1)
        assert sink.messages() == []
        code, text = etrn(mailfw, "etrn.example")
        assert (code, text) == (253, b"2.0.0 OK, 1 pending recipients for node etrn.example started")
        waitFor(lambda: arrived(sink, b"late body"), timeout=10, what="the message at the revived next hop")
        waitFor(lambda: listed(mailfw) == [], timeout=10, what="the queue to empty")
        assert etrn(mailfw, "etrn.example")[0] == 251
    finally:
        stopSink(sink)
