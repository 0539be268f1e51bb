"""
What the MX policy chain costs: accept throughput with a chain of policies
against the same server without policies, in the same run.

Usage (as root, from the repository)::

    python benchmarks/policies.py [--policies limits,spf,dkim,dmarc]
        [--sessions 100] [--messages N] [--size 1024] [--repeat 3]
    python benchmarks/policies.py --policies milter    # OpenDKIM signing

Both servers are C{twistd mailfw} with the SQLite queue and a discarding
delivery agent, loaded by Postfix's C{smtp-source} from 127.0.0.1 as in
C{accept.py} (one connection per message, as between MTAs).  The policy
server asks its DNS questions to a L{twisted.names} server on loopback
(C{tests/integration/_dns.py}, a subprocess) that serves the
sender domain's MX, SPF and DMARC records; the DNSBL zone is empty.
Each policy gets the options in L{POLICY_OPTIONS}: its checks run for
every message but refuse none (the limits are high, greylisting has no
delay), since a refused message would end the run.

Runs alternate between the two servers (the order flips on every
repetition) and are repeated; the table shows
medians, and the last line the chain's cost in throughput against the
issue's target (at most 25% at 100 sessions).  A policy named in
C{--policies} but not installed is left out, and said so (C{--strict}
makes that an error), so that plugins can be added by name as they land.

With C{milter} in the chain, a private OpenDKIM (Debian's C{opendkim},
key from C{opendkim-genkey}) is started on loopback and signs every
message (smtp-source's sender domain is the signing domain, the client is
one of its internal hosts): what a milter costs, filter included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accept import (
    DOMAIN,
    BenchmarkError,
    LogCounter,
    Run,
    Server,
    _waitForServer,
    freePort,
    measure,
    messagesFor,
    stopProcess,
    treeTicks,
)

from tests.integration._dns import dnsServer

DEFAULT_POLICIES = ("limits", "spf", "dkim", "dmarc")

# Options per plugin for the benchmark: every check runs, none refuses.
POLICY_OPTIONS: dict[str, dict[str, object]] = {
    "limits": {
        "exempt_networks": [],
        "connections_per_client": 100_000,
        "connections_per_network": 100_000,
        "connection_rate": 1_000_000_000,
        "message_rate": 1_000_000_000,
        "recipient_rate": 1_000_000_000,
        "stress_threshold": 0,
    },
    "dnsbl": {"zones": [f"bl.{DOMAIN}"]},
    "greylist": {"delay": 0},
    "basic-checks": {},
}

# What the loopback DNS server answers: the sender domain (smtp-source
# sends from sender@bench.test, HELO client.bench.test, from 127.0.0.1).
ZONE: dict[str, list[list[object]]] = {
    DOMAIN: [["MX", 10, f"mx.{DOMAIN}"], ["A", "127.0.0.1"], ["TXT", "v=spf1 ip4:127.0.0.0/8 -all"]],
    f"mx.{DOMAIN}": [["A", "127.0.0.1"]],
    f"client.{DOMAIN}": [["A", "127.0.0.1"], ["TXT", "v=spf1 ip4:127.0.0.0/8 -all"]],
    f"_dmarc.{DOMAIN}": [["TXT", "v=DMARC1; p=none"]],
}

CONFIG = """\
[queue]
plugin = "sqlite"

[routing]
plugin = "static"
local_domains = ["{domain}"]
local_agent = "local"

[delivery.local]
plugin = "discard"

