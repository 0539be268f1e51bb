"""
Soak: mailfw under steady load for a long time while faults strike at
random, counting what was acknowledged, delivered, lost and duplicated, and
watching its memory.

Set-up, all on loopback: a C{twistd mailfw} (SQLite queue) relaying every
message by MX to Postfix's C{smtp-sink} on 127.0.0.2; its resolver is a
small DNS server on a thread (L{tests.integration.test_faults_dns.ThreadDNS}).
First the maximum rate is measured (``--probe`` seconds, 8 senders as fast as
they go), then messages are sent at ``--load`` (default 50%) of it for
``--duration`` seconds, while every ``--fault-every`` seconds (on average)
one fault strikes:

  - C{kill9}: mailfw gets SIGKILL and is started again on the same data
    (what a supervisor such as systemd does);
  - C{refuse}: the peer goes away for 10 s (connections refused);
  - C{dns}: the resolver goes away for 10 s (lookups time out).

At the end the faults stop and the queue drains (at most ``--drain``
seconds); then one line of numbers, the RSS samples, and with
``--plot FILE.png`` a plot (needs matplotlib, optional).  ``--json FILE``
writes the numbers for a test to check.

The hour-long run of the issue, and the CI version that
C{tests/integration/test_faults_soak.py} runs::

    python benchmarks/soak.py --duration 3600 --plot soak.png
    python benchmarks/soak.py --duration 60 --fault-every 15 --json out.json

Run it as root (smtp-sink binds 127.0.0.2) from a checkout whose
virtualenv has mailfw installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration._faults import attempt, rssKiB
from tests.integration._peers import PEER, freePortOn
from tests.integration._server import MailfwProcess, freePort, requireTool
from tests.integration.test_faults_dns import ThreadDNS

CONFIG = """
[dns]
nameservers = ["127.0.0.1:{dnsPort}"]

[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]

[delivery.local]
plugin = "maildir"

[delivery.outbound]
plugin = "smtp-relay"
port = {sinkPort}
address_families = ["ipv4"]
tls = "none"
connect_timeout = 5

