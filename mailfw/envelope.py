"""
The values that pass between the protocol, the queue, the router and the
delivery agents.  All are frozen: a stage that changes something makes a
new value with L{dataclasses.replace}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from mailfw.address import Address
from mailfw.reply import SMTPReply

__all__ = [
    "Envelope",
    "Recipient",
    "RecipientOutcome",
    "Route",
    "RouteKind",
    "Session",
]


@dataclass(frozen=True, slots=True)
class Session:
    """
    What the server knows about the client at the time of a check.

    @ivar listener: which factory accepted the connection: C{"smtp"},
        C{"submission"} or C{"submissions"}.
    @ivar peerHost: the client's IP address as text (after PROXY protocol,
        if any).
    @ivar helo: the EHLO/HELO argument, or C{None} before it.
    @ivar tls: whether the session is encrypted.
    @ivar authenticated: the authenticated identity, or C{None}.
    @ivar relayClient: the client may relay to any domain (a permitted
        network or an authenticated user).
    @ivar id: names the connection among all of this process's, for a
        policy that keeps state per session (a milter connection) and for
        log events; forgotten at L{mailfw.interfaces.IPolicy.sessionEnded}.
    @ivar stressed: the listener was in stress mode when the connection
        began (L{mailfw.smtp.SMTPLimits.stressThreshold}): the session has
        the shorter stress timeouts, and a policy may tighten its own limits.
    @ivar errors: error replies (5xx) sent so far; set only at
        L{mailfw.interfaces.IPolicy.sessionEnded}, so that a policy can
        count a client's errors across its sessions.
    @ivar authFailures: AUTH exchanges that failed (wrong credentials, a
        lockout's refusal, a malformed response); set, like C{errors}, only
        at C{sessionEnded}.
    """

    listener: str
    peerHost: str
    peerPort: int = 0
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    authenticated: str | None = None
    relayClient: bool = False
    id: str = ""
    stressed: bool = False
    errors: int = 0
    authFailures: int = 0


@dataclass(frozen=True)
class Recipient:
    """
    One forward-path with its RFC 3461 DSN parameters.

    @ivar notify: the NOTIFY values (C{"SUCCESS"}, C{"FAILURE"},
        C{"DELAY"} or C{"NEVER"}); empty when the client gave none, which
        means failures and delays are reported.
    @ivar orcpt: ORCPT as C{"addr-type;address"} with xtext decoded, or
        C{None}.
    """

    address: Address
    notify: frozenset[str] = frozenset()
    orcpt: str | None = None

    def wantsNotice(self, kind: str) -> bool:
        """
        Whether the sender asked for a DSN of C{kind} (C{"SUCCESS"},
        C{"FAILURE"} or C{"DELAY"}) for this recipient.
        """
        if not self.notify:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify


@dataclass(frozen=True)
class Envelope:
    """
    The SMTP envelope of one message.

    @ivar sender: the reverse-path, or C{None} for the null path C{<>}
        (bounces: never answered with a bounce).
    @ivar recipients: in the order the client gave them.
    @ivar ret: RFC 3461 RET (C{"FULL"} or C{"HDRS"}), or C{None}.
    @ivar envid: RFC 3461 ENVID, xtext decoded, or C{None}.
    @ivar body: the BODY parameter (C{"7BIT"}, C{"8BITMIME"} or
        C{"BINARYMIME"}), or C{None}.
    @ivar arrival: POSIX time the message was accepted.
    @ivar queueID: the queue's ID for the message once it is queued (for
        log events); empty before.
    @ivar requireTLS: the sender asked for REQUIRETLS (RFC 8689): the
        message leaves only over verified TLS to hosts that offer it too.
    @ivar traceparent: the W3C C{traceparent} of the span this message's
        work belongs to (L{mailfw.tracing}), stored with the message so
        that a retry days later joins the same trace; empty when tracing
        was off.
    """

    sender: Address | None
    recipients: tuple[Recipient, ...] = ()
    ret: str | None = None
    envid: str | None = None
    body: str | None = None
    smtputf8: bool = False
    size: int | None = None
    helo: str = ""
    peerHost: str = ""
    authenticated: str | None = None
    arrival: float = 0.0
    queueID: str = ""
    requireTLS: bool = False
    traceparent: str = ""

    @property
    def senderText(self) -> str:
        """
        The reverse-path as text for logs and headers: C{""} for C{<>}.
        """
        return "" if self.sender is None else str(self.sender)


class RouteKind(Enum):
    """
    What the router decided for a recipient.
    """

    LOCAL = "local"
    """A domain this server is final destination for."""
    RELAY = "relay"
    """Accepted for delivery elsewhere (a relay domain or a relay client)."""
    REFUSE = "refuse"
    """Not accepted: L{Route.reply} says why."""


@dataclass(frozen=True)
class Route:
    """
    Where one recipient goes.

    @ivar agent: the delivery instance name from the configuration
        (C{[delivery.NAME]}).
    @ivar nexthop: C{None} to let the agent decide (a local mailbox), a
        domain whose MX records are looked up, or C{"[host]:port"} for a
        fixed host.
    @ivar reply: for L{RouteKind.REFUSE}, the reply to give (5xx or 4xx).
    @ivar name: a name for C{ETRN #name} and the logs; the agent name
        unless the transport table says otherwise.
    """

    kind: RouteKind
    agent: str = ""
    nexthop: str | None = None
    reply: SMTPReply | None = None
    name: str = ""

    @classmethod
    def refuse(cls, reply: SMTPReply) -> Route:
        return cls(RouteKind.REFUSE, reply=reply)


@dataclass(frozen=True)
class RecipientOutcome:
    """
    The result of one delivery attempt for one recipient.

    A 2xx reply means delivered, 4xx deferred (retry later), 5xx failed
    (bounce).

    @ivar remoteMTA: the host that gave C{reply}, when one did.
    """

    recipient: Recipient
    reply: SMTPReply
    remoteMTA: str | None = field(default=None)

    @property
    def delivered(self) -> bool:
        return self.reply.code < 400

    @property
    def deferred(self) -> bool:
        return self.reply.isTransient

    @property
    def failed(self) -> bool:
        return self.reply.isPermanent