[smtp]
max_connections_per_client = 10000
"""


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def configFor(policies: Sequence[str], nameserver: str | None) -> str:
    """
    The server's configuration: C{policies} in order, each with its
    L{POLICY_OPTIONS}, asking DNS at C{nameserver}.
    """
    text = CONFIG.format(domain=DOMAIN)
    if nameserver is not None:
        text += f'\n[dns]\nnameservers = ["{nameserver}"]\n'
    for name in policies:
        text += f'\n[policy.{name.replace("-", "_")}]\nplugin = "{name}"\n'
        for key, value in POLICY_OPTIONS.get(name, {}).items():
            text += f"{key} = {_toml(value)}\n"
    return text


OPENDKIM_CONFIG = """\
Socket inet:{port}@127.0.0.1
Mode sv
Domain {domain}
Selector bench
KeyFile {key}
Canonicalization relaxed/simple
Background no
Syslog no
RequireSafeKeys no
"""


class OpenDKIM:
    """
    A private OpenDKIM signing for the benchmark's sender domain.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailfw-bench-opendkim-"))
        subprocess.run(
            ["opendkim-genkey", "-D", str(self.root), "-d", DOMAIN, "-s", "bench"], check=True, timeout=120
        )
        self.port = freePort()
        config = self.root / "opendkim.conf"
        config.write_text(
            OPENDKIM_CONFIG.format(port=self.port, domain=DOMAIN, key=self.root / "bench.private")
        )
        self.process = subprocess.Popen(
            ["opendkim", "-f", "-x", str(config)], stdin=subprocess.DEVNULL, start_new_session=True
        )
        import socket
        import time

        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchmarkError("opendkim did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        shutil.rmtree(self.root, ignore_errors=True)


def installedPolicies() -> set[str]:
    from twisted.plugin import getPlugins

    from mailfw.interfaces import IPolicyFactory

    return {plugin.name for plugin in getPlugins(IPolicyFactory)}


class ConfiguredMailfw(Server):
    """
    C{twistd -n mailfw} with a configuration of ours, logging to a file.
    """

    def __init__(self, name: str, config: str, port: int, timeout: float = 60) -> None:
        self.name = name
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix=f"mailfw-bench-{name}-"))
        self.logFile = self.root / "twistd.log"
        path = self.root / "mailfw.toml"
        path.write_text(config)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self._log = open(self.logFile, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [
                twistd,
                "-n",
                "--pidfile=",
                "mailfw",
                "--config",
                str(path),
                "--data-dir",
                str(self.root / "data"),
                "--hostname",
                f"mx.{DOMAIN}",
                "--smtp",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self._delivered = LogCounter(self.logFile, b"via local: 250 2.0.0 Discarded")
        self._refused = LogCounter(self.logFile, b" refused ")
        try:
            _waitForServer(self.process, port, timeout, self.logFile, name)
        except BaseException:
            self.stop()
            raise

    def cpuTicks(self) -> int:
        return treeTicks(self.pid)

    def delivered(self) -> int:
        return self._delivered()

    def refusals(self) -> int:
        return self._refused()

    def stop(self) -> None:
        stopProcess(self.process)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def report(runs: Sequence[Run], sessions: int, chain: Sequence[str]) -> str:
    lines = [f"{'server':8} {'sessions':>8} {'msgs':>6} {'msgs/s':>8} {'(min-max)':>13} {'CPU ms/msg':>10}"]
    medians: dict[str, float] = {}
    for name in ("none", "chain"):
        mine = [r for r in runs if r.server == name]
        if not mine:
            continue
        rates = [r.rate for r in mine]
        medians[name] = statistics.median(rates)
        lines.append(
            f"{name:8} {sessions:8d} {mine[0].messages:6d} {medians[name]:8.0f} "
            f"{f'({min(rates):.0f}-{max(rates):.0f})':>13} "
            f"{statistics.median(r.cpuPerMessage for r in mine):10.2f}"
        )
    if len(medians) == 2:
        cost = 1 - medians["chain"] / medians["none"]
        byAttempt = {(r.server, r.attempt): r.rate for r in runs}
        paired = [
            1 - byAttempt["chain", a] / byAttempt["none", a]
            for (name, a) in sorted(byAttempt)
            if name == "chain" and ("none", a) in byAttempt
        ]
        lines.append("")
        lines.append(
            f"chain {','.join(chain) or '(empty)'} costs {cost:.0%} of the throughput at {sessions} sessions"
            f"  (per repetition: {', '.join(f'{x:.0%}' for x in paired)})  (target <= 25%)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma-separated policy plugins, in chain order (default {','.join(DEFAULT_POLICIES)})",
    )
    parser.add_argument("--strict", action="store_true", help="fail if a named policy is not installed")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    arguments = parser.parse_args(argv)

    wanted = [name for name in arguments.policies.split(",") if name]
    installed = installedPolicies()
    missing = [name for name in wanted if name not in installed]
    if missing and arguments.strict:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    if missing:
        print(f"# not installed, left out of the chain: {', '.join(missing)}", file=sys.stderr)
    chain = [name for name in wanted if name in installed]
    messages = messagesFor(arguments.sessions, arguments.messages)

    scratch = Path(tempfile.mkdtemp(prefix="mailfw-bench-dns-"))
    runs: list[Run] = []
    failed = False
    opendkim = OpenDKIM() if "milter" in chain else None
    if opendkim is not None:
        POLICY_OPTIONS["milter"] = {"address": f"inet:127.0.0.1:{opendkim.port}"}
    with dnsServer(ZONE, scratch) as dnsPort:
        servers: dict[str, ConfiguredMailfw] = {}
        try:
            servers["none"] = ConfiguredMailfw("none", configFor((), None), freePort())
            servers["chain"] = ConfiguredMailfw("chain", configFor(chain, f"127.0.0.1:{dnsPort}"), freePort())
            for server in servers.values():
                # Warm up: imports, the SQLite file, DNS caches.
                measure(server, min(arguments.sessions, 10), 200, arguments.size, False, arguments.timeout)
            for attempt in range(arguments.repeat):
                # The order flips on every repetition: the machine's load
                # changes, and neither server should always go first.
                order = list(servers.items())
                for name, server in order if attempt % 2 == 0 else reversed(order):
                    try:
                        run = measure(
                            server, arguments.sessions, messages, arguments.size, False, arguments.timeout
                        )
                    except BenchmarkError as e:
                        print(f"# {name}: run {attempt + 1} failed: {e}", file=sys.stderr)
                        failed = True
                        continue
                    run.attempt = attempt
                    runs.append(run)
                    print(
                        f"# {name} run {attempt + 1}: {run.rate:.0f} msgs/s, {run.cpuPerMessage:.2f} CPU ms/msg",
                        file=sys.stderr,
                    )
            refused = servers["chain"].refusals()
            if refused:
                print(f"# the chain refused {refused} commands: see its options", file=sys.stderr)
                failed = True
        finally:
            for server in servers.values():
                server.stop()
            shutil.rmtree(scratch, ignore_errors=True)
            if opendkim is not None:
                opendkim.stop()
    print(report(runs, arguments.sessions, chain))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
