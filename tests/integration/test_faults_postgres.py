"""
Two real C{twistd mailfw} nodes on one PostgreSQL queue while the
PostgreSQL server restarts under them, once with a fast shutdown and once
with an immediate one (a crash: no checkpoint, connections cut).

Clients sending all along see 250 or 451 and nothing else; the nodes
reconnect by themselves; every message that got a 250 is delivered, none
more than twice.  The cluster is the test's own (restarting the session's
shared one would disturb other tests).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._postgres import Cluster, _binDir, requirePostgres
from tests.integration._faults import attempt, summary
from tests.integration._server import MailfwProcess, waitFor

SINK = """#!{python}
import fcntl, re, sys

data = sys.stdin.buffer.read()
match = re.search(rb"^X-Test-ID: (\\S+)", data, re.M)
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write((match.group(1).decode() if match else "?") + "\\n")
"""

CONFIG = """
[queue]
plugin = "postgresql"
dsn = "{dsn}"
node = "{node}"
heartbeat_seconds = 1
lease_seconds = 60
pool_size = 4

[routing]
plugin = "static"
local_domains = ["localhost"]
local_agent = "sink"

[delivery.sink]
plugin = "pipe"
command = ["{sink}", "{records}"]

[scheduler]
first_retry = 1
backoff = 1
max_retry = 2
jitter = 0
delivery_timeout = 30
"""


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    requirePostgres()  # skips, or fails under CI, where PostgreSQL is missing
    binDir = _binDir()
    assert binDir is not None
    own = Cluster(binDir)
    try:
        yield own
    finally:
        own.stop()


def restart(cluster: Cluster, mode: str) -> float:
    """
    Restart the server with C{pg_ctl -m mode}; how long it was away.
    """
    started = time.monotonic()
    # -l: the new server's output goes to the log, not to our pipe (which
    # would keep pg_ctl's caller waiting for ever).
    cluster._run(
        str(cluster._bin / "pg_ctl"),
        *("-D", str(cluster._dataDir), "-l", str(cluster._log), "-m", mode, "-w", "-t", "60", "restart"),
    )
    return time.monotonic() - started


def queueRows(dsn: str) -> list[tuple[object, ...]]:
    """
    Each recipient row still queued: its state, lease owner, attempts and
    last reply (what a failure needs to tell lost mail from late mail).
    """
    import psycopg

    with psycopg.connect(dsn) as connection:
        return connection.execute(
            "SELECT message_id, state, lease_owner, lease_expires, attempts, next_attempt_at, reply_code, reply_text, EXTRACT(EPOCH FROM now()) FROM recipients"
        ).fetchall()


def problems(node: MailfwProcess) -> str:
    """
    The node's log lines that report errors, last 40.
    """
    lines = [line for line in node.output().splitlines() if "rror" in line or "Traceback" in line]
    return "\n".join(lines[-40:])


def test_restartsMidStream(cluster: Cluster, tmp_path: Path) -> None:
    """
    Fast and immediate restarts of PostgreSQL while two nodes take mail:
    only 250 and 451 replies, both nodes accept again on their own, and
    every acknowledged message is delivered once or twice.
    """
    dsn = cluster.createDatabase()
    records = tmp_path / "deliveries"
    sink = tmp_path / "sink.py"
    sink.write_text(SINK.format(python=sys.executable))
    sink.chmod(0o755)
    nodes: list[MailfwProcess] = []
    acknowledged: set[str] = set()
    codes: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def sender(node: MailfwProcess, name: str) -> None:
        n = 0
        while not stop.is_set():
            ident = f"{name}-{n}"
            code = attempt(node.smtpPort, ident, timeout=60)
            with lock:
                codes[code] += 1
                if code == 250:
                    acknowledged.add(ident)
            n += 1
            time.sleep(0.02)

    try:
        for name in ("a", "b"):
            config = tmp_path / f"{name}.toml"
            config.write_text(CONFIG.format(dsn=dsn, node=name, sink=sink, records=records))
            nodes.append(MailfwProcess(tmp_path / name, config=config).start())
        threads = [threading.Thread(target=sender, args=(node, node.dataDir.name)) for node in nodes]
        for thread in threads:
            thread.start()
        outages = {}
        for mode in ("fast", "immediate"):
            before = len(acknowledged)
            waitFor(
                lambda b=before: len(acknowledged) >= b + 20,
                timeout=60,
                what="mail flowing before the restart",
            )
            outages[mode] = restart(cluster, mode)
            after = len(acknowledged)
            waitFor(
                lambda a=after: len(acknowledged) >= a + 20,
                timeout=60,
                what=f"both nodes accepting again after the {mode} restart",
            )
        stop.set()
        for thread in threads:
            thread.join(90)

        def delivered() -> Counter[str]:
            return Counter(records.read_text().split()) if records.exists() else Counter()

        # A delivery whose outcome could not be recorded during an outage
        # keeps its lease until it expires (60 s): then it runs again.
        try:
            waitFor(lambda: acknowledged <= set(delivered()), timeout=150, what="acknowledged mail delivered")
        except AssertionError:
            missing = sorted(acknowledged - set(delivered()))
            raise AssertionError(
                f"{len(missing)} acknowledged messages not delivered: {missing[:10]}\n"
                f"the queue holds: {queueRows(dsn)}\n"
                + "\n".join(f"node {node.dataDir.name}: {problems(node)}" for node in nodes)
            ) from None
    finally:
        stop.set()
        for node in nodes:
            node.stop()
        cluster.dropDatabase(dsn)
    counts = delivered()
    print(
        "\n"
        + summary(
            acknowledged,
            counts,
            replies=dict(codes),
            outageSeconds={m: round(s, 1) for m, s in outages.items()},
        )
    )
    assert set(codes) <= {250, 451}, f"clients saw other replies than 250 and 451: {dict(codes)}"
    assert max(counts[i] for i in acknowledged) <= 2, "a message was delivered more than twice"
