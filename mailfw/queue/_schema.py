"""
The one set of tables and states that every SQL queue backend shares, and
the pure helpers (envelope encoding, selector matching, queue IDs) that the
memory backend uses too.

The SQL here is portable between SQLite and PostgreSQL: C{?} placeholders
(a PostgreSQL backend rewrites them to C{%s} with L{pyformat}), C{TEXT},
C{INTEGER} and C{DOUBLE PRECISION} columns, booleans as C{0}/C{1}, and
bodies in their own table whose column type is chosen per backend
(C{BLOB} in SQLite, C{BYTEA} in PostgreSQL).  Anything backend-specific
(pragmas, C{zeroblob}, C{SKIP LOCKED}) lives in the backend module.

Tables
======

  - C{mailfw_schema}: one row, the schema version.
  - C{messages}: one row per queued message: the queue ID, the envelope as
    JSON (with all original recipients, for DSNs), the size, the arrival
    time and the sender text (for selectors).
  - C{message_bodies}: the message bytes, one row per message, in a table
    of their own so that listing and claiming never touch them.
  - C{recipients}: one row per recipient still in the queue (delivered and
    failed ones are deleted): its state (L{RecipientState} values),
    C{next_attempt_at}, attempts, whether a delay notice went out, the
    last reply, the domain and the reversed domain (for C{ETRN @domain}),
    the route name (for C{ETRN #name}), whether a flush released it
    (C{released}: ETRN and C{mailfw queue flush} set it, any record clears
    it), whether an operator asked to return it to its sender (C{bounce}:
    C{mailfw queue bounce} sets it, the scheduler then fails it with a
    DSN) and the lease (token, owner, expiry) while a scheduler holds it.
    Recipients of a hold-for-ETRN domain wait in state C{etrn} with
    C{next_attempt_at} at their next housekeeping time (delay notice or
    expiry), so the due index serves them too.

  - C{shared_state}: counters and marks that every process and node
    shares (L{mailfw.interfaces.ISharedState}): a counter's value, or a
    mark's first time in C{started}, and when the entry ends
    (C{expires}).  Added in version 2.

A message row is deleted in the same transaction as its last recipient row.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.envelope import Envelope, Recipient
from mailfw.queued import RecipientState, Selector
from mailfw.reply import SMTPReply

__all__ = [
    "SCHEMA_VERSION",
    "createStatements",
    "domainMatches",
    "envelopeFromJSON",
    "envelopeToJSON",
    "matchingClaim",
    "newQueueID",
    "pyformat",
    "reversedDomain",
    "selectorWhere",
]

SCHEMA_VERSION = 2

_TABLES = """
CREATE TABLE IF NOT EXISTS mailfw_schema (
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    envelope TEXT NOT NULL,
    size INTEGER NOT NULL,
    arrival DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS message_bodies (
    message_id TEXT PRIMARY KEY,
    body {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    message_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    notify TEXT NOT NULL,
    orcpt TEXT,
    domain TEXT NOT NULL,
    rdomain TEXT NOT NULL,
    state TEXT NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    reply_code INTEGER,
    reply_enhanced TEXT,
    reply_text TEXT,
    route TEXT,
    released INTEGER NOT NULL DEFAULT 0,
    bounce INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT,
    lease_owner TEXT,
    lease_expires DOUBLE PRECISION,
    PRIMARY KEY (message_id, idx)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS recipients_lease ON recipients (state, lease_expires);
CREATE INDEX IF NOT EXISTS recipients_domain ON recipients (domain);
CREATE INDEX IF NOT EXISTS recipients_rdomain ON recipients (rdomain);
CREATE INDEX IF NOT EXISTS messages_arrival ON messages (arrival);
CREATE TABLE IF NOT EXISTS shared_state (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS shared_state_expires ON shared_state (expires);
"""


def createStatements(blobType: str = "BLOB") -> list[str]:
    """
    The statements that create the schema, each safe to run again.

    @param blobType: the column type for message bytes (C{"BLOB"} for
        SQLite, C{"BYTEA"} for PostgreSQL).
    """
    text = _TABLES.replace("{blob}", blobType)
    return [s.strip() for s in text.split(";") if s.strip()]


def pyformat(statement: str) -> str:
    """
    Rewrite C{?} placeholders as C{%s} for DB-API drivers using the
    C{format} paramstyle (psycopg).  Our statements never contain a
    literal C{?} or C{%}.
    """
    return statement.replace("?", "%s")


# --- queue IDs ---------------------------------------------------------------


def newQueueID(now: Callable[[], float] = time.time) -> str:
    """
    A queue ID unique across nodes without coordination: 11 hex digits of
    milliseconds since the epoch (so IDs sort by arrival and keys insert at
    the end of the index) and 9 hex digits (36 bits) of randomness.

    The randomness is for uniqueness, not secrecy (IDs are shown to
    clients anyway), so it comes from L{random}, which the interpreter
    seeds from the system and reseeds in a forked child: a system call per
    message (C{os.urandom}) was a measurable cost.
    """
    return f"{int(now() * 1000) & 0xFFFFFFFFFFF:011X}{random.getrandbits(36):09X}"


# --- domains and selectors ----------------------------------------------------


def reversedDomain(domain: str) -> str:
    """
    The domain's labels in reverse order with a trailing dot:
    C{"mx.example.com"} becomes C{"com.example.mx."}.  C{ETRN @example.com}
    then matches with C{rdomain LIKE 'com.example.%'}, which an index on
    C{rdomain} serves, and which matches the domain itself and every
    subdomain but not C{"badexample.com"}.
    """
    if domain.startswith("["):
        return domain + "."
    return ".".join(reversed(domain.split("."))) + "."


def _normalise(domain: str) -> str:
    try:
        return normaliseDomain(domain)
    except AddressError:
        return domain.lower()


def domainMatches(pattern: str, domain: str) -> bool:
    """
    Whether a recipient C{domain} matches a selector's C{pattern}: exactly,
    or with a leading C{"@"} the domain and its subdomains.
    """
    if pattern.startswith("@"):
        base = _normalise(pattern[1:])
        return domain == base or domain.endswith("." + base)
    return domain == _normalise(pattern)


def _normaliseSender(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at:
        return text
    return f"{local}@{domain.lower()}"


def selectorMatches(
    selector: Selector,
    queueID: str,
    senderText: str,
    domain: str,
    state: RecipientState,
    route: str | None,
) -> bool:
    """
    Whether one recipient matches C{selector} (the memory backend's
    version of L{selectorWhere}).
    """
    if selector.queueIDs and queueID not in selector.queueIDs:
        return False
    if selector.domain is not None and not domainMatches(selector.domain, domain):
        return False
    if selector.sender is not None and _normaliseSender(senderText) != _normaliseSender(selector.sender):
        return False
    if selector.state is not None and state is not selector.state:
        return False
    return not (selector.route is not None and route != selector.route)


def selectorWhere(selector: Selector, alias: str = "r") -> tuple[str, list[Any]]:
    """
    A portable SQL condition on C{recipients} (as C{alias}, joined to
    C{messages} as C{m}) and its parameters, matching what
    L{selectorMatches} matches.
    """
    clauses: list[str] = []
    params: list[Any] = []
    if selector.queueIDs:
        clauses.append(f"{alias}.message_id IN ({', '.join('?' for _ in selector.queueIDs)})")
        params.extend(selector.queueIDs)
    if selector.domain is not None:
        if selector.domain.startswith("@"):
            base = reversedDomain(_normalise(selector.domain[1:]))
            escaped = base.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            clauses.append(f"{alias}.rdomain LIKE ? ESCAPE '\\'")
            params.append(escaped + "%")
        else:
            clauses.append(f"{alias}.domain = ?")
            params.append(_normalise(selector.domain))
    if selector.sender is not None:
        clauses.append("m.sender = ?")
        params.append(_normaliseSender(selector.sender))
    if selector.state is not None:
        clauses.append(f"{alias}.state = ?")
        params.append(selector.state.value)
    if selector.route is not None:
        clauses.append(f"{alias}.route = ?")
        params.append(selector.route)
    return (" AND ".join(clauses) or "1 = 1"), params


def matchingClaim(columns: str, selector: Selector, limit: int) -> tuple[str, list[Any]]:
    """
    The query of L{mailfw.interfaces.ISelectiveClaim.claimMatching}: the
    unaliased C{columns} of up to C{limit} C{recipients} rows in state
    ready or etrn matching C{selector}, whatever their due time, oldest due
    first.  A backend appends its row locking (C{FOR UPDATE SKIP LOCKED}).
    """
    where, params = selectorWhere(selector)
    return (
        f"SELECT {columns} FROM recipients WHERE state IN (?, ?) AND (message_id, idx) IN"
        f" (SELECT r.message_id, r.idx FROM recipients r JOIN messages m ON m.id = r.message_id WHERE {where})"
        " ORDER BY next_attempt_at, message_id, idx LIMIT ?",
        [RecipientState.READY.value, RecipientState.ETRN.value, *params, max(limit, 0)],
    )


# --- envelopes as JSON --------------------------------------------------------


def _address(pair: Sequence[str]) -> Address:
    return Address(pair[0], pair[1])


def recipientToJSON(recipient: Recipient) -> dict[str, Any]:
    return {
        "address": [recipient.address.localpart, recipient.address.domain],
        "notify": sorted(recipient.notify),
        "orcpt": recipient.orcpt,
    }


def recipientFromJSON(data: dict[str, Any]) -> Recipient:
    return Recipient(
        address=_address(data["address"]),
        notify=frozenset(data["notify"]),
        orcpt=data["orcpt"],
    )


def envelopeToJSON(envelope: Envelope) -> str:
    """
    Encode an envelope for the C{messages.envelope} column.  Addresses are
    stored as their (local part, domain) pair, so decoding never re-parses
    (and never refuses) what was once accepted.
    """
    sender = envelope.sender
    return json.dumps(
        {
            "sender": None if sender is None else [sender.localpart, sender.domain],
            "recipients": [recipientToJSON(r) for r in envelope.recipients],
            "ret": envelope.ret,
            "envid": envelope.envid,
            "body": envelope.body,
            "smtputf8": envelope.smtputf8,
            "size": envelope.size,
            "helo": envelope.helo,
            "peerHost": envelope.peerHost,
            "authenticated": envelope.authenticated,
            "arrival": envelope.arrival,
            "requireTLS": envelope.requireTLS,
            "traceparent": envelope.traceparent,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def envelopeFromJSON(text: str) -> Envelope:
    """
    Decode what L{envelopeToJSON} encoded.
    """
    data = json.loads(text)
    sender = data["sender"]
    return Envelope(
        sender=None if sender is None else _address(sender),
        recipients=tuple(recipientFromJSON(r) for r in data["recipients"]),
        ret=data["ret"],
        envid=data["envid"],
        body=data["body"],
        smtputf8=data["smtputf8"],
        size=data["size"],
        helo=data["helo"],
        peerHost=data["peerHost"],
        authenticated=data["authenticated"],
        arrival=data["arrival"],
        requireTLS=data.get("requireTLS", False),
        traceparent=data.get("traceparent", ""),
    )


def notifyText(recipient: Recipient) -> str:
    """
    NOTIFY values as stored in C{recipients.notify}: comma-separated.
    """
    return ",".join(sorted(recipient.notify))


def replyColumns(reply: SMTPReply | None) -> tuple[int | None, str | None, str | None]:
    """
    The C{reply_code}, C{reply_enhanced} and C{reply_text} columns.
    """
    if reply is None:
        return None, None, None
    return reply.code, reply.enhanced, reply.text


def replyFromColumns(code: int | None, enhanced: str | None, text: str | None) -> SMTPReply | None:
    """
    The last reply from its columns, or C{None}.
    """
    if code is None:
        return None
    return SMTPReply(code, enhanced or "", text or "")


def recipientRows(
    queueID: str, envelope: Envelope, now: float, state: RecipientState = RecipientState.READY
) -> Iterable[tuple[Any, ...]]:
    """
    The C{recipients} rows of a new message, for L{INSERT_RECIPIENT}.
    """
    for index, recipient in enumerate(envelope.recipients):
        domain = recipient.address.domain
        yield (
            queueID,
            index,
            str(recipient.address),
            notifyText(recipient),
            recipient.orcpt,
            domain,
            reversedDomain(domain),
            state.value,
            now,
        )


INSERT_MESSAGE = "INSERT INTO messages (id, sender, envelope, size, arrival) VALUES (?, ?, ?, ?, ?)"
INSERT_RECIPIENT = (
    "INSERT INTO recipients (message_id, idx, address, notify, orcpt, domain, rdomain,"
    " state, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_LEASED_RECIPIENT = (
    "INSERT INTO recipients (message_id, idx, address, notify, orcpt, domain, rdomain,"
    " state, next_attempt_at, lease_token, lease_owner, lease_expires)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
"""L{INSERT_RECIPIENT} for a message stored leased
(L{mailfw.interfaces.ILeaseOffers}): each row of L{recipientRows} followed
by the lease token, owner and expiry."""
