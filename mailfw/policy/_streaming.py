"""
What the clients of external filters share: a message streamed to the
filter at the pace it reads (L{BodyStream}, used by the C{rspamd} policy
for the body of an HTTP request and the C{clamav} policy for clamd's
C{INSTREAM}), the watchdog of a filter that stops making progress
(L{StallTimer}), what C{default_action} means (L{defaultVerdict}, for
those two, C{milter} and C{policy-server}), and how the two stream-fed
policies answer when their filter fails (L{FilterPolicy}).

The end-of-data stage hands a check the message in chunks as the client
sends them; L{BodyStream} passes each on to its consumer (the HTTP client,
a transport) while the consumer keeps up, and otherwise keeps it and
answers with a L{Deferred} that asks the session to stop reading from the
client.  So at most about one chunk waits in memory whatever the size of
the message, and a slow filter slows the client instead of filling memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from mailfw.envelope import Session
from mailfw.policy import Policy
from mailfw.reply import SMTPReply
from mailfw.verdict import CONTINUE, Verdict

__all__ = [
    "DEFAULT_ACTIONS",
    "REJECT_REPLY",
    "TEMPFAIL_REPLY",
    "BodyStream",
    "FilterPolicy",
    "StallTimer",
    "defaultVerdict",
]

_T = TypeVar("_T")

DEFAULT_ACTIONS = ("tempfail", "accept", "reject")
TEMPFAIL_REPLY = SMTPReply(451, "4.7.1", "Service unavailable - try again later")
REJECT_REPLY = SMTPReply(550, "5.7.1", "Command rejected")


def defaultVerdict(action: str, tempfail: SMTPReply = TEMPFAIL_REPLY) -> Verdict:
    """
    What a filter that is down or misbehaves means under C{default_action
    = action}: C{tempfail} (C{tempfail}, 451 by default), C{accept} (go
    on without it) or C{reject} (550 5.7.1).
    """
    if action == "accept":
        return CONTINUE
    if action == "reject":
        return Verdict(REJECT_REPLY)
    return Verdict(tempfail)


class FilterPolicy(Policy):
    """
    A policy that hands each message to an external filter: its
    C{default_action} when the filter is down or misbehaves, and the one
    log line that says so.

    @cvar filterKind: the filter's name in log lines (C{"rspamd"}).
    @ivar name: the policy instance's name.
    @ivar description: where the filter is (its URL or address).
    @ivar defaultAction: one of L{DEFAULT_ACTIONS}.
    """

    log = Logger()
    filterKind: ClassVar[str]
    name: str
    description: str
    defaultAction: str

    def default(self) -> Verdict:
        return defaultVerdict(self.defaultAction)

    def failed(self, session: Session, reason: str) -> Verdict:
        """
        The filter failed for one message: one log line, and the default
        action.
        """
        self.log.warn(
            "{kind} {policy} ({filter}) failed for {peer}: {reason}; default action {action}",
            kind=self.filterKind,
            policy=self.name,
            filter=self.description,
            peer=session.peerHost,
            reason=reason,
            action=self.defaultAction,
        )
        return self.default()


class StallTimer:
    """
    Calls C{onStall} when C{seconds} pass without progress: armed while
    the filter owes us something, stopped when it delivers.
    """

    def __init__(self, clock: IReactorTime, seconds: float, onStall: Callable[[], object]) -> None:
        self._clock = clock
        self._seconds = seconds
        self._onStall = onStall
        self._call: IDelayedCall | None = None

    def arm(self) -> None:
        if self._call is None:
            self._call = self._clock.callLater(self._seconds, self._stalled)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def progress(self, result: _T) -> _T:
        """
        A callback: progress was made; passes C{result} on.
        """
        self.stop()
        return result

    def _stalled(self) -> None:
        self._call = None
        self._onStall()


@implementer(IBodyProducer, IPushProducer)
class BodyStream:
    """
    Bytes written by a message check, produced into a consumer that may
    pause it.  It is the L{IBodyProducer} of an HTTP request of unknown
    length (sent chunked) or, registered as a transport's streaming
    producer and started with L{startProducing}, a paced writer to a
    socket.

    @ivar stopped: the consumer gave up (the connection is gone): later
        writes are dropped.
    """

    length = UNKNOWN_LENGTH

    def __init__(self) -> None:
        self._consumer: IConsumer | None = None
        self._pending: list[bytes] = []
        self._paused = False
        self._finished = False
        self._waiters: list[Deferred[None]] = []
        self._done: Deferred[None] | None = None
        self.stopped = False

    @property
    def waiting(self) -> bool:
        """
        Whether a writer is being held back (the consumer is not there yet,
        or paused): a filter that stays so has stopped reading.
        """
        return bool(self._waiters)

    def write(self, data: bytes) -> Deferred[None] | None:
        """
        Queue C{data} for the consumer; a L{Deferred} (that never fails)
        when the writer should wait for it to be taken.
        """
        if self.stopped or self._finished:
            return None
        if data:
            self._pending.append(data)
        self._flush()
        if not self._pending and not self._paused and self._consumer is not None:
            return None
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def finish(self) -> None:
        """
        Nothing more will be written: end the request once the rest is out.
        """
        self._finished = True
        self._flush()

    def stop(self) -> None:
        """
        The check gave up on the filter: drop what is queued and release
        the writers.
        """
        self.stopProducing()

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None or self.stopped:
            return
        while self._pending and not self._paused:
            consumer.write(self._pending.pop(0))
        if self._pending or self._paused:
            return
        self._release()
        if self._finished and self._done is not None and not self._done.called:
            self._done.callback(None)

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # --- IBodyProducer / IPushProducer ---------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred()
        if self.stopped:
            return succeed(None)
        self._flush()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        # The Deferred of startProducing is left unfired, as IBodyProducer
        # asks of a stopped producer.
        self.stopped = True
        self._pending = []
        self._release()
