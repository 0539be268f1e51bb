"""
The values a queue exchanges with the SMTP server, the scheduler and the
operator tools: leases, dispositions, notices, selectors and the queue
errors.  They sit below L{mailfw.interfaces}, which names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.reply import SMTPReply


class RecipientState(Enum):
    """
    Where one recipient of a queued message stands.  Delivered and failed
    recipients leave the queue, so they have no state here.
    """

    READY = "ready"
    """Waiting for C{next_attempt_at}; due when that time has come."""
    LEASED = "leased"
    """Claimed by a scheduler that is delivering it now."""
    HOLD = "hold"
    """Held by an operator: never attempted until released."""
    ETRN = "etrn"
    """Held until ETRN or an operator flush asks for it (a hold-for-ETRN
    domain); ages and expires like READY."""


@dataclass(frozen=True)
class QueuedRecipient:
    """
    A recipient as the queue stores it.

    @ivar index: the recipient's position in its message; with the queue ID
        it names the recipient in L{Disposition}s.
    @ivar attempts: delivery attempts made so far.
    @ivar warned: a delay notice (DSN C{Action: delayed}) was already sent.
    @ivar released: a flush (ETRN or C{mailfw queue flush}) made it due
        since its last record: the scheduler then delivers it even in a
        hold-for-ETRN domain and ignores what it remembers about the
        destination being unreachable.  Any record clears it.
    @ivar bounceRequested: an operator asked to return it to the sender
        (C{mailfw queue bounce}): the scheduler fails it at once with a
        DSN instead of delivering it.  Records do not clear it: a
        recipient returned to ready without a disposition stays marked.
    """

    index: int
    recipient: Recipient
    state: RecipientState
    attempts: int
    nextAttempt: float
    warned: bool = False
    lastReply: SMTPReply | None = None
    released: bool = False
    bounceRequested: bool = False


@dataclass(frozen=True)
class Lease:
    """
    Recipients of one message claimed by one scheduler.

    Only the holder of C{token} may record outcomes for them, and only
    until C{expires}; after that the queue may hand them to someone else.

    @ivar envelope: the message's envelope with all its original
        recipients (for DSNs); C{recipients} are the claimed ones.
    """

    queueID: str
    envelope: Envelope
    recipients: tuple[QueuedRecipient, ...]
    token: str
    expires: float
    size: int


@dataclass(frozen=True)
class Disposition:
    """
    What the scheduler decided for one claimed recipient.

    @ivar nextAttempt: for a deferred outcome, when to try again; ignored
        for delivered and failed outcomes, which take the recipient out of
        the queue.
    @ivar warned: set when a delay notice goes out with this record.
    @ivar route: the route name (L{mailfw.envelope.Route.name}) the
        recipient took, so that C{ETRN #name} and C{Selector(route=...)}
        find it while it waits.
    @ivar hold: the recipient waits in state L{RecipientState.ETRN} (a
        hold-for-ETRN domain) instead of ready: only a flush or its
        C{nextAttempt} (for housekeeping: the delay notice, the expiry)
        makes it due again.  The outcome's reply is kept as the last reply,
        as for a deferral; C{hold} takes precedence over the outcome's
        class.
    @ivar counted: whether this record counts as a delivery attempt (for a
        deferral or a hold).  A recipient held for ETRN without being tried
        is recorded with C{counted=False}.
    """

    index: int
    outcome: RecipientOutcome
    nextAttempt: float | None = None
    warned: bool = False
    route: str | None = None
    hold: bool = False
    counted: bool = True

    @property
    def keepsRelease(self) -> bool:
        """
        Whether the recipient stays released by an ETRN or a flush: only
        when it is put back untried (an uncounted deferral: traffic
        shaping had no turn for it, its agent was busy), so that the
        client's ETRN still holds when its turn comes.  Any attempt or
        hold clears the mark.
        """
        return not self.counted and not self.hold


@dataclass(frozen=True)
class Notice:
    """
    A message the queue must enqueue in the same transaction as a record:
    a bounce or delay DSN, so that a failure never exists without its
    notice.
    """

    envelope: Envelope
    body: bytes


@dataclass(frozen=True)
class Selector:
    """
    Which queued recipients an operator action or ETRN applies to.  Every
    field that is set must match; an empty selector matches everything.

    @ivar domain: a recipient domain; with a leading C{"@"} the domain and
        all its subdomains (as in C{ETRN @example.com}).
    @ivar route: the route name recorded by the scheduler (C{ETRN #name}).
    """

    queueIDs: tuple[str, ...] = ()
    domain: str | None = None
    sender: str | None = None
    state: RecipientState | None = None
    route: str | None = None


@dataclass(frozen=True)
class QueuedMessage:
    """
    A message as C{mailfw queue list} shows it.
    """

    queueID: str
    envelope: Envelope
    size: int
    recipients: tuple[QueuedRecipient, ...]


class QueueFull(Exception):
    """
    The queue cannot store more now (disk full, quota): the server answers
    452 4.3.1 and the client retries later.
    """


class LeaseLost(Exception):
    """
    A record was refused because its lease expired and another scheduler may
    have claimed the recipients since.
    """
