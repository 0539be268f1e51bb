"""
The replies the SMTP server sends, as values.

Texts are generic on purpose: they never name configuration, plugins or
internal errors (those go to the log).  Enhanced status codes follow RFC 3463
and the registry of RFC 5248; the server sends them only after EHLO
(RFC 2034), so every constant carries one and L{SMTPReply.lines} drops it
when it must.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mailfw.policy._chain import POLICY_FAILED, POLICY_TIMEOUT
from mailfw.reply import SMTPReply

__all__ = [
    "BAD_LINE_ENDING",
    "BAD_SEQUENCE",
    "BARE_LINE_ENDING_COMMAND",
    "BDAT_OK",
    "CLOSING",
    "COMMAND_UNRECOGNIZED",
    "DATA_AFTER_BDAT",
    "ETRN_IN_TRANSACTION",
    "GOODBYE",
    "HELO_SYNTAX",
    "INVALID_COMMAND_CHARACTERS",
    "LINE_TOO_LONG",
    "LOCAL_ERROR",
    "MAIL_OK",
    "MESSAGE_TOO_BIG",
    "NEED_AUTH",
    "NEED_HELO",
    "NEED_MAIL",
    "NEED_RCPT",
    "NESTED_MAIL",
    "NOT_AN_SMTP_CLIENT",
    "NOT_IMPLEMENTED",
    "NO_PARAMETERS",
    "NO_VALID_RECIPIENTS",
    "OK",
    "POLICY_TIMEOUT",
    "QUEUE_FULL",
    "RCPT_OK",
    "STARTTLS_IN_TRANSACTION",
    "START_DATA",
    "SYNCHRONIZATION",
    "TEXT_LINE_TOO_LONG",
    "TIMEOUT",
    "TLS_ACTIVE",
    "TLS_NOT_AVAILABLE",
    "TLS_READY",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_CONNECTIONS_FROM_CLIENT",
    "TOO_MANY_ERRORS",
    "TOO_MANY_HOPS",
    "TOO_MANY_RECIPIENTS",
    "TOO_MANY_TRANSACTIONS",
    "VRFY",
    "Answer",
    "helpReply",
]

# --- positive ---------------------------------------------------------------

OK = SMTPReply(250, "2.0.0", "Ok")
MAIL_OK = SMTPReply(250, "2.1.0", "Ok")
RCPT_OK = SMTPReply(250, "2.1.5", "Ok")
BDAT_OK = SMTPReply(250, "2.0.0", "Ok: chunk received")
START_DATA = SMTPReply(354, "", "End data with <CR><LF>.<CR><LF>")
GOODBYE = SMTPReply(221, "2.0.0", "Bye")
TLS_READY = SMTPReply(220, "2.0.0", "Ready to start TLS")
VRFY = SMTPReply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

# Every listener accepts these; STARTTLS, AUTH and ETRN depend on the
# listener and the session (see helpReply).
_ALWAYS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP")
_OPTIONAL = ("STARTTLS", "AUTH", "ETRN")


def helpReply(extensions: Iterable[str]) -> SMTPReply:
    """
    The reply to HELP: the commands this session would accept now.

    The optional commands follow the EHLO keywords, so that HELP and EHLO
    never disagree: STARTTLS only where TLS is configured and not yet
    active, AUTH only where it is offered (after TLS), ETRN only on
    listeners that offer it.

    @param extensions: the session's EHLO keywords, with their parameters
        (C{"AUTH PLAIN LOGIN"}, C{"SIZE 1000"}), as
        L{SMTPServerProtocol.extensions} returns them.
    """
    offered = {keyword.split(" ", 1)[0].upper() for keyword in extensions}
    commands = _ALWAYS + tuple(c for c in _OPTIONAL if c in offered)
    return SMTPReply(214, "2.0.0", "Commands: " + " ".join(commands))


# --- sequence and syntax ----------------------------------------------------

BAD_SEQUENCE = SMTPReply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = SMTPReply(503, "5.5.1", "Send HELO or EHLO first")
NEED_MAIL = SMTPReply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = SMTPReply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = SMTPReply(503, "5.5.1", "Nested MAIL command")
NO_VALID_RECIPIENTS = SMTPReply(554, "5.5.1", "No valid recipients")
DATA_AFTER_BDAT = SMTPReply(503, "5.5.1", "DATA cannot follow BDAT in one transaction")
ETRN_IN_TRANSACTION = SMTPReply(503, "5.5.1", "ETRN not allowed during a mail transaction")
STARTTLS_IN_TRANSACTION = SMTPReply(503, "5.5.1", "Mail transaction in progress")
TLS_ACTIVE = SMTPReply(503, "5.5.1", "TLS already active")
COMMAND_UNRECOGNIZED = SMTPReply(500, "5.5.2", "Command unrecognized")
NOT_IMPLEMENTED = SMTPReply(502, "5.5.1", "Command not implemented")
LINE_TOO_LONG = SMTPReply(500, "5.5.2", "Line too long")
INVALID_COMMAND_CHARACTERS = SMTPReply(500, "5.5.2", "Invalid characters in command")
BARE_LINE_ENDING_COMMAND = SMTPReply(500, "5.5.2", "Commands must end with CRLF")
NO_PARAMETERS = SMTPReply(501, "5.5.4", "Syntax error: no parameters allowed")
HELO_SYNTAX = SMTPReply(501, "5.5.4", "Syntax: EHLO domain or address literal")
SYNCHRONIZATION = SMTPReply(554, "5.5.0", "SMTP protocol synchronization error")
# Postfix answers a cross-protocol request with 221 2.7.0 and hangs up.
NOT_AN_SMTP_CLIENT = SMTPReply(221, "2.7.0", "Not an SMTP client, closing")

# --- message content (after the real end of data) ---------------------------

BAD_LINE_ENDING = SMTPReply(550, "5.6.0", "Message refused: bare CR or LF; lines must end with CRLF")
MESSAGE_TOO_BIG = SMTPReply(552, "5.3.4", "Message size exceeds fixed limit")
TEXT_LINE_TOO_LONG = SMTPReply(500, "5.5.2", "Message refused: line too long")
TOO_MANY_HOPS = SMTPReply(554, "5.4.6", "Too many Received headers: mail loop?")

# --- limits, timeouts, local trouble -----------------------------------------

TOO_MANY_RECIPIENTS = SMTPReply(452, "4.5.3", "Too many recipients")
TOO_MANY_TRANSACTIONS = SMTPReply(452, "4.5.3", "Too many transactions in this session, start a new one")
TOO_MANY_ERRORS = SMTPReply(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = SMTPReply(421, "4.4.2", "Timeout exceeded, closing connection")
SESSION_TOO_LONG = SMTPReply(421, "4.4.2", "Session time limit exceeded, closing connection")
CLOSING = SMTPReply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_CONNECTIONS = SMTPReply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_CLIENT = SMTPReply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
LOCAL_ERROR = POLICY_FAILED  # the one generic 451: nothing internal is shown
QUEUE_FULL = SMTPReply(452, "4.3.1", "Insufficient system storage, try again later")
TLS_NOT_AVAILABLE = SMTPReply(454, "4.7.0", "TLS not available")
NEED_AUTH = SMTPReply(530, "5.7.0", "Authentication required")


@dataclass(frozen=True)
class Answer:
    """
    What a command gets: a reply, whether to close the connection after it,
    and further text lines for a multi-line reply.
    """

    reply: SMTPReply
    close: bool = False
    more: tuple[str, ...] = ()
    plain: bool = False  # never carry the enhanced status code (RFC 2034)
