"""
Traffic shaping per destination: the C{[scheduler.destinations."NAME"]}
sections, and the pacing the scheduler applies with them.

Which destination a recipient belongs to
========================================

A section's name is either a recipient domain (C{"gmail.com"}) or, with
a leading C{*.}, a pattern over the names of the hosts the mail goes to
(C{"*.google.com"}).  For each recipient:

  1. a section named exactly like the recipient's domain wins;
  2. otherwise, for mail that leaves the server (relayed, or routed to a
     next hop), the names of the hosts the mail would go to are looked up
     (the MX hosts of the route's next hop, or of the recipient's domain
     when the route has none; the host itself for a C{[host]:port} next
     hop) and the first host pattern, in file order, that matches one of
     them (tried in MX preference order) applies.  C{"*.google.com"}
     matches every name ending in C{.google.com}.

Host lookups happen only when some section is a host pattern, and are
remembered for an hour (five minutes when they failed: the recipient is
then unshaped).  Every domain matching one section shares that section's
limits: C{"*.google.com"} paces gmail.com and every Google-hosted domain
together, which is what the receiving side counts.

Pacing
======

C{max_messages_per_minute} spaces the starts of deliveries to the
destination evenly, C{60 / max_messages_per_minute} seconds apart (so no
minute, however it is cut, sees more), rather than allowing a burst at the
start of each minute.  A delivery whose turn comes within C{wait} seconds
(L{Pace.wait}) waits for it in memory; a later one is put back into the
queue until the turn reserved for it, without counting as an attempt and
without a delay notice (see L{mailfw.scheduling._scheduler}).  Reserved
turns follow one another, so a backlog of a thousand messages comes back
one by one at the destination's rate rather than all at once.

C{max_recipients_per_message} splits a message's recipients for the
destination into several deliveries (several transactions), each paced
as one message.

Connections
===========

C{max_connections_per_minute} and C{max_messages_per_connection} are
about connections, which the delivery agent opens, not the scheduler: an
agent that provides L{mailfw.interfaces.IConnectionShaping} (the SMTP
relay) is given a
L{ConnectionGate} and asks it before each new connection, for the host it
connects to.  The gate matches like the rest (the recipient's domain
first, then the host's name against the host patterns), spaces new
connections evenly like messages (the delivery waits for its turn), and
tells the agent how many transactions the connection may carry; the agent
then closes it rather than reuse it for more.  Agents that do not open
connections (Maildir, pipes) are not affected.

Several nodes
=============

The pace is kept by each node for itself: with nodes sharing a PostgreSQL
queue, a destination receives up to the configured rate from each node.
Divide the rate by the number of nodes.  (A shared counter in the database,
L{mailfw.interfaces.ISharedState}, would cost a write per message and still
give only fixed windows, which allow twice the rate across a window's edge.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.config import ConfigError, Section
from mailfw.interfaces import IConnectionGate

__all__ = ["ConnectionGate", "Pace", "Shape", "ShapingTable", "shapingFromConfig"]

_T = TypeVar("_T")

HostLookup = Callable[[str], "Deferred[Sequence[str]]"]
"""Looks up the names of the hosts that receive mail for a domain, in
preference order."""

FOUND_TTL = 3600.0
FAILED_TTL = 300.0
MAX_CACHED = 10_000


@dataclass(frozen=True)
class Shape:
    """
    The limits of one C{[scheduler.destinations."NAME"]} section.

    @ivar name: the section's name, a domain or a host pattern; also the
        name of the pace all its mail shares.
    @ivar maxMessagesPerMinute: deliveries (transactions) started per
        minute, or C{None} for no limit.
    @ivar maxRecipientsPerMessage: recipients per delivery, or C{None}.
    @ivar maxConnectionsPerMinute: new connections opened per minute, or
        C{None}.
    @ivar maxMessagesPerConnection: transactions over one connection, or
        C{None}.
    """

    name: str
    maxMessagesPerMinute: int | None = None
    maxRecipientsPerMessage: int | None = None
    maxConnectionsPerMinute: int | None = None
    maxMessagesPerConnection: int | None = None

    @property
    def interval(self) -> float | None:
        """
        Seconds between two delivery starts, or C{None} when not paced.
        """
        if self.maxMessagesPerMinute is None:
            return None
        return 60.0 / self.maxMessagesPerMinute

    def split(self, members: Sequence[_T]) -> list[Sequence[_T]]:
        """
        C{members} in pieces of at most C{maxRecipientsPerMessage}.
        """
        size = self.maxRecipientsPerMessage or len(members) or 1
        return [members[start : start + size] for start in range(0, len(members), size)]


class Pace:
    """
    The even spacing of delivery starts to one shaped destination.

    @ivar interval: seconds between two starts.
    @ivar wait: the longest wait in memory (holding the lease); a later
        turn is taken in the queue instead.
    @ivar nextTurn: the earliest start of the next delivery waiting in
        memory.
    @ivar booked: the turn after the last one booked for a delivery put
        back into the queue.
    @ivar lastStart: when the last delivery actually started.
    """

    def __init__(self, interval: float, wait: float) -> None:
        self.interval = interval
        self.wait = wait
        self.nextTurn = 0.0
        self.booked = 0.0
        self.lastStart = -interval

    def turn(self, now: float) -> tuple[float, bool]:
        """
        Give a delivery its turn.

        @return: C{(when, inMemory)}: start at C{when}, waiting in memory
            if C{inMemory}, else in the queue until then.
        """
        start = max(self.nextTurn, now)
        if start - now <= self.wait:
            self.nextTurn = start + self.interval
            return start, True
        when = max(self.booked, start)
        self.booked = when + self.interval
        return when, False

    def untilFree(self, now: float) -> float:
        """
        How long a delivery about to start must still wait so that it
        starts at least C{interval} after the last one: turns are given in
        order, but the concurrency window may release two at once.
        """
        return max(0.0, self.lastStart + self.interval - now)

    def started(self, now: float) -> None:
        self.lastStart = now


class ShapingTable:
    """
    The configured destinations, and which one a recipient belongs to.

    @ivar domains: sections named after a recipient domain.
    @ivar hostPatterns: the host pattern sections, in file order.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        shapes: Sequence[Shape],
        lookup: HostLookup | None = None,
        wait: float = 10.0,
    ) -> None:
        """
        @param lookup: finds a domain's mail host names; needed when a
            section is a host pattern (C{*}), else unused.
        @param wait: see L{Pace.wait}.
        """
        self._clock = clock
        self.shapes = tuple(shapes)
        self.domains = {s.name: s for s in shapes if not s.name.startswith("*.")}
        self.hostPatterns = tuple(s for s in shapes if s.name.startswith("*."))
        self._lookup = lookup
        self.wait = wait
        self._cache: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._pending: dict[str, list[Deferred[tuple[str, ...]]]] = {}
        self._paces: dict[str, Pace] = {}
        self._connectionPaces: dict[str, Pace] = {}

    @property
    def limitsConnections(self) -> bool:
        """
        Whether any destination limits connections (see L{ConnectionGate}).
        """
        return any(
            s.maxConnectionsPerMinute is not None or s.maxMessagesPerConnection is not None
            for s in self.shapes
        )

    def connectionPace(self, shape: Shape) -> Pace | None:
        """
        The pace of new connections for C{shape}, or C{None}.  A
        connection always waits for its turn in memory.
        """
        if shape.maxConnectionsPerMinute is None:
            return None
        pace = self._connectionPaces.get(shape.name)
        if pace is None:
            pace = Pace(60.0 / shape.maxConnectionsPerMinute, math.inf)
            self._connectionPaces[shape.name] = pace
        return pace

    def shapeForHost(self, domain: str, host: str) -> Shape | None:
        """
        The section for mail to C{domain} over a connection to C{host}: the
        domain's own section, else the first host pattern C{host} matches.
        """
        shape = self.domains.get(domain.lower())
        if shape is None:
            shape = self._matchHosts((host.lower().rstrip("."),))
        return shape

    def pace(self, shape: Shape) -> Pace | None:
        """
        The pace all of C{shape}'s mail shares, or C{None} if unpaced.
        """
        interval = shape.interval
        if interval is None:
            return None
        pace = self._paces.get(shape.name)
        if pace is None:
            pace = self._paces[shape.name] = Pace(interval, self.wait)
        return pace

    def shapeFor(self, domain: str, nexthop: str | None, remote: bool = True) -> Deferred[Shape | None]:
        """
        The section that applies to a recipient in C{domain} routed to
        C{nexthop} (see the module docstring), or C{None}.  Never fails.

        @param remote: whether the mail goes to other hosts; if not (a
            local mailbox), only a section named after C{domain} applies.
        """
        shape = self.domains.get(domain.lower())
        if shape is not None or not self.hostPatterns or not remote:
            return succeed(shape)
        if nexthop is not None and nexthop.startswith("["):
            host = nexthop[1:].partition("]")[0].lower()
            return succeed(self._matchHosts((host,)))
        return self._hosts((nexthop or domain).lower()).addCallback(self._matchHosts)

    def _matchHosts(self, hosts: Sequence[str]) -> Shape | None:
        for host in hosts:
            for shape in self.hostPatterns:
                if host.endswith(shape.name[1:]):
                    return shape
        return None

    def _hosts(self, domain: str) -> Deferred[tuple[str, ...]]:
        now = self._clock.seconds()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            return succeed(cached[1])
        d: Deferred[tuple[str, ...]] = Deferred()
        waiting = self._pending.get(domain)
        if waiting is not None:
            waiting.append(d)
            return d
        self._pending[domain] = [d]
        if self._lookup is None:
            self._found(domain, Failure(ConfigError("no host lookup")))
        else:
            lookup = self._lookup(domain)
            lookup.addBoth(lambda result: self._found(domain, result))
        return d

    def _found(self, domain: str, result: Sequence[str] | Failure) -> None:
        if isinstance(result, Failure):
            self.log.info(
                "Cannot find the mail hosts of {nexthop} for traffic shaping: {why}",
                nexthop=domain,
                why=result.getErrorMessage(),
            )
            hosts: tuple[str, ...] = ()
            ttl = FAILED_TTL
        else:
            hosts = tuple(h.lower().rstrip(".") for h in result)
            ttl = FOUND_TTL if hosts else FAILED_TTL
        self._cache[domain] = (self._clock.seconds() + ttl, hosts)
        self._cache.move_to_end(domain)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        for d in self._pending.pop(domain, []):
            d.callback(hosts)


