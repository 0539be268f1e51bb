"""
AUTH (RFC 4954) as the session sees it: the command's sequence checks, the
SASL exchange in progress (L{mailfw.smtp._sasl}) and the user logged in.

AUTH is offered when the factory gives an L{SMTPAuth}, and only inside
TLS: PLAIN and LOGIN send passwords in the clear.  While a SASL exchange
runs, input lines are client responses, not commands (up to 12288 octets
each).  After a successful AUTH the session is C{authenticated} and a
C{relayClient}, and MAIL FROM must be an address the user owns
(L{mailfw.interfaces.IMailUser.maySend}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailfw.auth._scram import ChannelBinding
from mailfw.envelope import Session
from mailfw.reply import SMTPReply
from mailfw.smtp import _auth as A
from mailfw.smtp import _replies as R
from mailfw.smtp._framing import InputFramer
from mailfw.smtp._pipeline import ReplyPipeline
from mailfw.smtp._replies import Answer
from mailfw.smtp._sasl import AuthOutcome, SASLExchange
from mailfw.smtp._settings import SessionSettings
from mailfw.smtp._state import SESSION_LOG_NAMESPACE, ConnectionState

# Not a class attribute: as a descriptor, Logger would name the class.
_log = Logger(namespace=SESSION_LOG_NAMESPACE)

__all__ = ["Login", "LoginOwner"]


class LoginOwner(Protocol):
    """
    What a L{Login} needs from its session: no more than this.
    """

    @property
    def peer(self) -> str:
        """The client, for log events."""

    @property
    def session(self) -> Session:
        """What the server knows about the client now."""

    state: ConnectionState
    """The connection's lifecycle."""

    def loggedIn(self, identity: str) -> None:
        """
        A user authenticated as C{identity}: the session is now
        C{authenticated} and a C{relayClient}.
        """


class Login:
    """
    The AUTH state of one session.

    @ivar avatar: the L{mailfw.interfaces.IMailUser} after a successful
        AUTH, else C{None}.
    @ivar exchange: the L{SASLExchange} waiting for a client response, if
        any: the next input line is that response, not a command (read only).
    @ivar failures: how many exchanges the server decided against (wrong
        credentials, the lockout's refusal, a malformed response; not its
        own temporary failures), for the
        policies at the session's end (C{Session.authFailures}).
    """

    def __init__(
        self, owner: LoginOwner, settings: SessionSettings, replies: ReplyPipeline, framer: InputFramer
    ) -> None:
        self._owner = owner
        self._settings = settings
        self._replies = replies
        self._input = framer
        self.exchange: SASLExchange | None = None
        self._logout: Callable[[], None] | None = None
        self.avatar: Any = None
        self.failures = 0

    def command(self, argument: str, inTransaction: bool, channelBinding: ChannelBinding | None) -> None:
        """
        C{AUTH mechanism [initial-response]}.  The sequence is checked here
        (503); the exchange (L{SASLExchange}) checks the rest in the order
        of RFC 4954 and RFC 3207: syntax (501), mechanism (504), encryption
        (538), then the brute-force lockout (454) once the user is known.
        """
        auth, replies = self._settings.auth, self._replies
        session = self._owner.session
        if auth is None:
            replies.respond(R.NOT_IMPLEMENTED)
        elif session.helo is None:
            replies.respond(R.NEED_HELO)
        elif not session.esmtp:
            replies.respond(A.AUTH_NEED_EHLO)
        elif session.authenticated is not None:
            replies.respond(A.AUTH_ALREADY)
        elif inTransaction:
            replies.respond(A.AUTH_IN_TRANSACTION)
        else:
            exchange = SASLExchange(auth, self._settings.clock, session, self._owner.peer, channelBinding)
            self._step(exchange, exchange.begin(argument))

    def respond(self, line: bytes) -> None:
        """
        One client response inside the exchange.
        """
        exchange = self.exchange
        assert exchange is not None
        self.abandon()
        self._step(exchange, exchange.respond(line))

    def abandon(self) -> None:
        """
        End the exchange without an answer of its own (the session answers).
        """
        self._setExchange(None)

    def lineTooLong(self) -> None:
        """
        A response over the limit ends the exchange.
        """
        if self.exchange is not None:
            self.exchange.dropped("a response over the line limit")
        self.abandon()
        self._replies.respond(A.AUTH_LINE_TOO_LONG)

    def _step(self, exchange: SASLExchange, step: SMTPReply | Deferred[AuthOutcome]) -> None:
        """
        Send the exchange's next reply; while it waits for a response, the
        next input line is that response.
        """
        if isinstance(step, SMTPReply):
            self._setExchange(exchange if exchange.waiting else None)
            self._replies.respond(Answer(step, plain=step.code == 334))
        else:
            self._setExchange(None)
            self._replies.respondLater(step.addCallback(self._authenticated, exchange))

    def _setExchange(self, exchange: SASLExchange | None) -> None:
        """
        Inside a SASL exchange input lines are responses, up to 12288
        octets (RFC 4954 4).
        """
        self.exchange = exchange
        self._input.lineLimit = (
            A.SASL_LINE_LIMIT if exchange is not None else self._settings.limits.maxCommandLine
        )

    def _authenticated(self, outcome: AuthOutcome, exchange: SASLExchange) -> Answer:
        """
        Apply a successful exchange to the session; or, when the exchange
        still waits (a challenge that needed a lookup), take its response.
        """
        if exchange.waiting:
            self._setExchange(exchange)
            return Answer(outcome.reply, plain=True)
        logout = outcome.logout
        if logout is None:
            # The server's own trouble (454 temporary failure) is not the
            # client's failure.
            if outcome.reply != A.AUTH_TEMPORARY:
                self.failures += 1
        else:
            if self._owner.state.closed:
                logout()
            else:
                self.end()
                self.avatar, self._logout = outcome.avatar, logout
                self._owner.loggedIn(outcome.identity)
        return Answer(outcome.reply)

    def end(self) -> None:
        """
        Forget the authenticated user and any exchange (the connection
        ends, or TLS starts).
        """
        if self.exchange is not None:
            self.exchange.dropped("the connection ended")
        self.exchange = None
        logout, self._logout = self._logout, None
        self.avatar = None
        if logout is not None:
            try:
                logout()
            except Exception:
                _log.failure("avatar logout failed for {peer}", peer=self._owner.peer)
