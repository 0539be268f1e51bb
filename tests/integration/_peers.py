"""
Real SMTP peers for end-to-end tests: Postfix's C{smtp-sink} on a loopback
address.

Addresses: 127.0.0.2 runs the peers; 127.0.0.3 has nothing listening, so
connections to it are refused (a dead MX host).
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.integration._server import requireTool, waitFor

PEER = "127.0.0.2"
DEAD = "127.0.0.3"


def freePortOn(host: str) -> int:
    """
    A TCP port free on C{host} and on L{DEAD}, so that the same port
    number refuses connections on the dead MX host.
    """
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind((DEAD, port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port")


# --- smtp-sink -------------------------------------------------------------


@dataclass
class Sink:
    port: int
    dumps: Path
    process: subprocess.Popen[bytes]

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dumps.iterdir())]


def startSink(tmp: Path, *extra: str) -> Sink:
    binary = requireTool("smtp-sink")
    port = freePortOn(PEER)
    dumps = tmp / f"sink-{port}"
    dumps.mkdir()
    process = subprocess.Popen(
        [binary, "-u", "root", "-h", "mx-up.test", "-d", f"{dumps}/m.", *extra, f"{PEER}:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"smtp-sink exited with {process.returncode}")
        with socket.socket() as s:
            return s.connect_ex((PEER, port)) == 0

    waitFor(listening, timeout=10, what="smtp-sink")
    return Sink(port, dumps, process)


def stopSink(sink: Sink) -> None:
    sink.process.terminate()
    try:
        sink.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        sink.process.kill()
        sink.process.wait(timeout=5)
