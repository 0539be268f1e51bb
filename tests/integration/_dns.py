"""
A loopback DNS server for the integration tests: C{twisted.names} serving
a zone from a dictionary over UDP and TCP on 127.0.0.1, authoritative for
every name (a name not in the zone is NXDOMAIN), with TLSA records (which
twisted.names does not know) and a switch for the AD bit, playing the
local validating resolver that C{[dns] dnssec = "trust-ad"} trusts.

In process: L{startDNS} (with the reactor pytest-twisted runs).  In a child
process, for tests that block while a C{twistd} child needs DNS:
L{dnsServer}, or C{python -m tests.integration._dns ZONE.json PORTFILE
[--ad]}, which writes its port to C{PORTFILE} when listening.

Zones in JSON: C{{name: [["MX", 10, "mx.test"], ["A", "127.0.0.1"],
["AAAA", "::1"], ["TXT", "..."], ["CNAME", "other.test"], ["TLSA", 3, 1, 1,
"hex"]]}}.
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

from twisted.names import authority, common, dns, server

__all__ = ["TLSARecord", "dnsServer", "startDNS", "zoneFromJSON"]

ROOT = Path(__file__).resolve().parents[2]


class TLSARecord(dns.UnknownRecord):
    """
    A TLSA record (type 52) that the authority below can serve.
    """

    TYPE = 52  # type: ignore[assignment]

    @classmethod
    def make(cls, usage: int, selector: int, matching: int, data: bytes) -> TLSARecord:
        return cls(bytes([usage, selector, matching]) + data, ttl=60)


class MemoryAuthority(authority.FileAuthority):
    """
    An authority for the whole name space whose records live in a
    dictionary.
    """

    def __init__(self, records: dict[str, list[Any]]) -> None:
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        self.soa = (b"", dns.Record_SOA(b"ns.test", b"root.test", 1, 60, 60, 60, 1))  # type: ignore[assignment]
        self.records = {n.lower().encode("ascii"): rs for n, rs in records.items()}  # type: ignore[assignment]


class ADServerFactory(server.DNSServerFactory):
    """
    Sets the AD bit on every answer when C{authenticated} is true, as a
    validating resolver does for signed zones.
    """

    authenticated = True

    def _responseFromMessage(
        self,
        message: Any,
        rCode: Any = dns.OK,
        answers: Any = None,
        authority: Any = None,
        additional: Any = None,
    ) -> Any:
        response = super()._responseFromMessage(message, rCode, answers, authority, additional)
        response.authenticData = self.authenticated
        return response

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        # Over UDP an answer to a query without EDNS gets at most 512 octets
        # and the TC bit, as from a real resolver (RFC 1035 4.2.1);
        # twisted.names would send it whole.
        if address is not None and getattr(message, "ednsVersion", None) is None:
            message.maxSize = 512
        super().sendReply(protocol, message, address)


def startDNS(reactor: Any, records: dict[str, list[Any]], authenticated: bool = True) -> tuple[int, Any, Any]:
    """
    Listen on one free port for UDP and TCP.

    @return: the port, the factory (flip C{authenticated} on it), and a
        function that stops listening.
    """
    factory = ADServerFactory(authorities=[MemoryAuthority(records)])
    factory.authenticated = authenticated
    for _ in range(50):
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = tcp.getHost().port
        try:
            udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
        except Exception:
            tcp.stopListening()
            continue
        break
    else:
        raise AssertionError("no port free for both UDP and TCP")

    def stop() -> None:
        udp.stopListening()
        tcp.stopListening()

    return port, factory, stop


def zoneFromJSON(data: dict[str, list[list[Any]]]) -> dict[str, list[Any]]:
    """
    The records of a zone written as JSON (see the module docstring).
    """
    zone: dict[str, list[Any]] = {}
    for name, entries in data.items():
        records: list[Any] = []
        for kind, *values in entries:
            if kind == "MX":
                records.append(dns.Record_MX(values[0], values[1].encode("ascii"), ttl=60))
            elif kind == "A":
                records.append(dns.Record_A(values[0], ttl=60))
            elif kind == "AAAA":
                records.append(dns.Record_AAAA(values[0], ttl=60))
            elif kind == "TXT":
                # Long texts are split in strings of at most 255 octets.
                text = values[0].encode("utf-8")
                records.append(
                    dns.Record_TXT(*[text[i : i + 255] for i in range(0, len(text), 255)] or [b""], ttl=60)
                )
            elif kind == "CNAME":
                records.append(dns.Record_CNAME(values[0].encode("ascii"), ttl=60))
            elif kind == "TLSA":
                records.append(TLSARecord.make(values[0], values[1], values[2], bytes.fromhex(values[3])))
            else:
                raise ValueError(f"unknown record type {kind}")
        zone[name] = records
    return zone


@contextmanager
def dnsServer(
    zone: dict[str, list[list[Any]]], directory: Path, authenticated: bool = False
) -> Iterator[int]:
    """
    Serve C{zone} (JSON form) from a child process; yields the port.  The
    child is stopped on exit.
    """
    directory.mkdir(parents=True, exist_ok=True)
    zoneFile, portFile = directory / "zone.json", directory / "dns.port"
    zoneFile.write_text(json.dumps(zone))
    portFile.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._dns", str(zoneFile), str(portFile)]
        + (["--ad"] if authenticated else []),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not portFile.exists() or not portFile.read_text().strip().isdigit():
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


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    zone = zoneFromJSON(json.loads(Path(argv[0]).read_text()))
    port, _factory, _stop = startDNS(reactor, zone, "--ad" in argv)
    # Written whole, so a reader never sees part of the number.
    partial = Path(argv[1] + ".tmp")
    partial.write_text(str(port))
    partial.rename(argv[1])
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
