"""
The header fields the server writes into a message: the C{Received:}
trace field, the submission fixups (C{Date:}, C{Message-ID:}) and the
fields policies add, each checked so that nothing breaks the header
section.  Pure functions of their arguments (the clock's time is passed
in), so the session and the message sink share them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

import idna
from twisted.logger import Logger

from mailfw.envelope import Envelope, Session

__all__ = ["RECEIVED_FIELD", "policyHeaders", "receivedHeader", "submissionHeaders"]

log = Logger()

RECEIVED_FIELD = re.compile(rb"(?:^|\n)received[ \t]*:", re.IGNORECASE)
"""Finds each C{Received:} field of a header section (the loop check)."""
_DATE = re.compile(rb"(?:^|\n)date[ \t]*:", re.IGNORECASE)
_MESSAGE_ID = re.compile(rb"(?:^|\n)message-id[ \t]*:", re.IGNORECASE)
_COMMENT_UNSAFE = re.compile(r"[^\x21-\x7e ]")
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")


def receivedHeader(
    hostname: str,
    session: Session,
    queueID: str,
    envelope: Envelope,
    now: float,
    identity: bool = False,
) -> bytes:
    """
    The RFC 5321 4.4 trace header, with the protocol names of RFC 3848
    and RFC 6531.

    @param identity: name the authenticated user in a comment
        (L{mailfw.smtp.SMTPAuth.receivedIdentity}).
    """
    helo = session.helo or "unknown"
    if not envelope.smtputf8 and not helo.isascii():
        try:
            helo = idna.encode(helo, uts46=True).decode("ascii")
        except idna.IDNAError:
            helo = "invalid"
    host = session.peerHost
    if host:
        literal = f"[IPv6:{host}]" if ":" in host else f"[{host}]"
        origin = f"from {helo} ({literal})"
    else:
        origin = f"from {helo}"
    if identity and session.authenticated:
        name = _COMMENT_UNSAFE.sub("?", session.authenticated)
        name = name.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        origin += f"\r\n\t(Authenticated sender: {name})"
    suffix = ("S" if session.tls else "") + ("A" if session.authenticated else "")
    if envelope.smtputf8:
        protocol = "UTF8SMTP" + suffix
    elif session.esmtp:
        protocol = "ESMTP" + suffix
    else:
        protocol = "SMTP"
    when = format_datetime(datetime.fromtimestamp(now, UTC))
    lines = [f"Received: {origin}", f"\tby {hostname} with {protocol} id {queueID}"]
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{envelope.recipients[0].address}>; {when}")
    else:
        lines[-1] += f"; {when}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def submissionHeaders(hostname: str, header: bytes, now: float) -> bytes:
    """
    The C{Date:} and C{Message-ID:} fields a submitted message lacks (RFC
    6409 8.2 and 8.3).
    """
    out = b""
    if not _DATE.search(header):
        when = format_datetime(datetime.fromtimestamp(now, UTC))
        out += f"Date: {when}\r\n".encode("ascii")
    if not _MESSAGE_ID.search(header):
        out += f"Message-ID: <{secrets.token_hex(16)}@{_idHost(hostname)}>\r\n".encode("ascii")
    return out


def policyHeaders(headers: Sequence[tuple[str, str]]) -> bytes:
    """
    Header fields added by policies, checked so that no policy can break
    the header section (an invalid one is dropped and logged).
    """
    out = []
    for name, value in headers:
        if not _HEADER_NAME.match(name) or "\r" in value or "\n" in value:
            log.warn("policy header {name!r} dropped: invalid", name=name)
            continue
        out.append(f"{name}: {value}\r\n".encode())
    return b"".join(out)


def _idHost(hostname: str) -> str:
    """
    The right-hand side of a C{Message-ID}: the host name in ASCII.
    """
    try:
        host = idna.encode(hostname.rstrip("."), uts46=True).decode("ascii")
    except idna.IDNAError:
        host = ""
    return host if re.fullmatch(r"[A-Za-z0-9.-]+", host) else "localhost"
