"""
The lifecycle of one SMTP connection, in one explicit object instead of
flags on the protocol.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["SESSION_LOG_NAMESPACE", "ConnectionState", "Phase"]

# The session's parts log under the protocol's namespace: log observers and
# operators match one stable name for a session's events.
SESSION_LOG_NAMESPACE = "mailfw.smtp._server.SMTPServerProtocol"


class Phase(Enum):
    """
    Where a connection is in its life.  It only moves forward, except that
    the greeting leads to either C{OPEN} or C{REFUSED}.
    """

    GREETING = "greeting"
    """The connect-stage verdict (and so the greeting) is pending."""
    OPEN = "open"
    """Commands are handled."""
    REFUSED = "refused"
    """The greeting was 554 (RFC 5321 3.1): only QUIT is answered."""
    CLOSING = "closing"
    """Hung up: the replies written so far go out, no input is handled."""
    CLOSED = "closed"
    """The connection is gone."""


class ConnectionState:
    """
    The connection's phase, and the command that waits for earlier replies.

    The parts read C{closing} and C{closed} on every line and every reply,
    so they are kept as attributes beside C{phase} (a property would be a
    call each time); only the methods below change any of the three.

    @ivar phase: the L{Phase}.
    @ivar closing: whether C{phase} is C{CLOSING} or C{CLOSED} (read only).
    @ivar closed: whether C{phase} is C{CLOSED} (read only).
    @ivar stalled: a command line that depends on replies still pending
        (RFC 2920 3.1); it runs once they are all out.
    @ivar draining: set while that held command runs, so that its own
        replies do not start the next one from inside it.
    """

    __slots__ = ("closed", "closing", "draining", "phase", "stalled")

    def __init__(self) -> None:
        self.phase = Phase.GREETING
        self.closing = False
        self.closed = False
        self.stalled: bytes | None = None
        self.draining = False

    def greeted(self, refused: bool) -> None:
        """
        The greeting was decided (C{refused}: it is 554).
        """
        if self.phase is Phase.GREETING:
            self.phase = Phase.REFUSED if refused else Phase.OPEN

    def hangUp(self) -> bool:
        """
        Start closing; C{False} if that had already started.
        """
        if self.closing:
            return False
        self.phase = Phase.CLOSING
        self.closing = True
        return True

    def lost(self) -> None:
        """
        The connection is gone.
        """
        self.phase = Phase.CLOSED
        self.closing = self.closed = True
        self.stalled = None
