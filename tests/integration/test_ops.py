"""
The operations endpoint of a real C{twistd mailfw}: C{/metrics} counters
move by exactly what was sent (also with C{--workers 2}, whose worker
forwards its events to the parent), C{/healthz} answers, and the JSON log
gives C{mailfw log QUEUEID} a message's history.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailfw.admin._main import formatHistory
from mailfw.ops import readEvents
from tests.integration._server import MailfwProcess, freePort, waitFor

CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_domains = ["down.test"]
relay_agent = "outbound"
transport = {{ "down.test" = "outbound:[127.0.0.1]:{closed}" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
connect_timeout = 2
[metrics]
listen = "tcp:{port}:interface=127.0.0.1"
queue_interval = 0
refresh = 0.3
"""

MESSAGES = 20


def writeConfig(tmp_path: Path) -> tuple[Path, int]:
    """
    A configuration with the metrics endpoint on a free port, local mail
    for localhost and a relay domain whose server is down.
    """
    port = freePort()
    path = tmp_path / "mailfw.toml"
    path.write_text(CONFIG.format(port=port, closed=freePort()))
    return path, port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


class Scrape:
    """
    One parsed C{/metrics} answer.
    """

    def __init__(self, text: str) -> None:
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """
        The sum of the samples called C{name} whose labels include C{labels}.
        """
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


def scrape(port: int) -> Scrape:
    status, text = get(port, "/metrics")
    assert status == 200, text
    return Scrape(text)


def send(server: MailfwProcess, number: int) -> int:
    """
    Send message C{number} to bob@localhost on its own connection; its size.
    """
    body = f"Subject: message {number}\r\n\r\nbody {number}\r\n"
    with smtplib.SMTP("127.0.0.1", server.smtpPort, local_hostname="client.test", timeout=60) as s:
        s.sendmail("sender@client.test", ["bob@localhost"], body)
    return len(body)


