"""
Real TLS connections in memory: two L{TLSMemoryBIOProtocol}s joined by
L{twisted.test.iosim}, for tests that need what only a real handshake
gives (the channel binding data of L{mailfw.auth._scram}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from mailfw.tls import selfSignedCertificate

__all__ = ["NO_EXTENDED_MASTER_SECRET", "tlsPair"]

# OpenSSL's SSL_OP_NO_EXTENDED_MASTER_SECRET.
NO_EXTENDED_MASTER_SECRET = 1


class _One(Factory):
    """
    Builds the one protocol it was given.
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.protocol  # type: ignore[return-value]


def tlsPair(
    version: TLSVersion,
    clientOptions: int = 0,
    server: Protocol | None = None,
    client: Protocol | None = None,
    serverPeer: IAddress | None = None,
    clock: Clock | None = None,
) -> tuple[Any, Any, iosim.IOPump]:
    """
    A client and a server TLS connection over an in-memory pipe, with
    the handshake done, both limited to C{version}.

    @param clientOptions: OpenSSL options to set on the client's context.
    @param server: the protocol inside the server's TLS (a bare
        L{Protocol} by default); C{client} likewise.
    @param serverPeer: the client's address as the server sees it.
    @param clock: the clock the pump advances: TLS holds small writes
        back until the clock's next turn.
    @return: the client's and the server's L{TLSMemoryBIOProtocol}, and
        the pump that moves data between them.
    """
    key, cert = selfSignedCertificate("mx.example", days=1)
    serverTLS = CertificateOptions(
        privateKey=key, certificate=cert, raiseMinimumTo=version, lowerMaximumSecurityTo=version
    )
    clientTLS = CertificateOptions(raiseMinimumTo=version, lowerMaximumSecurityTo=version)
    if clientOptions:
        clientTLS.getContext().set_options(clientOptions)
    clock = clock or Clock()
    serverFactory = TLSMemoryBIOFactory(serverTLS, False, _One(server or Protocol()), clock)
    clientFactory = TLSMemoryBIOFactory(clientTLS, True, _One(client or Protocol()), clock)
    serverSide = serverFactory.buildProtocol(None)
    clientSide = clientFactory.buildProtocol(None)
    pump = iosim.connect(
        serverSide,
        iosim.FakeTransport(serverSide, isServer=True, peerAddress=serverPeer),
        clientSide,
        iosim.makeFakeClient(clientSide),
        clock=clock,
    )
    pump.flush()
    return clientSide, serverSide, pump
