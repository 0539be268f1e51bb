"""
ETRN (RFC 1985): which nodes may be flushed, by whom and how often, and
what the reply says.  Everything here is independent of the SMTP protocol:
the server hands over the command's argument, the client's address and the
authenticated user's ETRN domains, and sends back the L{SMTPReply} it gets.

Configuration
=============

The C{[etrn]} section (see L{settingsFromConfig})::

    [etrn]
    domains = ["customer.example", ".customer.example", "#uucp"]
    clients = ["192.0.2.0/24", "2001:db8::/32"]
    hold = ["customer.example"]
    rate = 10
    submission = false

Domain patterns, in C{domains} and C{hold} alike (and in a user's ETRN
domains): C{"example.com"} is that domain only, C{".example.com"} its
subdomains only (list both for both), C{"*"} every domain (C{domains}
only).  C{"#name"} in C{domains} allows C{ETRN #name} for that route name.

Rights
======

C{ETRN node} is carried out only when the node is covered by C{domains}
I{and} the client either connects from one of the C{clients} networks or
has authenticated as a user whose ETRN domains cover the node.
C{ETRN @example.com} (the domain and all its subdomains) needs both
C{example.com} and its subdomains covered.  C{ETRN #name} needs C{"#name"}
in C{domains}; users may ask for it only with C{"*"}.  Everyone else gets
C{459} whatever is queued, so a refusal says nothing about waiting mail.

Rate
====

Each client address may send C{rate} well-formed ETRN commands per minute
(a sliding window), allowed or not, so that nobody can probe the domain
list quickly; beyond that it gets C{458 4.7.0} (try again later) without
any check being made.
"""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.config import ConfigError, Section
from mailfw.interfaces import IQueueAdmin
from mailfw.queued import Selector
from mailfw.reply import SMTPReply

__all__ = [
    "ETRNHandler",
    "ETRNRequest",
    "ETRNSettings",
    "RateLimiter",
    "flushReply",
    "parseETRNArgument",
    "settingsFromConfig",
]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_QUEUE_NAME = re.compile(r"[!-~]{1,64}\Z")
"""A route name after C{#}: printable ASCII without spaces."""

SYNTAX = SMTPReply(501, "5.5.4", "Syntax: ETRN [@|#]node")
TOO_MANY = SMTPReply(458, "4.7.0", "Too many ETRN requests; try again later")


# --- the argument --------------------------------------------------------------


@dataclass(frozen=True)
class ETRNRequest:
    """
    A parsed C{ETRN} argument.

    @ivar kind: C{"domain"} (C{ETRN example.com}), C{"subdomains"} (C{ETRN
        @example.com}: the domain and its subdomains) or C{"queue"} (C{ETRN
        #name}: the recipients whose route has that name).
    @ivar name: the normalised domain (A-labels, lower case) or the queue
        name.
    """

    kind: str
    name: str

    @property
    def node(self) -> str:
        """
        The node as replies name it: C{example.com}, C{@example.com} or
        C{#name}.
        """
        return {"domain": "", "subdomains": "@", "queue": "#"}[self.kind] + self.name

    @property
    def selector(self) -> Selector:
        """
        The queue selector for this request (the same one C{mailfw queue
        flush} builds).
        """
        if self.kind == "queue":
            return Selector(route=self.name)
        if self.kind == "subdomains":
            return Selector(domain="@" + self.name)
        return Selector(domain=self.name)


def parseETRNArgument(argument: str) -> ETRNRequest | None:
    """
    Parse the argument of C{ETRN}: C{[@|#]node}.  Domains may be given as
    U-labels; a trailing dot is ignored.

    @return: the request, or C{None} when the argument is missing or
        malformed (the server answers 501).
    """
    text = argument.strip(" ")
    if not text or " " in text or "\t" in text:
        return None
    if text.startswith("#"):
        name = text[1:]
        return ETRNRequest("queue", name) if _QUEUE_NAME.match(name) else None
    kind = "domain"
    if text.startswith("@"):
        kind, text = "subdomains", text[1:]
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    if text.startswith("["):
        return None
    try:
        return ETRNRequest(kind, normaliseDomain(text))
    except AddressError:
        return None


# --- patterns ---------------------------------------------------------------------


