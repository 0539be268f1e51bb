"""
The filter side of the milter protocol, for tests: a scripted milter that
records what the MTA sent and answers as told, and an endpoint that
connects a policy to it in memory (every write is delivered at once).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.policy._milter import packet, parsePackets

NO_REPLY = {
    b"C": 0x1000,
    b"H": 0x2000,
    b"M": 0x4000,
    b"R": 0x8000,
    b"T": 0x10000,
    b"N": 0x40000,
    b"B": 0x80000,
    b"L": 0x80,
}


@dataclass
class MilterScript:
    """
    What a scripted milter asks for and answers.

    @ivar replies: command to the reply packet(s) (C{(code, data)}); a
        command not listed is answered continue.  C{"hold"} keeps the reply
        back until the test calls L{ScriptedMilter.release}.
    @ivar eom: the modification packets sent before the end of message's
        final reply, which is C{replies[b"E"]} or accept.
    """

    actions: int = 0x1FF
    protocol: int = 0
    replies: dict[bytes, Any] = field(default_factory=dict)
    eom: list[tuple[bytes, bytes]] = field(default_factory=list)
    symlist: bytes = b""
    raw: bytes | None = None


class ScriptedMilter(Protocol):
    def __init__(self, script: MilterScript) -> None:
        self.script = script
        self.received: list[tuple[bytes, bytes]] = []
        self.macros: dict[bytes, dict[str, str]] = {}
        self.held: list[bytes] = []
        self._buffer = bytearray()
        self.closed = False

    def commands(self) -> list[bytes]:
        return [command for command, _ in self.received if command not in (b"D", b"O")]

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        for command, body in parsePackets(self._buffer):
            self.received.append((command, body))
            self.answer(command, body)

    def answer(self, command: bytes, body: bytes) -> None:
        script = self.script
        if command == b"O":
            self.send(b"O", struct.pack("!III", 6, script.actions, script.protocol) + script.symlist)
            return
        if command == b"D":
            parts = body[1:].split(b"\0")
            self.macros[body[:1]] = {
                parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)
            }
            return
        if command in (b"A", b"Q"):
            return
        if NO_REPLY.get(command, 0) & script.protocol:
            return
        if command == b"E":
            for code, data in script.eom:
                self.send(code, data)
        reply = script.replies.get(command, (b"a", b"") if command == b"E" else (b"c", b""))
        if reply == "hold":
            self.held.append(command)
            return
        if reply == "silent":
            return
        if isinstance(reply, bytes):
            assert self.transport is not None
            self.transport.write(reply)
            return
        self.send(*reply)

    def release(self, code: bytes = b"c", data: bytes = b"") -> None:
        self.held.pop(0)
        self.send(code, data)

    def send(self, code: bytes, data: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.write(packet(code, data))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.closed = True


class _Pipe(StringTransport):
    """
    One end of an in-memory connection: writes are delivered at once.
    """

    peer: Protocol | None = None
    other: _Pipe | None = None

    def write(self, data: bytes) -> None:
        if not self.disconnecting and self.peer is not None:
            self.peer.dataReceived(data)

    def loseConnection(self) -> None:
        self._close()

    def abortConnection(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        assert self.other is not None and self.peer is not None
        self.other.disconnecting = True
        self.peer.connectionLost(Failure(ConnectionDone()))
        if self.other.peer is not None:
            self.other.peer.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class InMemoryEndpoint:
    """
    Connects each client to a new server protocol from C{makeServer} in
    memory; with C{refuse}, every connection fails; with C{hang}, it never
    completes.  C{servers} lists the server protocols made.
    """

    def __init__(self, makeServer: Callable[[], Protocol], refuse: bool = False, hang: bool = False) -> None:
        self.makeServer = makeServer
        self.refuse = refuse
        self.hang = hang
        self.servers: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError("nobody listens"))
        if self.hang:
            return Deferred()
        client = factory.buildProtocol(None)
        server = self.makeServer()
        self.servers.append(server)
        toServer, toClient = _Pipe(), _Pipe()
        toServer.peer, toClient.peer = server, client
        toServer.other, toClient.other = toClient, toServer
        client.makeConnection(toServer)
        server.makeConnection(toClient)
        return succeed(client)


class MilterEndpoint(InMemoryEndpoint):
    """
    Connects each session to a new L{ScriptedMilter}.
    """

    def __init__(self, script: MilterScript, refuse: bool = False, hang: bool = False) -> None:
        super().__init__(lambda: ScriptedMilter(script), refuse, hang)
        self.script = script

    @property
    def filters(self) -> list[ScriptedMilter]:
        return self.servers
