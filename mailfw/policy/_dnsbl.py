"""
The C{dnsbl} policy: refuse clients listed in DNS block lists, unless a DNS
allow list vouches for them.

At connection time the client's address is looked up in every configured
zone at once (C{2.0.0.127.zen.spamhaus.org} for 127.0.0.2; IPv6 addresses
nibble by nibble).  Each zone whose answer counts adds its weight to a
score; at C{threshold} the connection gets 554 5.7.1 naming the zones
instead of the greeting, as Postfix's postscreen does with its weighted
C{postscreen_dnsbl_sites}.  A client listed in any C{allow_zones} zone
(a DNSWL) is never refused by this policy, and an RFC 8904 C{dnswl=pass}
result says so in C{Authentication-Results:}.

Decisions worth knowing:

  - An answer counts only if it is an address in 127.0.0.0/8 and matches
    the zone's pattern, if one is given (C{zen.spamhaus.org=127.0.0.[2..11]}).
    127.255.255.x is never a listing: Spamhaus and others answer that when
    they refuse the query (a public resolver, too many queries); it is
    logged as a warning (once an hour per zone), because every client
    then looks unlisted.
  - A DNS timeout, SERVFAIL or any other failure of a zone is a temporary
    result: that zone counts as not listing the client (logged), never as a
    listing, and is not cached.
  - Answers are cached for their TTL (NXDOMAIN for the SOA's negative TTL),
    at most C{max_cache_ttl} seconds and for at most C{cache_size} names
    (least recently used first out), so a flood of distinct clients costs
    bounded memory.  Lookups go through L{twisted.names} (the configured
    C{[dns]} nameservers).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Session
from mailfw.policy import CONTINUE, AuthResult, Policy, Verdict
from mailfw.policy._cache import TTLCache
from mailfw.policy._clients import Network, clientAddress, inNetworks, networks
from mailfw.reply import SMTPReply

__all__ = ["DNSBLPolicy", "Zone", "fromConfig", "queryName"]

_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
_REFUSED_NET = ipaddress.ip_network("127.255.255.0/24")
_WARN_INTERVAL = 3600.0
_OCTETS = re.compile(r"\[[^\]]*\]|[^.\[]+")
_OCTET = re.compile(r"^(?:(\d{1,3})|\[(\d{1,3})\.\.(\d{1,3})\]|\[(\d{1,3}(?:;\d{1,3})*)\])$")


def queryName(address: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """
    The name to look up for C{address} in C{zone} (RFC 5782 2.1 and 2.4).
    """
    if address.version == 4:
        return ".".join(reversed(str(address).split("."))) + "." + zone
    nibbles = address.exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + "." + zone


def _octetMatcher(text: str, spec: str) -> frozenset[int]:
    match = _OCTET.match(text)
    if match is None:
        raise ConfigError(f"bad octet {text!r} in {spec!r}: use N, [A..B] or [A;B;C]")
    single, low, high, listed = match.groups()
    if single is not None:
        values = {int(single)}
    elif low is not None:
        values = set(range(int(low), int(high) + 1))
    else:
        values = {int(v) for v in listed.split(";")}
    if not values or any(v > 255 for v in values):
        raise ConfigError(f"bad octet {text!r} in {spec!r}")
    return frozenset(values)


@dataclass(frozen=True)
class Zone:
    """
    One DNS list.

    @ivar name: the zone, lowercase without the trailing dot.
    @ivar weight: what a listing adds to the score.
    @ivar pattern: per octet, the values an answer must have to count;
        C{None} for any 127.0.0.0/8 address.
    """

    name: str
    weight: float = 1.0
    pattern: tuple[frozenset[int], ...] | None = None

    @classmethod
    def parse(cls, spec: str, weight: float = 1.0) -> Zone:
        """
        Parse C{zone} or C{zone=PATTERN}, PATTERN being four octets each
        written C{N}, C{[A..B]} or C{[A;B;C]} (postscreen's syntax).

        @raise ConfigError: naming C{spec}.
        """
        name, _, patternText = spec.partition("=")
        name = name.strip().lower().rstrip(".")
        if not name or " " in name:
            raise ConfigError(f"bad zone {spec!r}")
        pattern = None
        if patternText:
            # Dots inside brackets ([2..11]) do not separate octets.
            octets = _OCTETS.findall(patternText.strip())
            if len(octets) != 4 or ".".join(octets) != patternText.strip():
                raise ConfigError(f"bad address pattern in {spec!r}: four octets needed")
            pattern = tuple(_octetMatcher(o, spec) for o in octets)
        return cls(name, weight, pattern)

    def counts(self, answer: str) -> bool:
        """
        Whether the answer C{answer} (dotted quad) is a listing by this zone.
        """
        address = ipaddress.IPv4Address(answer)
        if address not in _LOOPBACK_NET or address in _REFUSED_NET:
            return False
        if self.pattern is None:
            return True
        return all(int(o) in allowed for o, allowed in zip(answer.split("."), self.pattern, strict=True))


class _Unusable(Exception):
    """
    A lookup failed in a way that says nothing about the client.
    """


class DNSBLPolicy(Policy):
    """
    Refuses, at connection time, clients whose DNS list score reaches
    C{threshold}; see the module's description.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        resolver: IResolver,
        clock: IReactorTime,
        zones: Sequence[Zone],
        allowZones: Sequence[Zone] = (),
        threshold: float = 1.0,
        exempt: Sequence[Network] = (),
        cacheSize: int = 10_000,
        maxCacheTTL: float = 86400.0,
        negativeTTL: float = 300.0,
        dnsTimeout: float = 5.0,
    ) -> None:
        self.name = name
        self.resolver = resolver
        self.zones = tuple(zones)
        self.allowZones = tuple(allowZones)
        self.threshold = threshold
        self.exempt = tuple(exempt)
        self.cache: TTLCache[tuple[str, ...]] = TTLCache(clock, cacheSize)
        self.maxCacheTTL = maxCacheTTL
        self.negativeTTL = negativeTTL
        self._clock = clock
        # Zone -> when its refused queries were last logged (once an hour).
        self._warned: dict[str, float] = {}
        # One retransmission: a lost UDP packet is not a failure.
        self._timeout = (1, max(1, int(dnsTimeout) - 1)) if dnsTimeout > 1 else (1,)

    def checkConnection(self, session: Session) -> Verdict | Deferred[Verdict]:
        address = clientAddress(session.peerHost)
        if address is None or inNetworks(session.peerHost, self.exempt):
            return CONTINUE
        return Deferred.fromCoroutine(self._check(session, address))

    async def _check(
        self, session: Session, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> Verdict:
        everyZone = (*self.allowZones, *self.zones)
        results = await DeferredList(
            [self._answers(queryName(address, zone.name), zone) for zone in everyZone], consumeErrors=True
        )
        listings: list[tuple[Zone, str]] = []
        allowed: tuple[Zone, str] | None = None
        for index, (ok, outcome) in enumerate(results):
            zone = everyZone[index]
            result: Any = outcome
            if not ok:
                self.log.info(
                    "dnsbl {policy}: no answer from {zone} for {peer}: {why}",
                    policy=self.name,
                    zone=zone.name,
                    peer=session.peerHost,
                    why=result.getErrorMessage(),
                )
                continue
            counted = [a for a in result if zone.counts(a)]
            refused = [a for a in result if ipaddress.IPv4Address(a) in _REFUSED_NET]
            if refused:
                self._refusedQuery(zone, refused[0])
            if counted and index < len(self.allowZones):
                allowed = allowed or (zone, counted[0])
            elif counted:
                listings.append((zone, counted[0]))
        if allowed is not None:
            zone, answer = allowed
            return Verdict(
                results=(AuthResult("dnswl", "pass", None, (("dns.zone", zone.name), ("policy.ip", answer))),)
            )
        score = sum(zone.weight for zone, _ in listings)
        if not listings or score < self.threshold:
            return CONTINUE
        names = ", ".join(zone.name for zone, _ in listings)
        self.log.info(
            "dnsbl {policy}: {peer} listed in {zones} (score {score:g})",
            policy=self.name,
            peer=session.peerHost,
            zones=names,
            score=score,
        )
        return Verdict(
            SMTPReply(554, "5.7.1", f"Service unavailable; client [{session.peerHost}] blocked using {names}")
        )

    def _refusedQuery(self, zone: Zone, answer: str) -> None:
        # Logged once an hour per zone: with a public resolver every query
        # is refused, and a line per connection would flood the log.
        now = self._clock.seconds()
        if now - self._warned.get(zone.name, -_WARN_INTERVAL) < _WARN_INTERVAL:
            return
        self._warned[zone.name] = now
        self.log.warn(
            "dnsbl {policy}: {zone} refused the query ({answer}): every client looks unlisted",
            policy=self.name,
            zone=zone.name,
            answer=answer,
        )

    def _answers(self, name: str, zone: Zone) -> Deferred[tuple[str, ...]]:
        """
        The addresses C{name} resolves to (empty for NXDOMAIN), from the
        cache or DNS; fails with L{_Unusable} when DNS does not say.
        """
        cached = self.cache.get(name)
        if cached is not None:
            return succeed(cached)
        d: Deferred[Any] = self.resolver.lookupAddress(name, self._timeout)
        return d.addCallbacks(self._found, self._failed, callbackArgs=(name,), errbackArgs=(name,))

    def _found(self, result: tuple[list[dns.RRHeader], Any, Any], name: str) -> tuple[str, ...]:
        answers = [rr for rr in result[0] if rr.type == dns.A]
        addresses = tuple(rr.payload.dottedQuad() for rr in answers)  # type: ignore[union-attr]
        ttl = float(min(rr.ttl for rr in answers)) if addresses else self._negativeTTL(result[1])
        self.cache.put(name, addresses, min(ttl, self.maxCacheTTL))
        return addresses

    def _failed(self, f: Failure, name: str) -> tuple[str, ...]:
        if f.check(error.DNSNameError):
            args = getattr(f.value, "args", ())
            message = args[0] if args else None
            authority = getattr(message, "authority", ())
            self.cache.put(name, (), min(self._negativeTTL(authority), self.maxCacheTTL))
            return ()
        raise _Unusable(f.getErrorMessage() or repr(f.value))

    def _negativeTTL(self, authority: Sequence[dns.RRHeader]) -> float:
        # RFC 2308 5: the SOA's own TTL, capped by its minimum field.
        for rr in authority:
            if rr.type == dns.SOA:
                return float(min(rr.ttl, rr.payload.minimum))  # type: ignore[union-attr]
        return self.negativeTTL


def _zones(section: Section, options: Mapping[str, object], key: str) -> tuple[Zone, ...]:
    """
    Read C{key}: a list of C{zone[=pattern]} (weight 1) or a table of
    C{zone[=pattern]} to weight.
    """
    try:
        if isinstance(options.get(key), dict):
            zones = []
            for spec, weight in section.table(key).items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise ConfigError(f"weight of {spec!r} must be a number")
                zones.append(Zone.parse(spec, float(weight)))
            return tuple(zones)
        return tuple(Zone.parse(spec) for spec in section.strings(key, []))
    except ConfigError as e:
        raise ConfigError(f"{section.title} {key}: {e}") from None


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> DNSBLPolicy:
    """
    Build a C{dnsbl} policy from C{[policy.NAME]}; see
    C{docs/configuration.rst} for the options.
    """
    section = Section(f"[policy.{instanceName}]", options)
    zones = _zones(section, options, "zones")
    allowZones = _zones(section, options, "allow_zones")
    threshold = section.number("threshold", 1.0, minimum=0.001)
    exempt = networks(section, "exempt_networks", ())
    cacheSize = section.integer("cache_size", 10_000, minimum=1)
    maxCacheTTL = section.number("max_cache_ttl", 86400.0, minimum=0)
    negativeTTL = section.number("negative_ttl", 300.0, minimum=0)
    dnsTimeout = section.number("dns_timeout", 5.0, minimum=1)
    section.finish()
    if not zones:
        raise ConfigError(f"{section.title} needs 'zones'")
    return DNSBLPolicy(
        instanceName,
        context.resolver(),
        context.reactor,
        zones,
        allowZones,
        threshold,
        exempt,
        cacheSize,
        maxCacheTTL,
        negativeTTL,
        dnsTimeout,
    )