def normaliseDomainPattern(text: str, title: str, allowAll: bool = False) -> str:
    """
    A domain pattern in canonical form: C{domain}, C{.domain} or (with
    C{allowAll}) C{*}.

    @raise ConfigError: naming C{title} if it is not one.
    """
    if text == "*" and allowAll:
        return text
    if text.startswith("@"):
        raise ConfigError(
            f"{title}: {text!r}: write {text[1:]!r} for the domain and {'.' + text[1:]!r} for its subdomains"
        )
    parent = text.startswith(".")
    try:
        domain = normaliseDomain(text[1:] if parent else text)
    except AddressError as e:
        raise ConfigError(f"{title}: bad domain {text!r}: {e}") from None
    return "." + domain if parent else domain


def domainCovered(patterns: Sequence[str], domain: str) -> bool:
    """
    Whether one of C{patterns} (C{*}, C{domain}, C{.parent}) covers the
    normalised C{domain}.
    """
    for pattern in patterns:
        if pattern == "*" or pattern == domain:
            return True
        if pattern.startswith(".") and domain.endswith(pattern):
            return True
    return False


def _subdomainsCovered(patterns: Sequence[str], domain: str) -> bool:
    """
    Whether C{patterns} cover every subdomain of C{domain}.
    """
    for pattern in patterns:
        if pattern == "*":
            return True
        if pattern.startswith(".") and (domain == pattern[1:] or domain.endswith(pattern)):
            return True
    return False


def requestCovered(patterns: Sequence[str], request: ETRNRequest) -> bool:
    """
    Whether C{patterns} cover everything C{request} would flush.  A queue
    name is covered by C{#name} or C{*}.
    """
    if request.kind == "queue":
        return "*" in patterns or "#" + request.name in patterns
    if not domainCovered(patterns, request.name):
        return False
    return request.kind == "domain" or _subdomainsCovered(patterns, request.name)


def _clientAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# --- settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class ETRNSettings:
    """
    The C{[etrn]} section, checked; see the module docstring.

    @ivar domains: normalised patterns of the nodes that may be flushed:
        C{*}, C{domain}, C{.domain}, C{#name}.
    @ivar clients: networks whose clients may ask without authenticating.
    @ivar hold: normalised patterns of the domains held until ETRN.
    @ivar rate: ETRN commands per client address per minute.
    @ivar submission: offer ETRN on submission listeners too.
    """

    domains: tuple[str, ...] = ()
    clients: tuple[_Network, ...] = ()
    hold: tuple[str, ...] = ()
    rate: int = 10
    submission: bool = False

    @property
    def enabled(self) -> bool:
        """
        Whether ETRN is offered at all: only when some node may be flushed.
        """
        return bool(self.domains)

    def holds(self, address: Address) -> bool:
        """
        Whether mail for C{address} waits for ETRN (the scheduler's
        C{holdForETRN}).
        """
        return domainCovered(self.hold, address.domain)

    def clientAllowed(self, host: str) -> bool:
        """
        Whether a client connecting from C{host} (an IP address as text)
        may ask without authenticating.
        """
        address = _clientAddress(host)
        return address is not None and any(address in network for network in self.clients)

    def mayFlush(self, request: ETRNRequest, host: str, userDomains: Sequence[str] | None = None) -> bool:
        """
        Whether C{request} is allowed for a client at C{host}, authenticated
        as a user with C{userDomains} (or not authenticated: C{None}).
        """
        if not requestCovered(self.domains, request):
            return False
        if self.clientAllowed(host):
            return True
        return userDomains is not None and requestCovered(tuple(userDomains), request)


def settingsFromConfig(options: Mapping[str, object], title: str = "[etrn]") -> ETRNSettings:
    """
    Read C{[etrn]}: C{domains} (patterns of the nodes that may be flushed;
    empty, the default, turns ETRN off), C{clients} (networks in CIDR
    notation, or single addresses, allowed to ask without AUTH), C{hold}
    (patterns of domains held until ETRN), C{rate} (ETRN commands per
    client address per minute, default 10) and C{submission} (offer ETRN on
    submission listeners too; default false).

    @raise ConfigError: naming the bad key.
    """
    section = Section(title, options)
    domains = []
    for text in section.strings("domains", []):
        if text.startswith("#"):
            if not _QUEUE_NAME.match(text[1:]):
                raise ConfigError(f"{title} domains: bad queue name {text!r}")
            domains.append(text)
        else:
            domains.append(normaliseDomainPattern(text, f"{title} domains", allowAll=True))
    clients = []
    for text in section.strings("clients", []):
        try:
            clients.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{title} clients: bad network {text!r}") from None
    hold = tuple(normaliseDomainPattern(text, f"{title} hold") for text in section.strings("hold", []))
    rate = section.integer("rate", 10, minimum=1)
    submission = section.flag("submission", False)
    section.finish()
    return ETRNSettings(tuple(domains), tuple(clients), hold, rate, submission)


