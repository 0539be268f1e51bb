"""
The header fields the server writes into a message: the C{Received:}
trace field, the submission fixups (C{Date:}, C{Message-ID:}), the fields
policies add, each checked so that nothing breaks the header section, and
the end-of-data edits and C{Authentication-Results:} (L{MessageDraft}).
Pure functions of their arguments (the clock's time is passed in), so the
session and the message sink share them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime

import authres
import idna
from twisted.logger import Logger

from mailfw.envelope import Envelope, Recipient, Session
from mailfw.verdict import (
    AddHeader,
    AddRecipient,
    AuthResult,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    Discard,
    MessageEdit,
    Quarantine,
    ReplaceBody,
)

__all__ = ["RECEIVED_FIELD", "MessageDraft", "policyHeaders", "receivedHeader", "submissionHeaders"]

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


# A field's first line: its name, up to the colon.
_FIELD_NAME = re.compile(rb"([^:\s]+)[ \t]*:")
_COMMENT = re.compile(r"\([^()]*\)")


class MessageDraft:
    """
    A received message's header section and envelope on their way into the
    queue, with the end-of-data edits applied (the body streams into the
    queue; a replacement is kept in C{replacedBody}).

    @ivar fields: the header fields, each with its folded lines and CRLF.
    @ivar blank: whether the section ends with the empty line.
    @ivar discard: the reason to drop the message, if an edit said so.
    @ivar quarantine: the reason to hold it, if an edit said so.
    """

    log = Logger()

    def __init__(self, header: bytes, envelope: Envelope) -> None:
        self.blank = header.endswith(b"\r\n\r\n") or header == b"\r\n"
        lines = (header[:-2] if self.blank else header).split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        self.fields: list[bytes] = []
        for line in lines:
            if line[:1] in (b" ", b"\t") and self.fields:
                self.fields[-1] += line + b"\r\n"
            else:
                self.fields.append(line + b"\r\n")
        self.envelope = envelope
        self.replacedBody: bytes | None = None
        self.discard: str | None = None
        self.quarantine: str | None = None

    @property
    def header(self) -> bytes:
        """
        The header section to store.
        """
        return b"".join(self.fields) + (b"\r\n" if self.blank else b"")

    def apply(self, edits: Sequence[MessageEdit]) -> None:
        """
        Apply C{edits} in order; an edit that would break the message (a
        header that is not a header) is dropped and logged.
        """
        for edit in edits:
            if isinstance(edit, AddHeader):
                field = _field(edit.name, edit.value)
                if field is not None:
                    index = (
                        len(self.fields) if edit.index is None else max(0, min(edit.index, len(self.fields)))
                    )
                    self.fields.insert(index, field)
            elif isinstance(edit, ChangeHeader):
                self._change(edit)
            elif isinstance(edit, ChangeSender):
                self.envelope = replace(self.envelope, sender=edit.sender)
            elif isinstance(edit, AddRecipient):
                if all(r.address != edit.address for r in self.envelope.recipients):
                    recipients = (*self.envelope.recipients, Recipient(edit.address))
                    self.envelope = replace(self.envelope, recipients=recipients)
            elif isinstance(edit, DeleteRecipient):
                recipients = tuple(r for r in self.envelope.recipients if r.address != edit.address)
                self.envelope = replace(self.envelope, recipients=recipients)
            elif isinstance(edit, ReplaceBody):
                self.replacedBody = _crlf(edit.body)
            elif isinstance(edit, Quarantine):
                self.quarantine = edit.reason
            elif isinstance(edit, Discard):
                self.discard = edit.reason

    def _change(self, edit: ChangeHeader) -> None:
        name = edit.name.lower().encode("utf-8", "replace")
        seen = 0
        for index, field in enumerate(self.fields):
            match = _FIELD_NAME.match(field)
            if match is None or match.group(1).lower() != name:
                continue
            seen += 1
            if seen == edit.occurrence:
                if edit.value is None:
                    del self.fields[index]
                else:
                    replacement = _field(edit.name, edit.value)
                    if replacement is not None:
                        self.fields[index] = replacement
                return
        if edit.value is not None:
            added = _field(edit.name, edit.value)
            if added is not None:
                self.fields.append(added)

    def addResults(self, authservID: str, results: Sequence[AuthResult]) -> None:
        """
        Remove the C{Authentication-Results:} fields that claim to be ours
        (RFC 8601 5: a client must not forge them) and, if there are
        C{results}, write ours on top.
        """
        ours = authservID.lower()
        self.fields = [field for field in self.fields if _authservID(field) != ours]
        if results:
            self.fields.insert(0, authenticationResults(authservID, results))


def authenticationResults(authservID: str, results: Sequence[AuthResult]) -> bytes:
    """
    One C{Authentication-Results:} field (RFC 8601) for C{results}, one
    result a line.
    """
    items = []
    for result in results:
        properties = [
            authres.AuthenticationResultProperty(*key.split(".", 1), value)
            for key, value in result.properties
            if "." in key
        ]
        item = authres.AuthenticationResult(
            method=result.method, result=result.result, reason=result.reason, properties=properties
        )
        items.append(_UNSAFE_TEXT.sub("?", str(item)))
    value = ";\r\n\t".join([authservID, *items])
    return f"Authentication-Results: {value}\r\n".encode()


_UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _authservID(field: bytes) -> str | None:
    """
    The authserv-id of an C{Authentication-Results:} field, lower-cased,
    or C{None} for another field.
    """
    match = _FIELD_NAME.match(field)
    if match is None or match.group(1).lower() != b"authentication-results":
        return None
    value = field[match.end() :].decode("utf-8", "replace")
    value = _COMMENT.sub(" ", value.split(";", 1)[0])
    words = value.split()
    return words[0].lower() if words else ""


def _field(name: str, value: str) -> bytes | None:
    """
    A header field from a filter's name and value: folded lines (LF or
    CRLF followed by white space) are kept as CRLF; anything else that
    would break the header section drops the field, logged.
    """
    folded = _crlf(value.encode("utf-8", "surrogateescape")).rstrip(b"\r\n")
    lines = folded.split(b"\r\n")
    if (
        not _HEADER_NAME.match(name)
        or any(line[:1] not in (b" ", b"\t") for line in lines[1:])
        or b"\r" in b"".join(lines)
    ):
        log.warn("header edit for {name!r} dropped: invalid", name=name)
        return None
    separator = b"" if folded[:1] in (b" ", b"\t") else b" "
    return name.encode("ascii") + b":" + separator + folded + b"\r\n"


def _crlf(text: bytes) -> bytes:
    """
    C{text} with every line ending CRLF.
    """
    return re.sub(rb"\r?\n", b"\r\n", text)
