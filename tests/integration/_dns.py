"""
A DNS server on 127.0.0.1 in a child process, for tests that run mailfw
(or another peer) as a process of its own: the test process blocks while
it waits for them, so the server cannot live in the test's reactor.

The zone is a JSON object: name -> list of C{[type, value...]}, with
types A, AAAA, MX (preference, name), TXT (text), CNAME (name); every
name is authoritative, anything else is NXDOMAIN.  Run as
C{python -m tests.integration._dns PORTFILE ZONEFILE}: it binds UDP and
TCP on one free port and writes the port to PORTFILE.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["dnsServer"]

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def dnsServer(zone: dict[str, list[list[Any]]], directory: Path) -> Iterator[int]:
    """
    Serve C{zone}; yields the port.  The child is stopped on exit.
    """
    directory.mkdir(parents=True, exist_ok=True)
    zoneFile, portFile = directory / "zone.json", directory / "dns.port"
    zoneFile.write_text(json.dumps(zone))
    portFile.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._dns", str(portFile), str(zoneFile)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not portFile.exists() or not portFile.read_text().strip():
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the DNS server did not start (exit status {child.poll()})")
            time.sleep(0.05)
        yield int(portFile.read_text())
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def _serve(portFile: Path, zoneFile: Path) -> None:
    from twisted.internet import reactor
    from twisted.names import authority, common, dns, server

    def record(kind: str, *values: Any) -> Any:
        if kind == "A":
            return dns.Record_A(values[0], ttl=60)
        if kind == "AAAA":
            return dns.Record_AAAA(values[0], ttl=60)
        if kind == "MX":
            return dns.Record_MX(values[0], values[1].encode("ascii"), ttl=60)
        if kind == "TXT":
            text = values[0].encode("utf-8")
            # Long texts are split in strings of at most 255 octets.
            return dns.Record_TXT(*[text[i : i + 255] for i in range(0, len(text), 255)] or [b""], ttl=60)
        if kind == "CNAME":
            return dns.Record_CNAME(values[0].encode("ascii"), ttl=60)
        raise ValueError(f"unknown record type {kind}")

    class Zone(authority.FileAuthority):
        def __init__(self, records: dict[bytes, list[Any]]) -> None:
            common.ResolverBase.__init__(self)
            self._cache: dict[Any, Any] = {}
            self.soa = (b"", dns.Record_SOA(b"ns.test", b"root.test", 1, 60, 60, 60, 1))  # type: ignore[assignment]
            self.records = records  # type: ignore[assignment]

    zone = json.loads(zoneFile.read_text())
    records = {name.lower().encode("ascii"): [record(*r) for r in rs] for name, rs in zone.items()}
    factory = server.DNSServerFactory(authorities=[Zone(records)])
    for _ in range(50):
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port: int = tcp.getHost().port  # type: ignore[attr-defined]
        try:
            reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")  # type: ignore[attr-defined]
        except Exception:
            tcp.stopListening()
            continue
        break
    else:
        raise SystemExit("no port free for both UDP and TCP")
    portFile.write_text(str(port))
    reactor.run()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))