[scheduler]
first_retry = 5
backoff = 1.5
max_retry = 20
jitter = 0.1
"""

DOMAINS = 10
OUTAGE = 10.0


class Peer:
    """
    C{smtp-sink} on 127.0.0.2 that can be stopped and started again on
    its port; it writes one file per message.
    """

    def __init__(self, root: Path) -> None:
        self.binary = requireTool("smtp-sink")
        self.port = freePortOn(PEER)
        self.dumps = root / "sink"
        self.dumps.mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "-u",
                "root",
                "-h",
                "mx.test",
                "-d",
                f"{self.dumps}/%Y%m%d%H/%M.",
                f"{PEER}:{self.port}",
                "256",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def delivered(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for path in self.dumps.rglob("*"):
            if path.is_file():
                for match in re.finditer(rb"^X-Test-ID: (\S+)", path.read_bytes(), re.M):
                    counts[match.group(1).decode()] += 1
        return counts


class Soak:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.random = random.Random(seed)
        self.peer = Peer(root)
        self.dnsPort = freePort()
        self.dns = ThreadDNS(self.dnsPort)
        config = root / "mailfw.toml"
        config.write_text(CONFIG.format(dnsPort=self.dnsPort, sinkPort=self.peer.port))
        self.server = MailfwProcess(root / "data", config=config)
        self.acknowledged: set[str] = set()
        self.replies: Counter[int] = Counter()
        self.faults: list[tuple[float, str]] = []
        self.rss: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.sequence = 0

    def send(self) -> None:
        with self.lock:
            self.sequence += 1
            ident = f"m{self.sequence}"
        code = attempt(self.server.smtpPort, ident, recipient=f"user@d{self.sequence % DOMAINS}.test")
        with self.lock:
            self.replies[code] += 1
            if code == 250:
                self.acknowledged.add(ident)

    def probe(self, seconds: float) -> float:
        """
        The acknowledged messages per second of 8 senders going flat out.
        """
        stop = time.monotonic() + seconds
        before = len(self.acknowledged)

        def sender() -> None:
            while time.monotonic() < stop:
                self.send()

        threads = [threading.Thread(target=sender) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return (len(self.acknowledged) - before) / seconds

    def load(self, rate: float, seconds: float, faultEvery: float) -> None:
        """
        Send C{rate} messages per second for C{seconds}, with faults.
        """
        stop = time.monotonic() + seconds
        interval = 1.0 / rate
        nextFault = time.monotonic() + self.random.expovariate(1 / faultEvery)
        nextSample = time.monotonic()
        pending: list[threading.Thread] = []
        due = time.monotonic()
        while time.monotonic() < stop:
            now = time.monotonic()
            if now >= nextSample:
                self.sample()
                nextSample = now + 5
            if now >= nextFault:
                self.fault(self.random.choice(["kill9", "refuse", "dns"]))
                nextFault = time.monotonic() + self.random.expovariate(1 / faultEvery)
            if now >= due:
                thread = threading.Thread(target=self.send, daemon=True)
                thread.start()
                pending.append(thread)
                due += interval
            pending = [t for t in pending if t.is_alive()]
            time.sleep(min(0.01, max(0.0, due - time.monotonic())))
        for thread in pending:
            thread.join(60)

    def fault(self, kind: str) -> None:
        self.faults.append((time.monotonic() - self.started, kind))
        print(f"  {time.monotonic() - self.started:7.1f} s: fault {kind}", flush=True)
        if kind == "kill9":
            assert self.server.process is not None
            self.server.process.send_signal(signal.SIGKILL)
            self.server.process.wait(10)
            self.server.start()
        elif kind == "refuse":
            self.peer.stop()
            threading.Timer(OUTAGE, self.peer.start).start()
        elif kind == "dns":
            self.dns.stop()
            self.dns = ThreadDNS(self.dnsPort)
            threading.Timer(OUTAGE, self.dns.start).start()

    def sample(self) -> None:
        process = self.server.process
        if process is not None and process.poll() is None:
            self.rss.append((time.monotonic() - self.started, rssKiB(process.pid)))

    def drain(self, seconds: float) -> Counter[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            delivered = self.peer.delivered()
            if self.acknowledged <= set(delivered):
                return delivered
            self.sample()
            time.sleep(1)
        return self.peer.delivered()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--probe", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--fault-every", type=float, default=60.0)
    parser.add_argument("--drain", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    options = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="mailfw-soak-"))
    soak = Soak(root, options.seed)
    soak.peer.start()
    soak.dns.start()
    soak.server.start()
    try:
        maximum = soak.probe(options.probe)
        rate = max(1.0, maximum * options.load)
        print(
            f"seed {options.seed}: maximum {maximum:.1f} messages/s; running at {rate:.1f}/s"
            f" for {options.duration:.0f} s, a fault every {options.fault_every:.0f} s on average",
            flush=True,
        )
        soak.load(rate, options.duration, options.fault_every)
        if soak.server.process is None or soak.server.process.poll() is not None:
            soak.server.start()
        if soak.peer.process is None:
            time.sleep(OUTAGE)
        delivered = soak.drain(options.drain)
    finally:
        soak.server.stop()
        soak.peer.stop()
        soak.dns.stop()
    lost = sorted(soak.acknowledged - set(delivered))
    duplicated = sorted(i for i in soak.acknowledged if delivered[i] > 1)
    result = {
        "seed": options.seed,
        "maximumRate": round(maximum, 1),
        "rate": round(rate, 1),
        "acknowledged": len(soak.acknowledged),
        "delivered": len(soak.acknowledged & set(delivered)),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "replies": {str(k): v for k, v in sorted(soak.replies.items())},
        "faults": [kind for _, kind in soak.faults],
        "rssKiB": [kib for _, kib in soak.rss],
    }
    print(
        f"acknowledged={result['acknowledged']} delivered={result['delivered']} lost={result['lost']}"
        f" duplicated={result['duplicated']} replies={result['replies']} faults={Counter(result['faults'])}"
    )
    print("RSS over time (s: KiB): " + ", ".join(f"{t:.0f}: {k}" for t, k in soak.rss))
    if lost:
        print(f"lost: {lost[:20]}")
    if options.json is not None:
        options.json.write_text(json.dumps(result))
    if options.plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib)")
        else:
            figure, axes = plt.subplots()
            axes.plot([t for t, _ in soak.rss], [k / 1024 for _, k in soak.rss])
            for when, kind in soak.faults:
                axes.axvline(when, color="red", alpha=0.3)
                axes.annotate(kind, (when, 0), rotation=90, fontsize=7)
            axes.set_xlabel("seconds")
            axes.set_ylabel("RSS (MiB)")
            axes.set_title(f"mailfw soak: {result['acknowledged']} acknowledged, {result['lost']} lost")
            figure.savefig(options.plot)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return 1 if lost else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
