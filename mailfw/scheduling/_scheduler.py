"""
The scheduler: takes due recipients from the queue, routes them, hands
them to delivery agents, and records what happened.

One round
=========

  1. C{queue.claim(now, room)} leases due recipients, grouped by message.
  2. Each recipient is routed again (C{router.route(address, None)}): the
     configuration may have changed since RCPT time.
  3. Recipients of one message are grouped by (agent, next hop), so that one
     SMTP transaction (or one mailbox write) carries them all.
  4. Each group waits for a delivery slot (see I{Limits}), then the agent
     delivers it.
  5. Each recipient gets a L{Disposition}: delivered; failed (5xx, or
     deferred past the queue lifetime) with a bounce; or deferred until the
     schedule's next attempt, with a delay notice once after the warning
     time.  Everything for the message is recorded in one
     C{queue.record}, notices included, so a failure never exists without
     its bounce.

Then it sleeps until C{queue.nextDue()} or until the queue calls the
C{notifyDue} callback (new mail, flush, release); notifications arriving
together are coalesced into one claim.  There is no polling loop.

A queue that provides L{ILeaseOffers} skips step 1 for new mail: while the
scheduler has room, a new message is stored already leased to it and
handed over after its commit (on the next reactor turn, so the client has
its 250 first), which saves a write transaction per message.

Limits
======

At most C{maxConcurrent} deliveries run at once, at most an agent's own
limit through one delivery agent instance, and at most a destination's
window to one (agent, next hop).  The window starts at C{perDestination},
grows by one after as many successful deliveries as the window is wide (up
to C{maxPerDestination}), and shrinks by one on a connection failure
(Postfix's feedback, simplified).  The scheduler leases at most
C{claimAhead} recipients beyond those it has finished, so a large queue is
not leased all at once.

The agent limit is Postfix's per-transport process limit: an agent stuck on
its next hops (C{smtp-relay} waiting for a dead resolver) can fill only its
own share, so local delivery goes on.  By default each agent may take four
fifths of C{maxConcurrent} (L{defaultPerAgent}): one stuck agent always
leaves a fifth to the others, and a host with one busy agent loses little.
An agent's slots are counted in one place, L{_AgentSlots}; the total
(L{Scheduler.deliveries}) is their sum.

Recipients whose group waits for a slot do not count against
C{claimAhead}, so leases parked behind a stuck agent never stop the
scheduler from claiming (and being offered) mail for the others.  They are
bounded per agent instead: when C{AGENT_AHEAD} times the agent's limit are
already waiting, a further group goes back to the queue uncounted, due
C{BUSY_RETRY} seconds later (like a paced destination's, see I{Traffic
shaping}), and claims pause for C{BUSY_PAUSE} so that walking a deep queue
behind a busy agent costs at most one claim a second.

Traffic shaping
===============

Destinations configured in C{[scheduler.destinations]} are shaped beside
the window: a group's recipients are split to the destination's
recipients per message, and each piece waits for its turn in the
destination's pace, in memory when it is near, else in the queue
(recorded uncounted, without a delay notice, due at its turn).  See
L{mailfw.scheduling._shaping}.

Unreachable destinations
========================

When every outcome of a group is a transient I{connection-level} failure
(enhanced status X.4.1 no answer, X.4.2 bad connection, X.4.3 routing
server failure: the agent could not reach the next hop at all), the
destination is marked dead for C{deadTime} seconds (one minute).
Recipients routed there meanwhile are deferred at once with that reply,
without calling the agent.  The attempt is counted like a real one (Postfix
does the same), so their next attempt follows the normal backoff.

Hold for ETRN
=============

Recipients in a hold-for-ETRN domain (C{holdForETRN}, from C{[etrn] hold})
are queued ready like any other, but when the scheduler claims one that no
flush released, it routes it (so that C{ETRN #name} finds it by its route
name) and records it held: state C{etrn}, no attempt counted, due again
only at its next I{housekeeping} time: the delay-warning time if no notice
went out yet, else the expiry time.  Then it sends the delay notice once,
or bounces it with C{4.4.7} at the end of the queue lifetime, exactly as
for mail that is retried.  ETRN (or C{mailfw queue flush}) releases it:
the queue marks it released and due now, and the scheduler then delivers
it normally; deferred again, it is held again rather than retried on the
backoff schedule, until the next ETRN.

A released recipient also makes the scheduler forget that its destination
was unreachable (C{deadUntil}), whatever its domain: RFC 1985 asks for an
attempt now, and the customer's server has just said it is online.  (This
is why there is no separate C{forgetFailures(domain)}: the destination is
known only after routing, and the released mark says exactly which
deliveries ETRN asked for.)

Operator bounces
================

C{mailfw queue bounce} marks recipients C{bounceRequested} and makes them
due now.  The scheduler fails such a recipient as soon as it claims it,
before routing, with C{554 5.0.0 Message returned by the mail system
administrator}, and sends the failure DSN like for any permanent failure
(NOTIFY and the null sender rule apply).  A lease holding only such
recipients never opens the body, unless the DSN returns it.

Choices
=======

  - Expiry: a recipient still deferred C{maxLifetime} after arrival fails
    with C{554 4.4.7}; its bounce says C{Status: 4.4.7} and carries the
    last real reply as the diagnostic.  The last attempt is made exactly at
    the expiry time.
  - Delay notices: the first deferral after the warning time marks the
    recipient warned, whether a notice went out or was suppressed (NOTIFY
    without DELAY, or the null sender), so the decision is made once.
  - Success notices are sent only for recipients that asked with
    NOTIFY=SUCCESS and were delivered through a L{RouteKind.LOCAL} route
    (C{Action: delivered}); relaying agents pass NOTIFY on to the next
    server instead.
  - Start-up: with C{exclusive} (the default, right for SQLite and memory
    queues used by one process) every lease left in the queue belongs to a
    process that died, and C{recover(inf)} returns them all at once.  Nodes
    sharing a queue pass C{exclusive=False}: then only expired leases are
    recovered, and claims take over expired leases as they come due.
  - An agent that does not answer within C{leaseSeconds} is treated like a
    failing agent (451 4.4.1); keep the queue's lease longer than that.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet import error as _error
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw import tracing
from mailfw.address import Address
from mailfw.config import ConfigError, Section
from mailfw.envelope import RecipientOutcome, Route, RouteKind
from mailfw.interfaces import (
    IConnectionShaping,
    IDeliveryAgent,
    IDestinationSlots,
    ILeaseOffers,
    ILeaseStore,
    IMessageBody,
    IRouter,
)
from mailfw.queued import Disposition, Lease, LeaseLost, Notice, QueuedRecipient
from mailfw.reply import SMTPReply
from mailfw.routing._mx import MXResolver, Resolution
from mailfw.scheduling._dsn import NoticeWriter, RecipientReport, readReturned
from mailfw.scheduling._retry import RetrySchedule
from mailfw.scheduling._shaping import (
    ConnectionGate,
    HostLookup,
    Pace,
    Shape,
    ShapingTable,
    shapingFromConfig,
)

__all__ = ["Scheduler", "defaultPerAgent", "schedulerFromConfig"]

_T = TypeVar("_T")

CONNECTION_FAILURES = frozenset({"4.4.1", "4.4.2", "4.4.3"})
"""Enhanced status codes by which agents say they could not reach the next
hop at all."""

AGENT_FAILED = SMTPReply(451, "4.3.0", "local error in delivery; will retry")
AGENT_TIMEOUT = SMTPReply(451, "4.4.1", "delivery timed out; will retry")
SHARED_SLOT_TRIES = 30
# Recording outcomes that failed (not a lost lease) is retried this often,
# this many seconds apart.
RECORD_TRIES = 20
RECORD_RETRY = 30.0
CLUSTER_BUSY = SMTPReply(451, "4.4.5", "destination busy on other nodes; will retry")
ROUTE_FAILED = SMTPReply(451, "4.3.0", "routing error; will retry")
UNKNOWN_AGENT = SMTPReply(451, "4.3.5", "delivery configuration error; will retry")
EXPIRED = SMTPReply(554, "4.4.7", "delivery time expired")
BOUNCED = SMTPReply(554, "5.0.0", "Message returned by the mail system administrator")
"""The failure of a recipient an operator returned (C{mailfw queue bounce})."""
THROTTLED = SMTPReply(451, "4.4.5", "waiting for the destination's rate limit")
"""The last reply of a recipient put back by traffic shaping before it was
ever tried."""
AGENT_BUSY = SMTPReply(451, "4.4.5", "delivery agent busy; will retry")
"""The last reply of a recipient put back, never tried, because too many
others already wait for its delivery agent."""
AGENT_AHEAD = 4
"""How many recipients per slot of its limit may wait for an agent."""
BUSY_RETRY = 30.0
"""How long a recipient put back for a busy agent waits in the queue."""
BUSY_PAUSE = 1.0
"""How long claims pause after a recipient was put back for a busy agent."""
HELD = SMTPReply(450, "4.4.0", "held until the destination asks with ETRN")
"""The last reply of a held-for-ETRN recipient that was never tried: what
C{mailfw queue list} and a delay notice show."""


def defaultPerAgent(maxConcurrent: int) -> int:
    """
    An agent's concurrency limit when none is configured: four fifths of
    C{maxConcurrent}, leaving at least one slot to the other agents (none
    when C{maxConcurrent} is 1).
    """
    return max(1, maxConcurrent - max(1, maxConcurrent // 5))


@dataclass
class _AgentSlots:
    """
    One delivery agent instance's share of the deliveries (Postfix's
    per-transport process limit).

    @ivar limit: how many of its deliveries may run at once.
    @ivar active: how many run now.
    @ivar waiting: how many recipients wait for a slot of it (see
        I{Limits} in the module docstring).
    """

    limit: int
    active: int = 0
    waiting: int = 0


@dataclass
class _Destination:
    """
    What the scheduler remembers about one (agent, next hop).
    """

    window: int
    slots: _AgentSlots
    active: int = 0
    successes: int = 0
    deadUntil: float = 0.0
    deadReply: SMTPReply | None = None
    waiters: deque[Deferred[None]] = field(default_factory=deque)


@dataclass
class _Decided:
    dispositions: list[Disposition] = field(default_factory=list)
    failed: list[RecipientReport] = field(default_factory=list)
    delayed: list[RecipientReport] = field(default_factory=list)
    delivered: list[RecipientReport] = field(default_factory=list)


def _inline(function: Callable[..., _T], *args: Any) -> Deferred[_T]:
    return maybeDeferred(function, *args)


class Scheduler(Service):
    """
    Delivers due mail from a queue's L{ILeaseStore}; see the module docstring.
    Its service name is C{"scheduler"}.

    @ivar agents: the delivery agents by instance name.
    @ivar lastClaimed: when a claim from the queue last succeeded (C{None}
        before the first): C{/healthz} fails when mail is overdue and this
        is older than a minute.
    """

    log = Logger()
    name = "scheduler"

    def __init__(
        self,
        clock: IReactorTime,
        queue: ILeaseStore,
        router: IRouter,
        agents: Mapping[str, IDeliveryAgent],
        hostname: str,
        schedule: RetrySchedule = RetrySchedule(),
        maxConcurrent: int = 50,
        perDestination: int = 5,
        leaseSeconds: float = 3600.0,
        *,
        maxPerDestination: int = 20,
        deadTime: float = 60.0,
        claimAhead: int | None = None,
        exclusive: bool = True,
        stopTimeout: float = 30.0,
        notices: NoticeWriter | None = None,
        runInThread: Callable[..., Deferred[Any]] | None = None,
        holdForETRN: Callable[[Address], bool] = lambda address: False,
        shaping: ShapingTable | None = None,
        maxPerAgent: int | None = None,
        agentLimits: Mapping[str, int] | None = None,
    ) -> None:
        """
        @param agents: delivery agents by instance name (L{Route.agent}).
        @param hostname: this host's name, for the DSN C{Reporting-MTA}.
        @param claimAhead: how many recipients may be leased and not yet
            recorded (default: four times C{maxConcurrent}).
        @param runInThread: C{runInThread(f, *args)} runs blocking work (reading
            a body for a bounce) off the reactor thread; by default in the
            reactor's thread pool when C{clock} is a reactor, else inline
            (tests).
        @param holdForETRN: whether a recipient is in a hold-for-ETRN
            domain (see I{Hold for ETRN} in the module docstring).
        @param shaping: the destinations with traffic shaping (see
            L{mailfw.scheduling._shaping}).
        @param maxPerAgent: how many deliveries one agent instance may run
            at once (default: L{defaultPerAgent}C{(maxConcurrent)}).
        @param agentLimits: the limits of particular agents, by instance
            name, instead of C{maxPerAgent}.
        """
        self._clock = clock
        self._queue = queue
        self._router = router
        self.agents = self._agents = agents
        self._schedule = schedule
        self.maxConcurrent = maxConcurrent
        self.maxPerAgent = maxPerAgent if maxPerAgent is not None else defaultPerAgent(maxConcurrent)
        self._agentLimits = dict(agentLimits or {})
        self.perDestination = perDestination
        self.maxPerDestination = max(maxPerDestination, perDestination)
        self.leaseSeconds = leaseSeconds
        self.deadTime = deadTime
        self._claimAhead = claimAhead if claimAhead is not None else 4 * maxConcurrent
        self._exclusive = exclusive
        self._stopTimeout = stopTimeout
        self._notices = notices or NoticeWriter(hostname)
        if runInThread is None:
            if IReactorThreads.providedBy(clock):
                reactor = IReactorThreads(clock)

                def runInThread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
                    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

            else:
                runInThread = _inline
        self._runInThread: Callable[..., Deferred[Any]] = runInThread
        self._holdForETRN = holdForETRN
        self._shaping = shaping
        if shaping is not None and shaping.limitsConnections:
            gate = ConnectionGate(clock, shaping)
            for agent in agents.values():
                if IConnectionShaping.providedBy(agent):
                    IConnectionShaping(agent).shapeConnections(gate)
        self._destinations: dict[tuple[str, str | None], _Destination] = {}
        self._agentSlots: dict[str, _AgentSlots] = {}
        self._busyUntil = 0.0
        self.lastClaimed: float | None = None
        self._outstanding = 0
        self._backlog = False
        self._claiming = False
        self._claimRoom = 0
        self._accepting = False
        self._pumping = False
        self._wanted = False
        self._dispatching = False
        self._timer: IDelayedCall | None = None
        self._soon: IDelayedCall | None = None
        self._leases: set[Deferred[None]] = set()
        self._offered: list[Lease] = []
        self._offeredCall: IDelayedCall | None = None
        queue.notifyDue(self._notified)
        if ILeaseOffers.providedBy(queue):
            ILeaseOffers(queue).offerNew(self._room, self._take)

    @property
    def deliveries(self) -> int:
        """
        How many agent deliveries run now, all agents together.
        """
        return sum(slots.active for slots in self._agentSlots.values())

    def agentLimit(self, agent: str) -> int:
        """
        How many deliveries the agent instance named C{agent} may run at once.
        """
        return self._agentLimits.get(agent, self.maxPerAgent)

    def useRouting(
        self,
        router: IRouter,
        agents: Mapping[str, IDeliveryAgent],
        holdForETRN: Callable[[Address], bool],
    ) -> None:
        """
        A configuration reload: recipients claimed from now on are routed
        by C{router} and delivered by C{agents}; deliveries under way
        finish with the agents they have.
        """
        self._router = router
        self.agents = self._agents = agents
        self._holdForETRN = holdForETRN

    # --- the service ----------------------------------------------------------

    def startService(self) -> None:
        """
        Recover the leases a previous process left, then start delivering.
        """
        super().startService()
        d = self._queue.recover(math.inf if self._exclusive else self._clock.seconds())

        def recovered(count: int) -> None:
            if count:
                self.log.info("recovered {count} recipients from an earlier run", count=count)

        def start(_: object) -> None:
            # Only now: a lease handed over before recovery may have just
            # been returned to ready by it (see _take).
            self._accepting = bool(self.running)
            self._wake()

        d.addCallback(recovered)
        d.addErrback(lambda f: self.log.failure("recovering the queue failed", f))
        d.addBoth(start)

    def stopService(self) -> Deferred[None]:
        """
        Stop claiming, and wait (at most C{stopTimeout} seconds) for the
        deliveries under way to be recorded.  Deliveries still running then
        keep their leases, which the next start recovers.
        """
        super().stopService()
        for call in (self._timer, self._soon, self._offeredCall):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = self._offeredCall = None
        # Offered leases not started yet are recovered at the next start.
        self._accepting = False
        for lease in self._offered:
            self._outstanding -= len(lease.recipients)
        self._offered = []
        if not self._leases:
            return succeed(None)
        done: Deferred[None] = Deferred()
        waiting = DeferredList(list(self._leases), consumeErrors=True)
        timeout = self._clock.callLater(self._stopTimeout, lambda: done.callback(None))

        def finished(_: object) -> None:
            if timeout.active():
                timeout.cancel()
                done.callback(None)

        waiting.addCallback(finished)
        return done

    # --- when to claim -----------------------------------------------------------

    def _notified(self) -> None:
        # Coalesce the queue's notifications (one per enqueue) into one
        # claim per reactor turn.
        if self.running and self._soon is None:
            self._soon = self._clock.callLater(0, self._soonFired)

    def _soonFired(self) -> None:
        self._soon = None
        self._wake()

    def _room(self) -> int:
        """
        How many more recipients the queue may hand over already leased
        (see L{ILeaseOffers}): the claim-ahead limit less what is leased,
        handed over or being claimed.
        """
        if not self._accepting:
            return 0
        return self._claimAhead - self._ahead() - self._claimRoom

    def _ahead(self) -> int:
        """
        How many leased recipients count against C{claimAhead}: all those
        not yet recorded but the ones waiting for a delivery slot (see
        I{Limits}).
        """
        return self._outstanding - sum(slots.waiting for slots in self._agentSlots.values())

    def _take(self, lease: Lease) -> None:
        """
        A new message, stored leased to us: start it on the next reactor
        turn, with the others of this turn (the client gets its 250 first).

        Not while stopped, nor after a restart before its recovery is done:
        that recovery may have returned this very lease to ready, to be
        claimed again (the SQLite queue hands leases over in commit order,
        so a lease handed over after the recovery finished is still valid;
        a restart within one process is for tests and embedding, a new
        process has no commits of the old one in flight).  Either way the
        recipients stay in the queue: a later recovery or claim finds them.
        """
        if not self._accepting:
            return
        self._outstanding += len(lease.recipients)
        self._offered.append(lease)
        if self._offeredCall is None:
            self._offeredCall = self._clock.callLater(0, self._startOffered)

    def _startOffered(self) -> None:
        self._offeredCall = None
        offered, self._offered = self._offered, []
        for lease in offered:
            self._begin(lease)

    def _wakeBy(self, when: float) -> None:
        """
        Make sure the scheduler wakes by C{when}: a deferral just recorded
        may be due before the timer set from the queue's earlier answer.
        """
        if self._timer is not None and self._timer.active() and self._timer.getTime() <= when:
            return
        self._setTimer(max(0.0, when - self._clock.seconds()))

    def _timerFired(self) -> None:
        self._timer = None
        self._wake()

    def _wake(self) -> None:
        """
        Claim now if possible; safe to call from anywhere, also from within
        a claim's callbacks (it loops instead of recursing).
        """
        if not self.running:
            return
        self._wanted = True
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._wanted:
                self._wanted = False
                self._claim()
        finally:
            self._pumping = False

    def _claim(self) -> None:
        if self._claiming or not self.running:
            return
        room = self._claimAhead - self._ahead()
        if room <= 0:
            self._backlog = True
            return
        if self._clock.seconds() < self._busyUntil:
            # Groups were just put back for a busy agent: walk on slowly.
            self._backlog = True
            self._wakeBy(self._busyUntil)
            return
        self._claiming = True
        self._claimRoom = room
        d = self._queue.claim(self._clock.seconds(), room)
        d.addCallbacks(self._claimed, self._claimFailed, callbackArgs=(room,))

    def _claimed(self, leases: Sequence[Lease], room: int) -> None:
        self._claiming = False
        self.lastClaimed = self._clock.seconds()
        self._claimRoom = 0
        count = sum(len(lease.recipients) for lease in leases)
        self._backlog = count >= room
        for lease in leases:
            self._outstanding += len(lease.recipients)
            self._begin(lease)
        if self._backlog:
            self._wake()
        else:
            self._sleep()

    def _claimFailed(self, failure: Failure) -> None:
        self._claiming = False
        self._claimRoom = 0
        self.log.failure("claiming from the queue failed; retrying in 10 seconds", failure)
        self._setTimer(10.0)

    def _sleep(self) -> None:
        def due(when: float | None) -> None:
            if when is None:
                return
            now = self._clock.seconds()
            self._setTimer(when - now if when > now else 1.0)

        d = self._queue.nextDue()
        d.addCallback(due)
        d.addErrback(self._claimFailed)

    def _setTimer(self, delay: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._timerFired)

    # --- one lease -----------------------------------------------------------------

    def _begin(self, lease: Lease) -> None:
        """
        Deliver C{lease}, whose recipients L{_outstanding} already counts.
        """
        d = Deferred.fromCoroutine(self._handle(lease))
        self._leases.add(d)

        def finished(result: object) -> None:
            self._leases.discard(d)
            self._outstanding -= len(lease.recipients)
            if isinstance(result, Failure):
                self.log.failure("delivering {queueID} failed", result, queueID=lease.queueID)
            if self._backlog:
                self._wake()

        d.addBoth(finished)

    async def _handle(self, lease: Lease) -> None:
        now = self._clock.seconds()
        decided = _Decided()
        toRoute: list[QueuedRecipient] = []
        for qr in lease.recipients:
            if qr.bounceRequested:
                # An operator returned it: fail it now, without routing or
                # delivering (nor opening the body unless its DSN needs it).
                self._decide(lease, qr, None, RecipientOutcome(qr.recipient, BOUNCED), now, decided)
            else:
                toRoute.append(qr)
        routed = await _settle(
            [maybeDeferred(self._router.route, r.recipient.address, None) for r in toRoute]
        )
        deliverable: list[tuple[QueuedRecipient, Route]] = []
        for qr, (ok, result) in zip(toRoute, routed, strict=False):
            if not ok:
                self.log.failure(
                    "routing {recipient} of {queueID} failed",
                    cast(Failure, result),
                    recipient=str(qr.recipient.address),
                    queueID=lease.queueID,
                )
                self._decide(lease, qr, None, RecipientOutcome(qr.recipient, ROUTE_FAILED), now, decided)
            elif result.kind is RouteKind.REFUSE:
                reply = result.reply or SMTPReply(550, "5.1.1", "recipient refused")
                self._decide(lease, qr, result, RecipientOutcome(qr.recipient, reply), now, decided)
            elif result.agent not in self._agents:
                self.log.error(
                    "{recipient} of {queueID} routed to unknown delivery agent {agent}",
                    recipient=str(qr.recipient.address),
                    queueID=lease.queueID,
                    agent=result.agent,
                )
                self._decide(lease, qr, result, RecipientOutcome(qr.recipient, UNKNOWN_AGENT), now, decided)
            elif not qr.released and self._holdForETRN(qr.recipient.address):
                self._hold(lease, qr, result, now, decided)
            else:
                deliverable.append((qr, result))
        groups = await self._group(deliverable)
        body: IMessageBody | None = None
        if groups:
            try:
                body = await self._queue.openBody(lease.queueID)
            except KeyError:
                self.log.info("{queueID} left the queue before delivery", queueID=lease.queueID)
                return
            except Exception:
                self.log.failure("opening {queueID} failed", queueID=lease.queueID)
                for members in groups.values():
                    for qr, route in members:
                        outcome = RecipientOutcome(qr.recipient, AGENT_FAILED)
                        self._decide(lease, qr, route, outcome, now, decided)
                groups = {}
        if groups:
            assert body is not None
            throttled: dict[int, tuple[float, SMTPReply]] = {}
            results = await _settle(
                [
                    Deferred.fromCoroutine(
                        self._deliverGroup(lease, (agent, nexthop), members, body, shape, throttled)
                    )
                    for (agent, nexthop, shape), members in groups.items()
                ]
            )
            finished = self._clock.seconds()
            for ok, outcomes in results:
                if not ok:
                    outcomes.raiseException()
                for qr, route, outcome in outcomes:
                    if qr.index in throttled:
                        until, placeholder = throttled[qr.index]
                        self._throttled(lease, qr, route, until, placeholder, finished, decided)
                    else:
                        self._decide(lease, qr, route, outcome, finished, decided)
        try:
            notices = await self._makeNotices(lease, body, decided)
        except Exception:
            # The outcomes must still be recorded: a notice that cannot be
            # built must not hold every recipient of the message hostage.
            self.log.failure(
                "could not build the delivery notices for {queueID}; recording without them",
                queueID=lease.queueID,
            )
            notices = []
        for _attempt in range(RECORD_TRIES):
            try:
                await self._queue.record(lease, decided.dispositions, notices)
            except LeaseLost:
                self.log.warn(
                    "lease on {queueID} was lost before its outcomes were recorded; "
                    "it will be delivered again",
                    queueID=lease.queueID,
                )
                return
            except Exception:
                # A full disk, a lost database connection: the outcomes are
                # known, so keep trying (within the lease) rather than
                # deliver again.
                self.log.failure(
                    "could not record the outcomes of {queueID}; retrying in {delay}s",
                    queueID=lease.queueID,
                    delay=RECORD_RETRY,
                )
                if not self.running:
                    return
                await task.deferLater(self._clock, RECORD_RETRY)
                continue
            retries = [
                d.nextAttempt
                for d in decided.dispositions
                if d.nextAttempt is not None and d.outcome.deferred
            ]
            if retries:
                self._wakeBy(min(retries))
            return
        self.log.error(
            "gave up recording the outcomes of {queueID}; its recipients are"
            " delivered again when the lease expires",
            queueID=lease.queueID,
        )

    def settle(self, lease: Lease, outcomes: Sequence[RecipientOutcome]) -> Deferred[None]:
        """
        Record outcomes of C{lease} that were decided elsewhere (ODMR
        delivers over the customer's own connection) exactly as a
        delivery's: a deferral waits again (held for ETRN or ATRN in such
        a domain) or expires, a failure bounces, with the same notices.
        C{outcomes} are in the order of C{lease.recipients}.
        """

        async def settle() -> None:
            now = self._clock.seconds()
            decided = _Decided()
            for qr, outcome in zip(lease.recipients, outcomes, strict=True):
                self._decide(lease, qr, None, outcome, now, decided)
            notices = await self._makeNotices(lease, None, decided)
            await self._queue.record(lease, decided.dispositions, notices)

        return Deferred.fromCoroutine(settle())

    async def _group(
        self, deliverable: list[tuple[QueuedRecipient, Route]]
    ) -> dict[tuple[str, str | None, Shape | None], list[tuple[QueuedRecipient, Route]]]:
        """
        Group routed recipients by (agent, next hop) and, with traffic
        shaping, by the destination section that applies to each.
        """
        shapes: dict[tuple[str, str | None, bool], Shape | None] = {}
        if self._shaping is not None:
            # Mail hosts matter only where mail leaves over the network:
            # not for a local mailbox (no next hop).
            wanted = list(
                {(qr.recipient.address.domain, route.nexthop, _leaves(route)) for qr, route in deliverable}
            )
            found = await _settle([self._shaping.shapeFor(*where) for where in wanted])
            for where, (ok, shape) in zip(wanted, found, strict=True):
                shapes[where] = shape if ok else None
        groups: dict[tuple[str, str | None, Shape | None], list[tuple[QueuedRecipient, Route]]] = {}
        for qr, route in deliverable:
            shape = shapes.get((qr.recipient.address.domain, route.nexthop, _leaves(route)))
            groups.setdefault((route.agent, route.nexthop, shape), []).append((qr, route))
        return groups

    async def _deliverGroup(
        self,
        lease: Lease,
        key: tuple[str, str | None],
        members: list[tuple[QueuedRecipient, Route]],
        body: IMessageBody,
        shape: Shape | None,
        throttled: dict[int, tuple[float, SMTPReply]],
    ) -> list[tuple[QueuedRecipient, Route, RecipientOutcome]]:
        """
        Deliver C{members} within their destination's shape: in pieces of
        at most its recipients per message, each waiting for its turn in
        the destination's pace.  A piece whose turn is too far off is put
        back: its recipients get L{THROTTLED}, and their turn and that
        reply go in C{throttled} (by recipient index).
        """
        if shape is None:
            return await self._deliverWindowed(lease, key, members, body, None, throttled)
        assert self._shaping is not None
        pace = self._shaping.pace(shape)
        results: list[tuple[QueuedRecipient, Route, RecipientOutcome]] = []
        for piece in shape.split(members):
            if pace is not None:
                now = self._clock.seconds()
                when, inMemory = pace.turn(now)
                if inMemory and when > now:
                    await task.deferLater(self._clock, when - now)
                if not self.running:
                    # Stopped while waiting: due again at the next start.
                    when, inMemory = self._clock.seconds(), False
                if not inMemory:
                    self.log.debug(
                        "{queueID}: {shape} is paced; waiting in the queue until {when}",
                        queueID=lease.queueID,
                        shape=shape.name,
                        when=when,
                    )
                    for qr, route in piece:
                        throttled[qr.index] = (when, THROTTLED)
                        results.append((qr, route, RecipientOutcome(qr.recipient, THROTTLED)))
                    continue
            results.extend(await self._deliverWindowed(lease, key, list(piece), body, pace, throttled))
        return results

    async def _deliverWindowed(
        self,
        lease: Lease,
        key: tuple[str, str | None],
        members: list[tuple[QueuedRecipient, Route]],
        body: IMessageBody,
        pace: Pace | None,
        throttled: dict[int, tuple[float, SMTPReply]],
    ) -> list[tuple[QueuedRecipient, Route, RecipientOutcome]]:
        """
        Deliver C{members} within the (agent, next hop) window and the
        agent's limit, and at least C{pace.interval} after the pace's last
        start.  If too many recipients wait for the agent already, put
        them back (L{AGENT_BUSY}, in C{throttled}) instead.
        """
        agentName, nexthop = key
        destination = self._destination(key)
        if destination.deadUntil and any(qr.released for qr, _ in members):
            # ETRN or an operator flush asked for this: try now.
            self.log.info(
                "{queueID}: flushed, so trying {agent} {nexthop} again now",
                queueID=lease.queueID,
                agent=agentName,
                nexthop=nexthop or "",
            )
            destination.deadUntil = 0.0
            destination.deadReply = None
        if destination.deadUntil <= self._clock.seconds():
            slots = destination.slots
            if (
                slots.waiting
                and slots.waiting + len(members) > AGENT_AHEAD * slots.limit
                and not self._free(destination)
            ):
                return self._putBack(lease, agentName, members, throttled)
            await self._acquire(destination, len(members))
            try:
                if pace is not None:
                    delay = pace.untilFree(self._clock.seconds())
                    if delay > 0:
                        await task.deferLater(self._clock, delay)
                    pace.started(self._clock.seconds())
                if not IDestinationSlots.providedBy(self._queue):
                    return await self._deliverNow(lease, key, members, body, destination)
                shared = IDestinationSlots(self._queue)
                slot = f"{agentName}:{nexthop or ''}"
                if not await self._acquireShared(shared, slot, destination.window):
                    return [
                        (qr, route, RecipientOutcome(qr.recipient, CLUSTER_BUSY)) for qr, route in members
                    ]
                try:
                    return await self._deliverNow(lease, key, members, body, destination)
                finally:
                    shared.releaseDestination(slot).addErrback(
                        lambda f: self.log.failure("releasing slot {nexthop} failed", f, nexthop=slot)
                    )
            finally:
                self._release(key, destination)
        reply = destination.deadReply or AGENT_TIMEOUT
        self.log.info(
            "{queueID}: not trying {agent} {nexthop} again yet: {code} {enhanced}",
            event="delivery.postponed",
            until=destination.deadUntil,
            queueID=lease.queueID,
            agent=agentName,
            nexthop=nexthop or "",
            code=reply.code,
            enhanced=reply.enhanced,
        )
        return [(qr, route, RecipientOutcome(qr.recipient, reply)) for qr, route in members]

    def _putBack(
        self,
        lease: Lease,
        agentName: str,
        members: list[tuple[QueuedRecipient, Route]],
        throttled: dict[int, tuple[float, SMTPReply]],
    ) -> list[tuple[QueuedRecipient, Route, RecipientOutcome]]:
        """
        Send C{members} back to the queue for L{BUSY_RETRY} seconds,
        uncounted, and slow the claims down (see I{Limits}).
        """
        now = self._clock.seconds()
        self._busyUntil = now + BUSY_PAUSE
        self.log.debug(
            "{queueID}: {agent} has {waiting} recipients waiting; back to the queue for {seconds}s",
            queueID=lease.queueID,
            agent=agentName,
            waiting=self._agentSlots[agentName].waiting,
            seconds=BUSY_RETRY,
        )
        for qr, _ in members:
            throttled[qr.index] = (now + BUSY_RETRY, AGENT_BUSY)
        return [(qr, route, RecipientOutcome(qr.recipient, AGENT_BUSY)) for qr, route in members]

    async def _acquireShared(self, shared: IDestinationSlots, slot: str, limit: int) -> bool:
        """
        Wait (a bounded time) for a cluster-wide slot of C{slot}.
        """
        for _ in range(SHARED_SLOT_TRIES):
            try:
                if await shared.acquireDestination(slot, limit):
                    return True
            except Exception:
                self.log.failure("taking a cluster slot for {nexthop} failed", nexthop=slot)
                return False
            await task.deferLater(self._clock, 1.0)
        return False

    async def _deliverNow(
        self,
        lease: Lease,
        key: tuple[str, str | None],
        members: list[tuple[QueuedRecipient, Route]],
        body: IMessageBody,
        destination: _Destination,
    ) -> list[tuple[QueuedRecipient, Route, RecipientOutcome]]:
        agentName, nexthop = key
        if destination.deadUntil > self._clock.seconds():
            # It died while this group waited for a slot.
            reply = destination.deadReply or AGENT_TIMEOUT
            return [(qr, route, RecipientOutcome(qr.recipient, reply)) for qr, route in members]
        envelope = replace(
            lease.envelope,
            recipients=tuple(qr.recipient for qr, _ in members),
            queueID=lease.queueID,
        )
        # Each attempt is a span of the message's trace (stored with it);
        # the agent's own spans hang below it (Envelope.traceparent).
        span = (
            tracing.startSpan(
                "delivery",
                traceparent=envelope.traceparent,
                attributes={
                    "mailfw.queue_id": lease.queueID,
                    "mailfw.agent": agentName,
                    "mailfw.nexthop": nexthop or "",
                    "mailfw.attempt": 1 + max(qr.attempts for qr, _ in members),
                    "smtp.recipients": len(members),
                },
            )
            if tracing.enabled()
            else None
        )
        if span is not None:
            envelope = replace(envelope, traceparent=tracing.traceparentOf(span))
        started = self._clock.seconds()
        agent = self._agents.get(agentName)
        if agent is None:
            # A reload removed it since this lease was routed.
            outcomes = [RecipientOutcome(qr.recipient, UNKNOWN_AGENT) for qr, _ in members]
            tracing.endSpan(span, UNKNOWN_AGENT.code, UNKNOWN_AGENT.enhanced)
            return [(qr, route, o) for (qr, route), o in zip(members, outcomes, strict=True)]
        try:
            d = maybeDeferred(agent.deliver, envelope, body, nexthop)
            d.addTimeout(self.leaseSeconds, self._clock)
            outcomes = list(await d)
            if len(outcomes) != len(members):
                raise ValueError(f"agent returned {len(outcomes)} outcomes for {len(members)} recipients")
        except (defer.TimeoutError, _error.TimeoutError):
            self.log.error(
                "delivery agent {agent} timed out on {queueID} for {nexthop}",
                agent=agentName,
                queueID=lease.queueID,
                nexthop=nexthop or "",
            )
            outcomes = [RecipientOutcome(qr.recipient, AGENT_TIMEOUT) for qr, _ in members]
        except Exception:
            self.log.failure(
                "delivery agent {agent} failed on {queueID} for {nexthop}",
                agent=agentName,
                queueID=lease.queueID,
                nexthop=nexthop or "",
            )
            outcomes = [RecipientOutcome(qr.recipient, AGENT_FAILED) for qr, _ in members]
        else:
            self._feedback(key, destination, outcomes)
        # No format: the outcomes are logged one per recipient (_decide).
        self.log.info(
            event="delivery.attempt",
            queueID=lease.queueID,
            agent=agentName,
            nexthop=nexthop or "",
            count=len(members),
            duration=self._clock.seconds() - started,
        )
        if span is not None:
            _endAttempt(span, outcomes)
        return [(qr, route, outcome) for (qr, route), outcome in zip(members, outcomes, strict=False)]

    # --- deciding ------------------------------------------------------------------

    def _decide(
        self,
        lease: Lease,
        qr: QueuedRecipient,
        route: Route | None,
        outcome: RecipientOutcome,
        now: float,
        decided: _Decided,
    ) -> None:
        recipient = qr.recipient
        reply = outcome.reply

        def logged(event: str) -> None:
            self.log.info(
                "{queueID} to {recipient} via {agent}: {code} {enhanced} {text}",
                event=event,
                queueID=lease.queueID,
                recipient=str(recipient.address),
                code=reply.code,
                enhanced=reply.enhanced,
                text=reply.text,
                agent=route.agent if route else "",
                nexthop=(route.nexthop or "") if route else "",
                attempts=qr.attempts + 1,
                arrival=lease.envelope.arrival,
            )

        routeName = (route.name or route.agent or None) if route is not None else None
        if outcome.delivered:
            logged("delivery.delivered")
            decided.dispositions.append(Disposition(qr.index, outcome))
            if route is not None and route.kind is RouteKind.LOCAL and "SUCCESS" in recipient.notify:
                decided.delivered.append(
                    RecipientReport(recipient, "delivered", reply.enhanced or "2.0.0", reply, None, now)
                )
            return
        if outcome.failed:
            logged("delivery.bounced")
            decided.dispositions.append(Disposition(qr.index, outcome))
            decided.failed.append(self._notices.failureReport(recipient, reply, outcome.remoteMTA, now))
            return
        schedule = self._schedule.forDomain(recipient.address.domain)
        arrival = lease.envelope.arrival
        nextAttempt = schedule.nextAttempt(now, arrival, qr.attempts + 1)
        if nextAttempt is None:
            logged("delivery.expired")
            expired = RecipientOutcome(recipient, EXPIRED, outcome.remoteMTA)
            decided.dispositions.append(Disposition(qr.index, expired))
            decided.failed.append(
                RecipientReport(recipient, "failed", "4.4.7", reply, outcome.remoteMTA, now)
            )
            return
        logged("delivery.deferred")
        warn = not qr.warned and schedule.shouldWarn(now, arrival)
        if warn:
            decided.delayed.append(
                self._notices.delayReport(recipient, reply, outcome.remoteMTA, now, schedule.expires(arrival))
            )
        if self._holdForETRN(recipient.address):
            # Tried (released by a flush, or routing failed): wait for the
            # next ETRN rather than retrying on the schedule.
            decided.dispositions.append(
                Disposition(
                    qr.index,
                    outcome,
                    _housekeeping(schedule, arrival, qr.warned or warn),
                    warn,
                    route=routeName,
                    hold=True,
                )
            )
            return
        decided.dispositions.append(Disposition(qr.index, outcome, nextAttempt, warn, route=routeName))

    def _throttled(
        self,
        lease: Lease,
        qr: QueuedRecipient,
        route: Route,
        until: float,
        placeholder: SMTPReply,
        now: float,
        decided: _Decided,
    ) -> None:
        """
        Put a recipient whose destination's pace has no turn for it soon
        (or whose agent is too busy) back into the queue until C{until},
        without counting an attempt and without a delay notice; at the end
        of its lifetime it bounces like any deferred recipient.  Its last
        reply stays, or becomes C{placeholder} if it was never tried.
        """
        recipient = qr.recipient
        schedule = self._schedule.forDomain(recipient.address.domain)
        expires = schedule.expires(lease.envelope.arrival)
        last = qr.lastReply or placeholder
        if now >= expires:
            decided.dispositions.append(Disposition(qr.index, RecipientOutcome(recipient, EXPIRED)))
            decided.failed.append(RecipientReport(recipient, "failed", "4.4.7", last, None, now))
            return
        decided.dispositions.append(
            Disposition(
                qr.index,
                RecipientOutcome(recipient, last),
                min(until, expires),
                route=route.name or route.agent or None,
                counted=False,
            )
        )

    def _hold(self, lease: Lease, qr: QueuedRecipient, route: Route, now: float, decided: _Decided) -> None:
        """
        Keep a recipient of a hold-for-ETRN domain waiting without trying
        it: bounce it if its lifetime is over, send its delay notice once,
        and hold it until its next housekeeping time.
        """
        recipient = qr.recipient
        schedule = self._schedule.forDomain(recipient.address.domain)
        arrival = lease.envelope.arrival
        expires = schedule.expires(arrival)
        last = qr.lastReply or HELD
        if now >= expires:
            self.log.info(
                "{queueID} to {recipient}: held for ETRN until it expired",
                event="delivery.expired",
                queueID=lease.queueID,
                recipient=str(recipient.address),
                code=EXPIRED.code,
                enhanced=EXPIRED.enhanced,
            )
            decided.dispositions.append(Disposition(qr.index, RecipientOutcome(recipient, EXPIRED)))
            decided.failed.append(RecipientReport(recipient, "failed", "4.4.7", last, None, None))
            return
        warn = not qr.warned and schedule.shouldWarn(now, arrival)
        if warn:
            decided.delayed.append(
                RecipientReport(recipient, "delayed", last.enhanced or "4.0.0", last, None, None, expires)
            )
        until = _housekeeping(schedule, arrival, qr.warned or warn)
        self.log.debug(
            "{queueID} to {recipient}: held for ETRN until {until}",
            queueID=lease.queueID,
            recipient=str(recipient.address),
            until=until,
        )
        decided.dispositions.append(
            Disposition(
                qr.index,
                RecipientOutcome(recipient, last),
                until,
                warn,
                route=route.name or route.agent or None,
                hold=True,
                counted=False,
            )
        )

    async def _makeNotices(self, lease: Lease, body: IMessageBody | None, decided: _Decided) -> list[Notice]:
        notices: list[Notice] = []
        now = self._clock.seconds()
        for reports, full in (
            (decided.failed, True),
            (decided.delayed, False),
            (decided.delivered, False),
        ):
            wanted = self._notices.wanted(reports)
            if not wanted:
                continue
            returned = b""
            returnFull = full and self._notices.returnsFull(lease.envelope, lease.size)
            if lease.envelope.sender is not None:
                returned = await self._returned(lease, body, returnFull)
            notice = self._notices.build(lease.queueID, lease.envelope, wanted, returned, returnFull, now)
            if notice is not None:
                notices.append(notice)
        return notices

    async def _returned(self, lease: Lease, body: IMessageBody | None, full: bool) -> bytes:
        try:
            if body is None:
                body = await self._queue.openBody(lease.queueID)
            data: bytes = await self._runInThread(readReturned, body, full)
            return data
        except Exception:
            self.log.failure("reading {queueID} for its notice failed", queueID=lease.queueID)
            return b""

    # --- limits --------------------------------------------------------------------

    def _destination(self, key: tuple[str, str | None]) -> _Destination:
        destination = self._destinations.get(key)
        if destination is None:
            slots = self._agentSlots.get(key[0])
            if slots is None:
                slots = self._agentSlots[key[0]] = _AgentSlots(self.agentLimit(key[0]))
            destination = self._destinations[key] = _Destination(self.perDestination, slots)
        return destination

    def _free(self, destination: _Destination) -> bool:
        """
        Whether C{destination} may start a delivery now: within its window,
        its agent's limit and C{maxConcurrent}.
        """
        return (
            destination.active < destination.window
            and destination.slots.active < destination.slots.limit
            and self.deliveries < self.maxConcurrent
        )

    def _occupy(self, destination: _Destination) -> None:
        destination.active += 1
        destination.slots.active += 1

    def _acquire(self, destination: _Destination, count: int) -> Deferred[None]:
        """
        A delivery slot for a group of C{count} recipients to
        C{destination}: at once if one is free, else when L{_dispatch}
        gives it one.  Meanwhile its recipients are waiting (see I{Limits}),
        which makes room for claiming mail for other agents.
        """
        if self._free(destination):
            self._occupy(destination)
            return succeed(None)
        slots = destination.slots
        slots.waiting += count

        def granted(result: None) -> None:
            slots.waiting -= count
            return result

        d: Deferred[None] = Deferred()
        destination.waiters.append(d)
        if self._backlog:
            self._wake()
        return d.addCallback(granted)

    def _release(self, key: tuple[str, str | None], destination: _Destination) -> None:
        destination.active -= 1
        destination.slots.active -= 1
        if (
            destination.active == 0
            and not destination.waiters
            and destination.deadUntil <= self._clock.seconds()
            and destination.window == self.perDestination
        ):
            del self._destinations[key]
        self._dispatch()

    def _dispatch(self) -> None:
        """
        Give free slots to waiting groups, destination by destination.
        """
        if self._dispatching:
            return
        self._dispatching = True
        try:
            progress = True
            while progress and self.deliveries < self.maxConcurrent:
                progress = False
                for destination in list(self._destinations.values()):
                    if destination.waiters and self._free(destination):
                        self._occupy(destination)
                        destination.waiters.popleft().callback(None)
                        progress = True
        finally:
            self._dispatching = False

    def _feedback(
        self,
        key: tuple[str, str | None],
        destination: _Destination,
        outcomes: Sequence[RecipientOutcome],
    ) -> None:
        if outcomes and all(o.deferred and o.reply.enhanced in CONNECTION_FAILURES for o in outcomes):
            destination.deadUntil = self._clock.seconds() + self.deadTime
            destination.deadReply = outcomes[0].reply
            destination.window = max(1, destination.window - 1)
            destination.successes = 0
            self.log.warn(
                "{agent} cannot reach {nexthop}: {code} {enhanced}; not trying again for {seconds} seconds",
                event="destination.backoff",
                until=destination.deadUntil,
                agent=key[0],
                nexthop=key[1] or "",
                code=outcomes[0].reply.code,
                enhanced=outcomes[0].reply.enhanced,
                seconds=self.deadTime,
            )
            return
        destination.successes += 1
        if destination.successes >= destination.window:
            destination.successes = 0
            destination.window = min(destination.window + 1, self.maxPerDestination)


def _leaves(route: Route) -> bool:
    """
    Whether a route's mail goes to other hosts (relayed, or to a next hop).
    """
    return route.kind is RouteKind.RELAY or route.nexthop is not None


def _endAttempt(span: Any, outcomes: Sequence[RecipientOutcome]) -> None:
    """
    End a delivery attempt's span with how its recipients fared; the
    first reply that was not a success marks it failed.
    """
    worst = next((o.reply for o in outcomes if not o.delivered), None)
    reply = worst if worst is not None else (outcomes[0].reply if outcomes else None)
    tracing.endSpan(
        span,
        None if reply is None else reply.code,
        "" if reply is None else reply.enhanced,
        attributes={
            "mailfw.delivered": sum(o.delivered for o in outcomes),
            "mailfw.deferred": sum(o.deferred for o in outcomes),
            "mailfw.failed": sum(o.failed for o in outcomes),
        },
    )


def _housekeeping(schedule: RetrySchedule, arrival: float, warned: bool) -> float:
    """
    When a held-for-ETRN recipient needs the scheduler again without a
    flush: at the delay-warning time if it was not warned yet, else at the
    end of its lifetime.
    """
    expires = schedule.expires(arrival)
    if not warned and schedule.delayWarning is not None:
        return min(arrival + schedule.delayWarning, expires)
    return expires


async def _settle(deferreds: Sequence[Deferred[_T]]) -> list[tuple[bool, Any]]:
    """
    What C{DeferredList(deferreds, consumeErrors=True)} gives, without its
    cost in the common case of one Deferred (one recipient, one group):
    C{(True, result)} or C{(False, failure)} for each, in order.
    """
    if len(deferreds) != 1:
        return await DeferredList(list(deferreds), consumeErrors=True)
    try:
        return [(True, await deferreds[0])]
    except Exception:
        return [(False, Failure())]


def schedulerFromConfig(
    section: Section,
    clock: IReactorTime,
    queue: ILeaseStore,
    router: IRouter,
    agents: Mapping[str, IDeliveryAgent],
    hostname: str,
    holdForETRN: Callable[[Address], bool] = lambda address: False,
    resolver: Callable[[], Any] | None = None,
) -> Scheduler:
    """
    Build the scheduler from C{[scheduler]}: the retry keys of
    L{RetrySchedule.fromSection} plus C{max_concurrent} (50),
    C{max_per_agent} (L{defaultPerAgent}), the C{[scheduler.agents."NAME"]}
    tables with one key, C{max_concurrent}, for the agent instance NAME,
    C{per_destination} (5), C{max_per_destination} (20),
    C{delivery_timeout} (600 seconds), C{dead_time} (60 seconds),
    C{shaping_wait} (10 seconds, see L{mailfw.scheduling._shaping.Pace})
    and the C{[scheduler.destinations."NAME"]} tables of traffic shaping.

    @param holdForETRN: whether a recipient's domain is held until ETRN
        (from C{[etrn] hold}, which the caller reads).
    @param resolver: returns the shared DNS resolver, for destinations
        given as host patterns; called only if there are some.

    @raise mailfw.config.ConfigError: naming the bad key.
    """
    schedule = RetrySchedule.fromSection(section)
    maxConcurrent = section.integer("max_concurrent", 50, minimum=1)
    maxPerAgent = section.integer("max_per_agent", defaultPerAgent(maxConcurrent), minimum=1)
    agentLimits: dict[str, int] = {}
    for name, table in section.table("agents", {}).items():
        title = f'[scheduler.agents."{name}"]'
        if not isinstance(table, dict):
            raise ConfigError(f"{title} must be a table")
        if name not in agents:
            raise ConfigError(f"{title}: there is no [delivery.{name}]")
        agent = Section(title, table)
        agentLimits[name] = agent.integer("max_concurrent", minimum=1)
        agent.finish()
    lookup = None if resolver is None else _hostNames(resolver)
    shaping = shapingFromConfig(
        clock,
        section.table("destinations", {}),
        lookup,
        section.number("shaping_wait", 10.0, minimum=0),
    )
    scheduler = Scheduler(
        clock,
        queue,
        router,
        agents,
        hostname,
        schedule,
        maxConcurrent=maxConcurrent,
        perDestination=section.integer("per_destination", 5, minimum=1),
        leaseSeconds=section.number("delivery_timeout", 3600.0, minimum=1),
        maxPerDestination=section.integer("max_per_destination", 20, minimum=1),
        deadTime=section.number("dead_time", 60.0, minimum=0),
        holdForETRN=holdForETRN,
        shaping=shaping,
        maxPerAgent=maxPerAgent,
        agentLimits=agentLimits,
    )
    section.finish()
    return scheduler


def _hostNames(resolver: Callable[[], Any]) -> HostLookup:
    """
    Look up a next hop's mail host names, in preference order, with the
    resolver the relay agents use.
    """
    mx: list[MXResolver] = []

    def lookup(nexthop: str) -> Deferred[Sequence[str]]:
        if not mx:
            mx.append(MXResolver(resolver()))

        def names(resolution: Resolution) -> Sequence[str]:
            if resolution.failure is not None:
                raise ValueError(f"{resolution.failure.code} {resolution.failure.text}")
            return list(dict.fromkeys(host.name for host in resolution.hosts))

        return maybeDeferred(mx[0].resolve, nexthop).addCallback(names)

    return lookup
