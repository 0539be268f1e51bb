"""
Issue 19's whole measurement in one run: the accept table (1 KB at 1, 10
and 100 sessions, 100 KB at 1 and 100; Postfix, mailfw with one and two
workers, and the bare Twisted server, alternating), the relay end to end
benchmark with its 250-to-sink latency, idle-connection memory and
start-up time.  Prints each part's plain table, then the markdown tables
the README's performance section is made of.

Usage (as root, from the repository)::

    python benchmarks/full.py [--repeat 3] [--connections 10000]

It takes about 15 to 30 minutes on a 2-core machine; C{accept.py},
C{relay.py} and C{idle.py} run each part alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import accept
import idle
import relay


def listTables(markdown: str) -> str:
    """
    The markdown pipe tables of C{markdown} as reStructuredText
    C{list-table}s (for the README and docs/performance.rst); other lines
    as they are.
    """
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            out.extend([".. list-table::", "   :header-rows: 1", ""])
            for row in rows:
                out.append(f"   * - {row[0]}")
                out.extend(f"     - {cell}" for cell in row[1:])
            out.append("")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not all(set(cell) <= {"-"} for cell in cells):
                rows.append(cells)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    accept.addArguments(parser)
    relay.addArguments(parser)
    idle.addArguments(parser)
    args = parser.parse_args(argv)
    args.workloads = args.workloads or "1024:1,10,100 102400:1,100"
    args.workers = "1,2" if args.workers == "2" else args.workers
    args.reference = True
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    acceptOutcome = accept.runAccept(args)
    relayOutcome = relay.runRelay(args)
    idleText = idle.runIdle(args)
    print(f"# benchmarks/full.py, started {started}")
    print(acceptOutcome.heading)
    print(acceptOutcome.text)
    print()
    print(relayOutcome.text)
    print()
    print(idleText)
    print()
    print(acceptOutcome.markdown)
    print()
    print(relayOutcome.markdown)
    print()
    print(listTables(acceptOutcome.markdown + "\n\n" + relayOutcome.markdown))
    return 0 if acceptOutcome.ok and relayOutcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
