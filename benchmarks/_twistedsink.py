"""
A reference for the accept benchmark: Twisted's stock ESMTP server
(C{twisted.mail.smtp.ESMTP}) accepting every message and keeping nothing.

It is not durable (the 250 means nothing survives a crash), so it is not
a competitor: it shows what a plain Twisted SMTP server costs on this
machine, the ceiling a Twisted MTA's protocol layer works under.

Run as C{python _twistedsink.py PORT}; it prints C{ready} when it listens
and stops on SIGTERM.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class _Discard:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[bytes]:
        return defer.succeed(b"discarded")

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _AcceptAll:
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: from bench"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return _Discard


class _Factory(Factory):
    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        protocol = smtp.ESMTP()
        protocol.host = b"sink.bench.test"
        protocol.delivery = _AcceptAll()
        protocol.factory = self
        return protocol


def main(reactor: Any, port: str) -> defer.Deferred[None]:
    endpoint = endpoints.TCP4ServerEndpoint(reactor, int(port), backlog=1024, interface="127.0.0.1")
    done: defer.Deferred[None] = defer.Deferred()

    def listening(_: Any) -> None:
        print("ready", flush=True)

    endpoint.listen(_Factory()).addCallback(listening)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: done.callback(None))
    return done


if __name__ == "__main__":
    from twisted.internet.task import react

    react(main, sys.argv[1:])
