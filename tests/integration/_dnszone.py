"""
A throw-away authoritative DNS server on 127.0.0.1 for end-to-end tests:
a child process (L{twisted.names}) answering TXT queries from a zone given
as C{{name: [text, ...]}}; other names are NXDOMAIN, other types empty.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration._server import waitFor

_SERVER = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import reactor
    from twisted.internet.defer import fail, succeed
    from twisted.names import common, dns, error, server

    zone = {k.lower(): v for k, v in json.load(open(sys.argv[1])).items()}

    class Zone(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout):
            text = name.decode("ascii").lower().rstrip(".")
            if text not in zone:
                return fail(error.AuthoritativeDomainError(text))
            if type not in (dns.TXT, dns.ALL_RECORDS):
                return succeed(([], [], []))
            answers = [
                dns.RRHeader(
                    name, dns.TXT, ttl=60, auth=True,
                    payload=dns.Record_TXT(*[t[i:i + 255].encode() for i in range(0, len(t), 255)], ttl=60),
                )
                for t in zone[text]
            ]
            return succeed((answers, [], []))

    factory = server.DNSServerFactory(authorities=[Zone()])
    reactor.listenUDP(int(sys.argv[2]), dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    reactor.listenTCP(int(sys.argv[2]), factory, interface="127.0.0.1")
    reactor.run()
    """
)


@dataclass
class DNSZone:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


def _freeUDPAndTCPPort() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise AssertionError("no free port for the DNS server")


def _answers(port: int) -> bool:
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04test\x00\x00\x10\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(query, ("127.0.0.1", port))
        try:
            return s.recv(512)[:2] == b"\x12\x34"
        except OSError:
            return False


@contextmanager
def dnsZone(tmp: Path, zone: Mapping[str, Sequence[str]]) -> Iterator[DNSZone]:
    """
    Run a DNS server for C{zone} until the block ends.
    """
    zoneFile = tmp / "zone.json"
    zoneFile.write_text(json.dumps({name: list(texts) for name, texts in zone.items()}))
    script = tmp / "dnsserver.py"
    script.write_text(_SERVER)
    port = _freeUDPAndTCPPort()
    log = tmp / "dnsserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(script), str(zoneFile), str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"the DNS server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
                )
            return _answers(port)

        waitFor(ready, timeout=15, what="the loopback DNS server")
        yield DNSZone(port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