@implementer(IConnectionGate)
class ConnectionGate:
    """
    The connection limits of a L{ShapingTable}, for delivery agents (see
    I{Connections} in the module docstring).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, table: ShapingTable) -> None:
        self._clock = clock
        self._table = table

    def connect(self, domain: str, host: str) -> Deferred[int | None]:
        shape = self._table.shapeForHost(domain, host)
        if shape is None:
            return succeed(None)
        limit = shape.maxMessagesPerConnection
        pace = self._table.connectionPace(shape)
        if pace is None:
            return succeed(limit)
        now = self._clock.seconds()
        when, _ = pace.turn(now)
        if when <= now:
            return succeed(limit)
        self.log.debug(
            "Waiting {delay:.1f}s to connect to {host} ({shape} connections are paced)",
            delay=when - now,
            host=host,
            shape=shape.name,
        )
        return deferLater(self._clock, when - now, lambda: limit)


def _shapeFromSection(name: str, options: Mapping[str, object]) -> Shape:
    title = f'[scheduler.destinations."{name}"]'
    if not isinstance(options, Mapping):
        raise ConfigError(f"{title} must be a table")
    key = name.strip().lower().rstrip(".")
    body = key[2:] if key.startswith("*.") else key
    if not body or "*" in body or any(c.isspace() for c in body) or "[" in body:
        raise ConfigError(f'{title}: use a domain ("gmail.com") or a host pattern ("*.google.com")')
    section = Section(title, options)
    shape = Shape(
        key,
        maxMessagesPerMinute=section.integer("max_messages_per_minute", None, minimum=1),
        maxRecipientsPerMessage=section.integer("max_recipients_per_message", None, minimum=1),
        maxConnectionsPerMinute=section.integer("max_connections_per_minute", None, minimum=1),
        maxMessagesPerConnection=section.integer("max_messages_per_connection", None, minimum=1),
    )
    section.finish()
    return shape


def shapingFromConfig(
    clock: IReactorTime,
    destinations: object,
    lookup: HostLookup | None,
    wait: float = 10.0,
) -> ShapingTable | None:
    """
    Read C{[scheduler.destinations]}: one table per destination.

    @param lookup: see L{ShapingTable}; a host pattern without one is a
        configuration error.
    @return: C{None} when no destination is configured.
    @raise ConfigError: naming the bad section or key.
    """
    if not destinations:
        return None
    if not isinstance(destinations, Mapping):
        raise ConfigError("[scheduler] destinations: expected tables of destinations")
    shapes = [_shapeFromSection(str(name), options) for name, options in destinations.items()]
    names = [s.name for s in shapes]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f'[scheduler.destinations."{name}"] is configured twice')
    if lookup is None and any(s.name.startswith("*.") for s in shapes):
        raise ConfigError("[scheduler.destinations] host patterns need DNS, which is not available here")
    return ShapingTable(clock, shapes, lookup, wait)
