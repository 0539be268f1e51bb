"""
A loopback DNS server for the outbound trust tests: C{twisted.names}
serving a C{test.} zone over UDP and TCP on 127.0.0.1, with TLSA records
(which twisted.names does not know) and a switch for the AD bit, playing
the local validating resolver that C{[dns] dnssec = "trust-ad"} trusts.

In process: L{startDNS} (with the reactor pytest-twisted runs).  As a
subprocess, for C{twistd} children that need it while the test blocks:
C{python -m tests.integration._dns ZONE.json PORTFILE [--ad]} writes its
port to C{PORTFILE} when listening.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.names import authority, common, dns, server

__all__ = ["TLSARecord", "startDNS", "zoneFromJSON"]


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
    An authority for C{test.} whose records live in a dictionary.
    """

    def __init__(self, records: dict[str, list[Any]]) -> None:
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        self.soa = (  # type: ignore[assignment]
            b"test",
            dns.Record_SOA(b"ns.test", b"root.test", 1, 60, 60, 60, 1),
        )
        table: dict[bytes, list[Any]] = {n.encode("ascii"): rs for n, rs in records.items()}
        table[b"test"] = [self.soa[1]]  # type: ignore[index]
        self.records = table  # type: ignore[assignment]


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


def startDNS(reactor: Any, records: dict[str, list[Any]], authenticated: bool = True) -> tuple[int, Any, Any]:
    """
    Listen on one free port for UDP and TCP.

    @return: the port, the factory (flip C{authenticated} on it), and a
        function that stops listening.
    """
    factory = ADServerFactory(authorities=[MemoryAuthority(records)])
    factory.authenticated = authenticated
    for _ in range(20):
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
    C{{name: [["MX", 10, "mx.test"], ["A", "127.0.0.1"], ["TLSA", 3, 1, 1, "hex"], ["TXT", "..."]]}}.
    """
    zone: dict[str, list[Any]] = {}
    for name, entries in data.items():
        records: list[Any] = []
        for kind, *values in entries:
            if kind == "MX":
                records.append(dns.Record_MX(values[0], values[1].encode("ascii"), ttl=60))
            elif kind == "A":
                records.append(dns.Record_A(values[0], ttl=60))
            elif kind == "TXT":
                records.append(dns.Record_TXT(values[0].encode("utf-8"), ttl=60))
            elif kind == "TLSA":
                records.append(TLSARecord.make(values[0], values[1], values[2], bytes.fromhex(values[3])))
            else:
                raise ValueError(f"unknown record type {kind}")
        zone[name] = records
    return zone


def main(argv: list[str]) -> None:
    from pathlib import Path

    from twisted.internet import reactor

    zone = zoneFromJSON(json.loads(Path(argv[0]).read_text()))
    port, _factory, _stop = startDNS(reactor, zone, "--ad" in argv)
    Path(argv[1]).write_text(str(port))
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
