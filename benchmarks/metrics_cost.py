"""
What the operations endpoint costs: accept throughput of C{twistd mailfw}
with and without C{[metrics]}, in the same run.

Usage (from the repository)::

    python benchmarks/metrics_cost.py [--sessions 100] [--messages 6000]
        [--repeat 5] [--workers 1] [--scrape 1.0]

Runs alternate between a server without C{[metrics]} and one with it
(a fresh server each run, as L{accept.measure} runs them: SQLite queue,
discard delivery, Postfix's C{smtp-source}); while a metrics run sends,
this script also scrapes C{/metrics} every C{--scrape} seconds (Prometheus
scrapes every 15 to 60 seconds: once a second is harsher).  The line
printed at the end gives the median messages per second of each and the
cost in per cent.  The machine may be shared and noisy: that is why runs
interleave and medians are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import urllib.request
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accept

METRICS = """
[metrics]
listen = "tcp:{port}:interface=127.0.0.1"
"""


def run(metrics: bool, args: argparse.Namespace) -> float:
    """
    One measured run on a fresh server; its messages per second.
    """
    base = accept.MAILFW_CONFIG
    metricsPort = accept.freePort()
    if metrics:
        accept.MAILFW_CONFIG = base + METRICS.format(port=metricsPort)
    try:
        server = accept.MailfwServer(accept.freePort(), workers=args.workers)
    finally:
        accept.MAILFW_CONFIG = base
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(args.scrape):
            with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=10) as r:
                r.read()

    scraper = threading.Thread(target=scrape, daemon=True) if metrics and args.scrape > 0 else None
    try:
        if scraper is not None:
            scraper.start()
        result = accept.measure(server, args.sessions, args.messages, args.size, False, args.timeout)
    finally:
        done.set()
        if scraper is not None:
            scraper.join(15)
        server.stop()
    return result.rate


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--scrape", type=float, default=1.0, help="seconds between scrapes (default 1; 0: none)"
    )
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeat):
        # Alternate which goes first, so that neither always runs warm.
        for metrics in (False, True) if repeat % 2 == 0 else (True, False):
            rate = run(metrics, args)
            rates[metrics].append(rate)
            print(f"# run {repeat + 1} metrics={'on' if metrics else 'off'}: {rate:.0f} msg/s", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"accept at {args.sessions} sessions, {args.workers} process(es), median of {args.repeat}:"
        f" without metrics {off:.0f} msg/s, with metrics (scraped every {args.scrape:g}s) {on:.0f} msg/s,"
        f" cost {100 * (off - on) / off:.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
