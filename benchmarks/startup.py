"""
Start-up time: how long C{twistd -n mailfw} takes from the fork to its
first C{220} greeting (issue 19 asks for under a second).

Usage (from the repository)::

    python benchmarks/startup.py [--starts 5] [--workers 1]
        [--only bench|default] [--imports] [--compile]

Each start is a fresh process with a fresh data directory, on a free
loopback port, polled every 10 ms until it greets (L{accept.MailfwServer}
measures it): the wall time from the fork to the greeting and the CPU
seconds the twistd process used until then (less exposed to a busy
machine than the wall time).  Two configurations, C{--starts} times each,
median and minimum:

  - C{bench}: the accept benchmark's (SQLite queue, static routing,
    discard delivery);
  - C{default}: the README quick start's embedded default (no
    configuration file: SMTP and submission, SQLite queue, Maildir), its
    two listeners moved to free ports.

C{--imports} also runs the C{bench} configuration once under
C{python -X importtime} and prints the 15 imports with the largest
cumulative time (importtime inflates them; they show where, not how
long; a module that C{importlib.import_module} loads, such as a plugin's
implementation, is not listed itself, only the modules it imports).
The load average is printed first: on a busy machine the wall times mean
little.

A module without an up-to-date bytecode file is compiled on every start
(about 0.3 s for mailfw's on a 2-core machine) when nothing writes the
bytecode (C{PYTHONDONTWRITEBYTECODE}, a read-only checkout); the script
says so.  C{--compile} writes it first, as pip does when it installs
a wheel.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from accept import (
    CLOCK_TICKS,
    DOMAIN,
    MAILFW_CONFIG,
    SQLITE_QUEUE,
    MailfwServer,
    _waitForServer,
    freePort,
    processTicks,
    stopProcess,
)

CONFIGURATIONS = ("bench", "default")
ROOT = Path(__file__).resolve().parent.parent
# What twistd imports from this checkout: the package and its dropins.
SOURCES = (ROOT / "mailfw", ROOT / "twisted" / "plugins")


@dataclass
class Start:
    seconds: float
    cpuSeconds: float


def twistdCommand(*arguments: str, python: Sequence[str] = ()) -> list[str]:
    """
    C{twistd -n mailfw ARGUMENTS} from this Python's environment; with
    C{python}, run through this interpreter with those options.
    """
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    prefix = [sys.executable, *python, twistd] if python else [twistd]
    return [*prefix, "-n", "--pidfile=", "mailfw", *arguments]


class DefaultServer:
    """
    C{twistd -n mailfw} without a configuration file, in a fresh working
    directory (where the embedded default keeps its data), its SMTP and
    submission listeners on free loopback ports instead of 2525 and 2587.
    """

    def __init__(self, timeout: float = 60) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailfw-bench-startup-"))
        self.port = freePort()
        self.logFile = self.root / "twistd.log"
        self.errorFile = self.root / "stderr"
        self._log = open(self.logFile, "wb")  # noqa: SIM115 (closed in stop())
        self._errors = open(self.errorFile, "wb")  # noqa: SIM115 (closed in stop())
        started = time.monotonic()
        self.process = subprocess.Popen(
            twistdCommand(
                f"--smtp=tcp:{self.port}:interface=127.0.0.1",
                f"--submission=tcp:{freePort()}:interface=127.0.0.1",
            ),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._errors,
            start_new_session=True,
        )
        try:
            _waitForServer(self.process, self.port, timeout, self.logFile, "mailfw (embedded default)")
        except BaseException:
            self.stop()
            raise
        self.startSeconds = time.monotonic() - started
        self.startCPU = processTicks(self.process.pid) / CLOCK_TICKS

    def stop(self) -> None:
        stopProcess(self.process)
        self._log.close()
        self._errors.close()
        shutil.rmtree(self.root, ignore_errors=True)


def startOnce(configuration: str, workers: int) -> Start:
    """
    Start one server of C{configuration}, note its start-up, stop it.
    """
    server = MailfwServer(freePort(), workers=workers) if configuration == "bench" else DefaultServer()
    try:
        return Start(server.startSeconds, server.startCPU)
    finally:
        server.stop()


def measure(configuration: str, workers: int, starts: int) -> str:
    """
    C{starts} start-ups of C{configuration}; one line of medians and minima.
    """
    results = [startOnce(configuration, workers) for _ in range(starts)]
    times = [r.seconds for r in results]
    cpu = [r.cpuSeconds for r in results]
    label = f"{configuration}, --workers={workers}" if configuration == "bench" else configuration
    return (
        f"{label:20} fork to first 220: median {statistics.median(times):.3f} s, "
        f"min {min(times):.3f} s, max {max(times):.3f} s ({starts} starts); "
        f"CPU of the twistd process: median {statistics.median(cpu):.2f} s, min {min(cpu):.2f} s"
    )


def parseImportTimes(text: str) -> list[tuple[int, int, str]]:
    """
    C{(cumulative, self, module)} in microseconds from C{-X importtime}
    output, largest cumulative first.  A nested import appears under the
    one that caused it (indented), and its time is part of that one's.
    """
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header line
        rows.append((int(fields[1]), int(fields[0]), fields[2].rstrip()))
    rows.sort(key=lambda row: row[0], reverse=True)
    return rows


def topImports(workers: int, count: int = 15) -> str:
    """
    Start the C{bench} configuration once under C{-X importtime} and list
    its C{count} slowest imports, cumulative.
    """
    root = Path(tempfile.mkdtemp(prefix="mailfw-bench-imports-"))
    try:
        configFile = root / "mailfw.toml"
        configFile.write_text(MAILFW_CONFIG.format(domain=DOMAIN, queue=SQLITE_QUEUE))
        port = freePort()
        with open(root / "twistd.log", "wb") as logFile, open(root / "stderr", "wb") as errors:
            process = subprocess.Popen(
                twistdCommand(
                    f"--config={configFile}",
                    f"--data-dir={root / 'data'}",
                    f"--hostname={DOMAIN}",
                    f"--smtp=tcp:{port}:interface=127.0.0.1",
                    f"--workers={workers}",
                    python=["-X", "importtime"],
                ),
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=logFile,
                stderr=errors,
                start_new_session=True,
            )
            try:
                _waitForServer(process, port, 60, root / "twistd.log", "mailfw -X importtime")
            finally:
                process.terminate()
                process.wait(20)
        rows = parseImportTimes((root / "stderr").read_text(errors="replace"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [f"-X importtime, bench configuration: {len(rows)} imports; top {count} by cumulative time"]
    lines.append(f"{'cumulative':>12} {'self':>10}  module")
    for cumulative, own, module in rows[:count]:
        lines.append(f"{cumulative / 1e6:10.3f} s {own / 1e6:8.3f} s  {module.strip()}")
    return "\n".join(lines)


def missingBytecode() -> tuple[int, int]:
    """
    How many of mailfw's modules have no up-to-date bytecode file, of how
    many.  Without one, every start compiles the module again (with
    C{PYTHONDONTWRITEBYTECODE} set nothing writes it; pip writes it when
    it installs a wheel).
    """
    sources = [path for directory in SOURCES for path in directory.rglob("*.py")]
    missing = 0
    for source in sources:
        compiled = Path(importlib.util.cache_from_source(str(source)))
        if not compiled.exists() or compiled.stat().st_mtime < source.stat().st_mtime:
            missing += 1
    return missing, len(sources)


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--starts", type=int, default=5, help="start-ups timed per configuration (default 5)")
    parser.add_argument(
        "--workers", type=int, default=1, help="--workers of the bench configuration (default 1)"
    )
    parser.add_argument("--only", choices=CONFIGURATIONS, default=None, help="time one configuration only")
    parser.add_argument(
        "--imports", action="store_true", help="also list the slowest imports (-X importtime)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="first write the bytecode of mailfw's modules, as pip does when it installs a wheel",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    addArguments(parser)
    args = parser.parse_args(argv)
    if args.starts < 1:
        parser.error("--starts must be at least 1")
    if args.compile:
        for directory in SOURCES:
            compileall.compile_dir(directory, quiet=1)
    missing, total = missingBytecode()
    if missing:
        print(
            f"{missing} of {total} mailfw modules have no up-to-date bytecode: each start compiles them"
            f" (PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r});"
            " --compile writes it first"
        )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before: {load}; {os.cpu_count()} cores")
    for configuration in [args.only] if args.only else CONFIGURATIONS:
        print(measure(configuration, args.workers, args.starts), flush=True)
    if args.imports:
        print(topImports(args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
