"""
An authoritative DNS server on 127.0.0.1 for end-to-end tests and the
policy benchmark: L{twisted.names} answering from a JSON zone, in a
subprocess of its own (so its reactor is not the test's).

Run as a script::

    python tests/integration/_dnsserver.py --port 5353 --zone zone.json

where C{zone.json} maps each name to its records, C{[type, data, ttl]}::

    {"2.0.0.127.bl.test": [["A", "127.0.0.2", 300]],
     "example.test": [["MX", "10 mx.example.test", 300], ["TXT", "v=spf1 -all", 300]]}

Types: A, AAAA, MX (C{"preference host"}), TXT, CNAME.  A name absent from
the zone is NXDOMAIN with an SOA (negative TTL 60); a name present without
records of the asked type is NODATA.  The zone file is read again when it
changes, so a test can add records while the server runs.  Both UDP and
TCP are served on the port.  The server prints C{ready} once it listens.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


def _records(zone: Mapping[str, Sequence[Sequence[Any]]], name: str, qtype: int) -> list[Any]:
    from twisted.names import dns

    answers = []
    for kind, data, ttl in zone.get(name, ()):
        kind = kind.upper()
        record: Any
        if kind == "A":
            record = dns.Record_A(data, ttl=ttl)
        elif kind == "AAAA":
            record = dns.Record_AAAA(data, ttl=ttl)
        elif kind == "MX":
            preference, host = data.split(None, 1)
            record = dns.Record_MX(int(preference), host.encode("ascii"), ttl=ttl)
        elif kind == "TXT":
            # Long strings are split into 255-octet pieces (RFC 7208 3.3).
            raw = data.encode("utf-8")
            record = dns.Record_TXT(*[raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""], ttl=ttl)
        elif kind == "CNAME":
            record = dns.Record_CNAME(data.encode("ascii"), ttl=ttl)
        else:
            raise ValueError(f"unknown record type {kind}")
        if qtype == record.TYPE or (record.TYPE == dns.CNAME and qtype != dns.CNAME):
            answers.append(
                dns.RRHeader(name.encode("ascii"), record.TYPE, ttl=ttl, payload=record, auth=True)
            )
    return answers


def serve(port: int, zonePath: Path) -> None:
    """
    Serve C{zonePath} on 127.0.0.1:C{port}, UDP and TCP, until killed.
    """
    from twisted.internet import defer, reactor
    from twisted.names import dns, error, server
    from twisted.names.common import ResolverBase

    class ZoneResolver(ResolverBase):
        def __init__(self) -> None:
            ResolverBase.__init__(self)
            self._stamp: tuple[int, int] | None = None
            self._zone: dict[str, Any] = {}

        def _current(self) -> dict[str, Any]:
            st = zonePath.stat()
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._zone = {k.lower().rstrip("."): v for k, v in json.loads(zonePath.read_text()).items()}
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._zone

        def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
            zone = self._current()
            text = name.decode("ascii").lower().rstrip(".")
            if text not in zone:
                soa = dns.Record_SOA(b"ns.test", b"hostmaster.test", minimum=60, ttl=60)
                message = dns.Message(rCode=dns.ENAME)
                message.authority = [dns.RRHeader(b"test", dns.SOA, ttl=60, payload=soa, auth=True)]
                return defer.fail(error.DNSNameError(message))
            return defer.succeed((_records(zone, text, type), [], []))

    factory = server.DNSServerFactory(authorities=[ZoneResolver()])
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def _freeDNSPort() -> int:
    """
    A port free on 127.0.0.1 for both TCP and UDP right now.
    """
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port for the DNS server")


class LoopbackDNS:
    """
    The DNS server in a subprocess, as a context manager::

        with LoopbackDNS(tmpPath, {"a.test": [["A", "127.0.0.1", 60]]}) as dns:
            ... f"127.0.0.1:{dns.port}" ...

    @ivar port: where it listens (UDP and TCP).
    """

    def __init__(self, directory: Path, zone: Mapping[str, Any], python: str = sys.executable) -> None:
        self.zonePath = directory / "zone.json"
        self.python = python
        self.port = _freeDNSPort()
        self.process: subprocess.Popen[bytes] | None = None
        self.setZone(zone)

    def setZone(self, zone: Mapping[str, Any]) -> None:
        """
        Replace the zone (the server reads it again on its next query).
        """
        temporary = self.zonePath.with_suffix(".tmp")
        temporary.write_text(json.dumps(zone))
        os.replace(temporary, self.zonePath)

    @property
    def nameserver(self) -> str:
        """
        The C{[dns] nameservers} entry for this server.
        """
        return f"127.0.0.1:{self.port}"

    def start(self) -> LoopbackDNS:
        self.process = subprocess.Popen(
            [self.python, str(SCRIPT), "--port", str(self.port), "--zone", str(self.zonePath)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        # Bounded: a server that neither prints nor exits is given up.
        readable, _, _ = select.select([self.process.stdout], [], [], 30)
        line = self.process.stdout.readline() if readable else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the DNS server did not start: {line!r}")
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--zone", type=Path, required=True)
    arguments = parser.parse_args()
    serve(arguments.port, arguments.zone)
