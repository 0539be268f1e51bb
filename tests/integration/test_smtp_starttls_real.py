"""
STARTTLS over real TLS on loopback: the server runs in the test's reactor
with a throwaway self-signed certificate; the clients (Python's C{ssl} and
C{smtplib}) run in a thread with bounded timeouts.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from typing import Any, cast

import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThread

from mailfw.smtp import SMTPFactory
from mailfw.tls import selfSignedCertificate
from tests._smtpdoubles import HOSTNAME, DictRouter, RecordingQueue

TIMEOUT = 10.0


def selfSignedOptions() -> CertificateOptions:
    """
    Server TLS options with a new self-signed certificate.
    """
    key, cert = selfSignedCertificate(HOSTNAME, days=1)
    return CertificateOptions(privateKey=cast(Any, key), certificate=cast(Any, cert))


def clientContext() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def readReply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """
    Read one (possibly multi-line) reply, octet by octet so that nothing
    past it is consumed before the TLS handshake.
    """
    lines: list[bytes] = []
    line = b""
    while True:
        octet = sock.recv(1)
        if not octet:
            raise ConnectionError(f"closed after {lines!r} {line!r}")
        line += octet
        if line.endswith(b"\r\n"):
            lines.append(line)
            if line[3:4] == b" ":
                return b"".join(lines)
            line = b""


def injection(port: int) -> list[bytes]:
    """
    Pipeline a MAIL behind STARTTLS in one packet, start TLS, and see
    whether the MAIL took effect inside the TLS session.
    """
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as plain:
        replies.append(readReply(plain))
        plain.sendall(b"EHLO client.example\r\n")
        replies.append(readReply(plain))
        plain.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
        replies.append(readReply(plain))
        with clientContext().wrap_socket(plain, server_hostname=HOSTNAME) as tls:
            tls.sendall(b"EHLO client.example\r\nRCPT TO:<rcpt@example.org>\r\n")
            replies.append(readReply(tls))
            replies.append(readReply(tls))
            tls.sendall(b"QUIT\r\n")
            replies.append(readReply(tls))
    return replies


def sendWithSmtplib(port: int) -> tuple[int, bytes]:
    """
    A complete session with C{smtplib}: EHLO, STARTTLS, EHLO, a message.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.example")
        assert client.has_extn("starttls")
        client.starttls(context=clientContext())
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        client.sendmail("sender@example.net", ["rcpt@example.org"], b"Subject: over TLS\r\n\r\n.dot\r\n")
        return client.noop()


async def serve(queue: RecordingQueue, call: Any) -> Any:
    from twisted.internet import reactor

    factory = SMTPFactory(
        "smtp",
        HOSTNAME,
        queue,  # type: ignore[arg-type]
        DictRouter(),
        cast(Any, reactor),
        tlsOptions=selfSignedOptions(),
    )
    port = cast(Any, reactor).listenTCP(0, factory, interface="127.0.0.1")
    try:
        return await deferToThread(call, port.getHost().port)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_pipelinedPlaintextDiscarded() -> None:
    """
    Over real TLS, a MAIL pipelined behind STARTTLS does not survive the
    handshake: the RCPT inside TLS gets 503.
    """
    queue = RecordingQueue()
    replies = await serve(queue, injection)
    assert replies[0].startswith(b"220 mx.example.org ESMTP")
    assert b"250-STARTTLS" in replies[1] or b"250 STARTTLS" in replies[1]
    assert replies[2] == b"220 2.0.0 Ready to start TLS\r\n"
    assert b"STARTTLS" not in replies[3]
    assert replies[4] == b"503 5.5.1 Need MAIL command first\r\n"
    assert replies[5].startswith(b"221 ")
    assert queue.messages == []


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_smtplibStarttls() -> None:
    """
    C{smtplib} can STARTTLS and send; the message is marked ESMTPS and
    dot-stuffing is undone.
    """
    queue = RecordingQueue()
    code, _text = await serve(queue, sendWithSmtplib)
    assert code == 250
    [(envelope, incoming)] = queue.messages
    assert incoming.committed
    assert b" with ESMTPS id Q1" in incoming.data
    assert incoming.data.endswith(b"Subject: over TLS\r\n\r\n.dot\r\n")
    assert [str(r.address) for r in envelope.recipients] == ["rcpt@example.org"]