# --- rate -------------------------------------------------------------------------------


class RateLimiter:
    """
    At most C{limit} events per client in any C{window} seconds, with
    memory bounded by the number of clients seen within one window.
    """

    def __init__(self, clock: IReactorTime, limit: int, window: float = 60.0) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self._events: dict[str, deque[float]] = {}
        self._lastPrune = clock.seconds()

    def allow(self, client: str) -> bool:
        """
        Count one event for C{client} and say whether it is within the
        limit.  Refused events are not counted, so a client that waits a
        window is served again.
        """
        now = self._clock.seconds()
        if now - self._lastPrune >= self.window:
            self._prune(now)
        events = self._events.setdefault(client, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def _prune(self, now: float) -> None:
        self._lastPrune = now
        for client in [c for c, e in self._events.items() if not e or e[-1] <= now - self.window]:
            del self._events[client]

    def __len__(self) -> int:
        return len(self._events)


# --- replies --------------------------------------------------------------------------


def flushReply(node: str, count: int | None) -> SMTPReply:
    """
    The RFC 1985 reply once a flush of C{node} has been recorded: C{250}
    when the count is unknown (a queue plugin that does not count), C{251}
    when nothing was waiting, C{253} with the number of recipients made
    due (the queue counts recipients, not messages, and the text says so).
    C{252} (pending messages started, number not given) is never needed:
    the count is known whenever mail is.
    """
    if count is None:
        return SMTPReply(250, "2.0.0", f"OK, queuing for node {node} started")
    if count == 0:
        return SMTPReply(251, "2.0.0", f"OK, no messages waiting for node {node}")
    return SMTPReply(253, "2.0.0", f"OK, {count} pending recipients for node {node} started")


def notAllowed(node: str) -> SMTPReply:
    """
    C{459}: refused, for whatever reason (not an ETRN node, not this
    client's), so that the reply says nothing about waiting mail.
    """
    return SMTPReply(459, "4.7.1", f"Node {node} not allowed: not authorised for this client")


def unableToQueue(node: str) -> SMTPReply:
    """
    C{458}: the queue could not record the flush; try later.
    """
    return SMTPReply(458, "4.0.0", f"Unable to queue messages for node {node}")


# --- the decision -------------------------------------------------------------------------


class ETRNHandler:
    """
    Carries out C{ETRN} commands: parse, rate, rights, then
    C{queue.flush}.  The reply fires once the flush is recorded; delivery
    happens later, over new connections, when the queue's C{notifyDue}
    wakes the scheduler (RFC 1985 section 5).
    """

    log = Logger()

    def __init__(self, settings: ETRNSettings, queue: IQueueAdmin, clock: IReactorTime) -> None:
        self.settings = settings
        self._queue = queue
        self._rate = RateLimiter(clock, settings.rate)

    def request(
        self, argument: str, host: str, userDomains: Sequence[str] | None = None
    ) -> Deferred[SMTPReply]:
        """
        Answer C{ETRN argument} from a client at C{host} (its IP address as
        text), authenticated as a user with C{userDomains} or not
        (C{None}).  Never fails: queue errors become C{458}.
        """
        parsed = parseETRNArgument(argument)
        if parsed is None:
            return _done(SYNTAX)
        request = parsed
        node = request.node
        if not self._rate.allow(host):
            self.log.warn("ETRN {node} from {peer}: rate limit reached", node=node, peer=host)
            return _done(TOO_MANY)
        if not self.settings.mayFlush(request, host, userDomains):
            self.log.warn("ETRN {node} from {peer} refused", node=node, peer=host)
            return _done(notAllowed(node))

        def flushed(count: int | None) -> SMTPReply:
            self.log.info(
                "ETRN {node} from {peer}: {count} recipients made due",
                node=node,
                peer=host,
                count=-1 if count is None else count,
            )
            return flushReply(node, count)

        def failed(failure: Failure) -> SMTPReply:
            self.log.failure("ETRN {node} from {peer}: flush failed", failure, node=node, peer=host)
            return unableToQueue(node)

        d: Deferred[int] = maybeDeferred(self._queue.flush, request.selector)
        return d.addCallbacks(flushed, failed)


def _done(reply: SMTPReply) -> Deferred[SMTPReply]:
    d: Deferred[SMTPReply] = Deferred()
    d.callback(reply)
    return d