@pytest.fixture(params=[(1, True), (2, True), (2, False)], ids=["one", "workers-logfile", "workers-stdout"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[MailfwProcess, int]]:
    workers, logfile = request.param
    config, port = writeConfig(tmp_path)
    process = MailfwProcess(
        tmp_path / "data", config=config, extraArgs=("--workers", str(workers)), logfile=logfile
    ).start()
    try:
        waitFor(lambda: get(port, "/healthz")[0] == 200, what="the metrics endpoint")
        if workers > 1:
            assert process.logPath is not None
            logPath = process.logPath
            waitFor(
                lambda: "worker 1] SMTPFactory starting on" in logPath.read_text(),
                what="the worker to adopt the sockets",
            )
        yield process, port
    finally:
        process.stop()


def test_countersMoveByWhatWasSent(server: tuple[MailfwProcess, int]) -> None:
    """
    After 20 local messages (20 parallel connections), one relay-refused
    RCPT and one message for a server that is down, each counter moved by
    exactly that; the queue gauges show the waiting message; with workers
    both processes' events are in the one scrape.
    """
    process, port = server
    before = scrape(port)
    with ThreadPoolExecutor(10) as pool:
        sizes = list(pool.map(lambda n: send(process, n), range(MESSAGES)))
    with process.smtp() as s:
        s.ehlo("client.test")
        s.mail("sender@client.test")
        code, _ = s.rcpt("someone@elsewhere.example")
        assert code == 554 or 500 <= code < 600, code
    with process.smtp() as s:
        s.sendmail("sender@client.test", ["carol@down.test"], "Subject: waits\r\n\r\nwaits\r\n")

    def moved(after: Scrape, name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    def settled() -> bool:
        after = scrape(port)
        return (
            moved(after, "mailfw_deliveries_total", agent="local", outcome="delivered") == MESSAGES
            and moved(after, "mailfw_deliveries_total", agent="outbound", outcome="deferred") >= 1
            and moved(after, "mailfw_connections_total", listener="smtp") == MESSAGES + 2
            # The queue figures are a snapshot taken every queue_interval.
            and after.value("mailfw_queue_recipients", state="ready") == 1
        )

    waitFor(settled, timeout=60, interval=0.3, what="the counters to settle")
    after = scrape(port)
    assert moved(after, "mailfw_messages_received_total", listener="smtp") == MESSAGES + 1
    assert moved(after, "mailfw_transactions_total", stage="DATA", outcome="accepted") == MESSAGES + 1
    assert moved(after, "mailfw_transactions_total", stage="RCPT", outcome="refused", **{"class": "5xx"}) == 1
    assert moved(after, "mailfw_deliveries_total", agent="local", outcome="delivered") == MESSAGES
    assert moved(after, "mailfw_deliveries_total", agent="outbound", outcome="deferred") == 1
    assert moved(after, "mailfw_deliveries_total", outcome="bounced") == 0
    assert moved(after, "mailfw_delivery_attempts_total", agent="local") == MESSAGES
    assert moved(after, "mailfw_delivery_seconds_count", agent="local") == MESSAGES
    assert moved(after, "mailfw_enqueue_seconds_count") == MESSAGES + 1
    # The queued copy adds a Received header to each body.
    assert moved(after, "mailfw_received_bytes_total") > sum(sizes)
    assert moved(after, "mailfw_connections_total", listener="smtp", outcome="mail") == MESSAGES + 1
    assert moved(after, "mailfw_connections_total", listener="smtp", outcome="nomail") == 1
    assert after.value("mailfw_connections_open", listener="smtp") == 0
    assert moved(after, "mailfw_sessions_total", direction="inbound") == MESSAGES + 2
    assert moved(after, "mailfw_tls_sessions_total", direction="inbound") == 0
    assert after.value("mailfw_queue_recipients", state="ready") == 1
    assert after.value("mailfw_queue_recipients_by_domain", domain="down.test") == 1
    assert after.value("mailfw_queue_messages") == 1
    assert after.value("mailfw_queue_oldest_age_seconds") > 0
    if "--workers" in process.extraArgs and process.extraArgs[1] == "2":
        # Which process accepts a connection is the kernel's choice (on a
        # busy machine one may take all 20): send on until the worker has
        # had one, then its events must be in the parent's scrape.
        for extra in range(100):
            if moved(scrape(port), "mailfw_events_total", process="1") > 0:
                break
            send(process, MESSAGES + 1 + extra)
        waitFor(
            lambda: moved(scrape(port), "mailfw_events_total", process="1") > 0,
            timeout=30,
            what="the worker's events in the parent's scrape",
        )
        assert moved(after, "mailfw_events_total", process="0") > 0
    status, text = get(port, "/healthz")
    assert (status, text) == (200, "ok\n")


def test_jsonLogHistory(tmp_path: Path) -> None:
    """
    With C{twistd --logger=mailfw.ops.jsonLogger} (and two processes, so
    the worker's events pass through the parent), the log is one JSON
    object a line, and C{mailfw log QUEUEID} prints the message's
    received, attempt and delivered events with the delivery's reply.
    """
    config, _ = writeConfig(tmp_path)
    jsonLog = tmp_path / "mailfw.json"
    process = MailfwProcess(
        tmp_path / "data",
        config=config,
        extraArgs=("--workers", "2"),
        twistdArgs=("--logger=mailfw.ops.jsonLogger",),
        env={"MAILFW_JSON_LOG": str(jsonLog)},
    ).start()
    try:
        waitFor(
            lambda: any(
                e.get("worker") == 1 and "SMTPFactory starting on" in str(e.get("workerLine"))
                for e in readEvents(_lines(jsonLog))
            ),
            what="the worker to adopt the sockets",
        )

        def sendOne(n: int) -> str:
            with process.smtp() as s:
                s.ehlo("client.test")
                s.mail("sender@client.test")
                s.rcpt("bob@localhost")
                code, reply = s.data(f"Subject: {n}\r\n\r\nhello\r\n".encode())
                assert code == 250, reply
                return str(reply.decode().rsplit(" ", 1)[1])

        # Until the worker has accepted one (the kernel picks the process;
        # bounded to five rounds).
        queueIDs: list[str] = []
        for _ in range(5):
            with ThreadPoolExecutor(10) as pool:
                queueIDs += pool.map(sendOne, range(MESSAGES))
            if _received(jsonLog, worker=1):
                break
        waitFor(lambda: len(process.delivered("bob")) == len(queueIDs), what="deliveries")
        waitFor(
            lambda: sum(line.count('"delivery.delivered"') for line in _lines(jsonLog)) == len(queueIDs),
            what="the delivered events in the log",
        )
    finally:
        process.stop()
    lines = _lines(jsonLog)
    assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    fromWorker = _received(jsonLog, worker=1)
    assert fromWorker, "no message was accepted by the worker"
    # The command line for one message of each process; the same function
    # for all of them.
    for queueID in (fromWorker[0], _received(jsonLog, worker=None)[0]):
        result = subprocess.run(
            [sys.executable, "-m", "mailfw", "log", queueID, "--log", str(jsonLog)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == formatHistory(queueID, lines)
    for queueID in queueIDs:
        history = formatHistory(queueID, lines)
        names = [line.split(" ", 3)[2].split("[")[0].rstrip(":").strip() for line in history]
        assert names == ["message.received", "delivery.attempt", "delivery.delivered"], history
        assert ("[worker 1]" in history[0]) == (queueID in fromWorker)
        assert "bob@localhost" in history[2]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _received(path: Path, worker: int | None) -> list[str]:
    """
    The queue IDs of the messages process C{worker} (C{None}: the parent)
    accepted, by the JSON log.
    """
    return [
        str(e["queueID"])
        for e in readEvents(_lines(path))
        if e.get("event") == "message.received" and e.get("worker") == worker
    ]
