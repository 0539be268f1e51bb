"""
The ETRN command (RFC 1985) in the session: its sequence checks and its
log line.  The rights, the rate and the flush are the L{ETRNHandler}'s
(L{mailfw.etrn}), which is free of protocol code.

ETRN is offered when the factory gives an L{ETRNHandler}: after HELO/EHLO
and outside a mail transaction (else 503 5.5.1), the handler checks the
argument, the client's rate and rights (its address, or the authenticated
user's ETRN domains) and records the flush; the reply (250-253, 458, 459,
501) goes out once the queue has recorded it, and the scheduler delivers
over new connections.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mailfw.envelope import Session
from mailfw.etrn import ETRNHandler
from mailfw.reply import SMTPReply
from mailfw.smtp import _replies as R
from mailfw.smtp._pipeline import ReplyPipeline
from mailfw.smtp._replies import Answer
from mailfw.smtp._state import SESSION_LOG_NAMESPACE

__all__ = ["etrnCommand"]

_log = Logger(namespace=SESSION_LOG_NAMESPACE)


def etrnCommand(
    etrn: ETRNHandler | None,
    replies: ReplyPipeline,
    session: Session,
    peer: str,
    avatar: Any,
    inTransaction: bool,
    argument: str,
) -> None:
    """
    Answer C{ETRN argument} through C{replies}: 502 where ETRN is not
    offered, 503 before HELO or inside a transaction, else the handler's
    reply for the client at C{session.peerHost} (and the ETRN domains of
    C{avatar}, the authenticated user, if any).
    """
    if etrn is None:
        replies.respond(R.NOT_IMPLEMENTED)
        return
    if session.helo is None:
        replies.respond(R.NEED_HELO)
        return
    if inTransaction:
        replies.respond(R.ETRN_IN_TRANSACTION)
        return
    userDomains = tuple(avatar.etrnDomains) if avatar is not None else None

    def answered(reply: SMTPReply) -> Answer:
        _log.info("ETRN from {peer}: {code} {enhanced}", peer=peer, code=reply.code, enhanced=reply.enhanced)
        return Answer(reply)

    d = etrn.request(argument, session.peerHost, userDomains)
    replies.respondLater(d.addCallback(answered), cancellable=False)
