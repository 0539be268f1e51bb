"""
Finding the hosts that receive mail for a domain, with L{twisted.names}.

RFC 5321 section 5.1 in short: look up the domain's MX records and try
their hosts in order of preference, shuffling hosts of equal preference;
with no MX records at all the domain itself is the only host (the
implicit MX).  RFC 7505 adds the null MX (a single C{0 .}): the domain
receives no mail, which is a permanent failure without any connection.

Every outcome is a value: a L{Resolution} carries either the addresses to
try, in order, or the reply that every recipient of the domain gets.  DNS
answers mean permanent failures only when they say so for certain (the
domain does not exist, or says it takes no mail); timeouts, SERVFAIL and
anything unexpected are transient (4.4.3), so a DNS outage delays mail
instead of bouncing it.

All lookups go through an L{IResolver} (normally the shared
C{twisted.names.client.Resolver} from
L{mailfw.config.ComponentContext.resolver}), never through the blocking
C{getaddrinfo}.
"""

from __future__ import annotations

import ipaddress
import random as _random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure

from mailfw.reply import SMTPReply

__all__ = [
    "DNS_FAILURE",
    "NO_SUCH_DOMAIN",
    "NULL_MX",
    "MXResolver",
    "MailHost",
    "Resolution",
]

NULL_MX = SMTPReply(556, "5.1.10", "Recipient domain does not accept mail (null MX)")
NO_SUCH_DOMAIN = SMTPReply(550, "5.1.2", "Recipient domain not found in DNS")
NO_MAIL_HOST = SMTPReply(550, "5.1.2", "Recipient domain has no mail host")
DNS_FAILURE = SMTPReply(451, "4.4.3", "Temporary DNS failure looking up the mail host")
NO_ADDRESS = SMTPReply(451, "4.4.3", "No address found for any mail host")

# CNAME chains longer than this are treated as loops (transient: a broken
# zone is usually fixed soon).
MAX_CNAME_CHAIN = 8


@dataclass(frozen=True)
class MailHost:
    """
    One address to try.

    @ivar name: the host name it belongs to (the MX exchange, the domain
        for the implicit MX, or the configured host), lowercase without a
        trailing dot.  TLS verification checks the certificate against it
        and DSNs name it as the remote MTA.
    @ivar address: an IPv4 or IPv6 address as text.
    @ivar preference: the MX preference (0 for implicit MX and fixed hosts).
    """

    name: str
    address: str
    preference: int = 0


@dataclass(frozen=True)
class Resolution:
    """
    The result of resolving a next hop.

    @ivar hosts: addresses to try, in order; empty when C{failure} is set.
    @ivar failure: the reply for every recipient when there is nothing to
        try (5xx: bounce; 4xx: retry later).
    """

    hosts: tuple[MailHost, ...] = ()
    failure: SMTPReply | None = None


class _Transient(Exception):
    """
    A lookup failed in a way that may succeed later.
    """


class _NoSuchName(Exception):
    """
    The name does not exist (NXDOMAIN).
    """


def _text(name: dns.Name) -> str:
    return name.name.decode("ascii", "replace").rstrip(".").lower()


def _follow(answers: Sequence[dns.RRHeader], name: str) -> tuple[str, bool]:
    """
    Follow a CNAME chain within one answer section.

    @return: the canonical name, and whether any CNAME was followed.
    """
    followed = False
    for _ in range(MAX_CNAME_CHAIN):
        for rr in answers:
            if rr.type == dns.CNAME and _text(rr.name) == name:
                name = _text(rr.payload.name)  # type: ignore[union-attr]
                followed = True
                break
        else:
            return name, followed
    raise _Transient("CNAME chain too long")


class MXResolver:
    """
    Resolves domains and host names to L{MailHost}s.

    @ivar resolver: the DNS resolver.
    @ivar random: shuffles MX hosts of equal preference; tests pass a
        seeded C{random.Random}.
    @ivar families: which address families to use, in order of
        preference for the addresses of one host: C{"ipv6"} and/or
        C{"ipv4"}.
    @ivar maxAddresses: stop after this many addresses (RFC 5321 5.1 asks
        senders to bound the attempts per delivery).
    @ivar timeout: the retransmission timeouts of each query, in seconds
        (the default of L{twisted.names.client.Resolver}: a minute in all).
    """

    log = Logger()

    def __init__(
        self,
        resolver: IResolver,
        random: _random.Random | None = None,
        families: Sequence[str] = ("ipv6", "ipv4"),
        maxAddresses: int = 5,
        timeout: Sequence[int] = (1, 3, 11, 45),
    ) -> None:
        for family in families:
            if family not in ("ipv4", "ipv6"):
                raise ValueError(f"unknown address family {family!r}")
        self.resolver = resolver
        self.random = random if random is not None else _random.Random()
        self.families = tuple(families)
        self.maxAddresses = maxAddresses
        self.timeout = tuple(timeout)

    # --- one query ---------------------------------------------------------

    @inlineCallbacks
    def _query(self, kind: int, name: str) -> Any:
        """
        Look up records of C{kind} for C{name}, following CNAMEs (also
        across queries, when the answer stops at a CNAME).

        @return: (canonical name, records of C{kind} at that name, whether
            a CNAME was followed); fails with L{_NoSuchName} or
            L{_Transient}.
        """
        lookups = {
            dns.MX: self.resolver.lookupMailExchange,
            dns.A: self.resolver.lookupAddress,
            dns.AAAA: self.resolver.lookupIPV6Address,
        }
        original = name
        aliased = False
        for _ in range(MAX_CNAME_CHAIN):
            started, outcome = time.monotonic(), "error"
            try:
                result = yield lookups[kind](name, self.timeout)
                answers, _authority, _additional = result
                outcome = "ok"
            except error.DNSNameError:
                outcome = "nxdomain"
                raise _NoSuchName(name) from None
            except Exception as e:
                raise _Transient(f"{dns.QUERY_TYPES.get(kind, kind)} {name}: {e!r}") from None
            finally:
                # No format: for the DNS latency and error metrics only.
                self.log.debug(
                    event="dns.lookup",
                    kind=dns.QUERY_TYPES.get(kind, str(kind)),
                    name=name,
                    outcome=outcome,
                    duration=time.monotonic() - started,
                )
            canonical, followed = _follow(answers, name)
            aliased = aliased or followed
            records = [rr for rr in answers if rr.type == kind and _text(rr.name) == canonical]
            if records or not followed:
                return canonical, records, aliased
            # The answer ended at a CNAME: ask again for the target.
            name = canonical
        raise _Transient(f"CNAME chain too long for {original}")

    # --- host addresses ----------------------------------------------------

    @inlineCallbacks
    def _addresses(self, host: str) -> Any:
        """
        The addresses of C{host} in family order.

        @return: a list of address texts; fails with L{_NoSuchName} if the
            host does not exist, L{_Transient} if no family could be
            looked up and none gave an address.
        """
        try:
            return [ipaddress.ip_address(host).compressed]
        except ValueError:
            pass
        kinds = [dns.AAAA if f == "ipv6" else dns.A for f in self.families]
        results = yield DeferredList([self._query(kind, host) for kind in kinds], consumeErrors=True)
        addresses: list[str] = []
        transient: Failure | None = None
        missing = 0
        for (ok, result), kind in zip(results, kinds, strict=False):
            if not ok:
                if result.check(_NoSuchName):
                    missing += 1
                else:
                    transient = result
                continue
            _canonical, records, _aliased = result
            for rr in records:
                if kind == dns.A:
                    addresses.append(rr.payload.dottedQuad())
                else:
                    addresses.append(ipaddress.IPv6Address(rr.payload.address).compressed)
        if addresses:
            return addresses
        if transient is not None:
            raise _Transient(str(transient.value))
        if missing:
            raise _NoSuchName(host)
        return []

    # --- public ------------------------------------------------------------

    @inlineCallbacks
    def resolveDomain(self, domain: str) -> Any:
        """
        Resolve a mail domain through its MX records (or the implicit MX).

        @param domain: a domain in lowercase A-labels.
        @return: a L{Deferred} firing with a L{Resolution}; it does not fail.
        """
        try:
            canonical, records, _ = yield self._query(dns.MX, domain)
        except _NoSuchName:
            self.log.info("Domain {nexthop} does not exist", nexthop=domain)
            return Resolution(failure=NO_SUCH_DOMAIN)
        except _Transient as e:
            self.log.info("MX lookup for {nexthop} failed: {why}", nexthop=domain, why=str(e))
            return Resolution(failure=DNS_FAILURE)

        if not records:
            return (yield self._implicit(domain, canonical))

        exchanges = [(rr.payload.preference, _text(rr.payload.name)) for rr in records]
        usable = [(p, n) for p, n in exchanges if n]
        if not usable:
            # RFC 7505: "0 ." alone (we accept any preference) means no mail.
            self.log.info("Domain {nexthop} has a null MX", nexthop=domain)
            return Resolution(failure=NULL_MX)

        byPreference: dict[int, list[str]] = {}
        for preference, name in usable:
            if name not in byPreference.setdefault(preference, []):
                byPreference[preference].append(name)
        ordered: list[tuple[int, str]] = []
        for preference in sorted(byPreference):
            names = sorted(byPreference[preference])
            self.random.shuffle(names)
            ordered.extend((preference, name) for name in names)

        hosts: list[MailHost] = []
        transient = False
        for preference, name in ordered:
            if len(hosts) >= self.maxAddresses:
                break
            try:
                addresses = yield self._addresses(name)
            except _NoSuchName:
                self.log.info("MX host {host} of {nexthop} does not exist", host=name, nexthop=domain)
                continue
            except _Transient as e:
                self.log.info(
                    "Address lookup for MX host {host} of {nexthop} failed: {why}",
                    host=name,
                    nexthop=domain,
                    why=str(e),
                )
                transient = True
                continue
            for address in addresses:
                hosts.append(MailHost(name, address, preference))
        if hosts:
            return Resolution(tuple(hosts[: self.maxAddresses]))
        if transient:
            return Resolution(failure=DNS_FAILURE)
        # Every MX host is missing or has no address: likely a broken zone
        # that its owner will fix, so retry rather than bounce.
        return Resolution(failure=NO_ADDRESS)

    @inlineCallbacks
    def _implicit(self, domain: str, canonical: str) -> Any:
        try:
            addresses = yield self._addresses(canonical)
        except _NoSuchName:
            return Resolution(failure=NO_SUCH_DOMAIN)
        except _Transient as e:
            self.log.info("Address lookup for {nexthop} failed: {why}", nexthop=domain, why=str(e))
            return Resolution(failure=DNS_FAILURE)
        if not addresses:
            return Resolution(failure=NO_MAIL_HOST)
        return Resolution(tuple(MailHost(canonical, a) for a in addresses[: self.maxAddresses]))

    @inlineCallbacks
    def resolveHost(self, host: str) -> Any:
        """
        Resolve a configured host (C{[host]} in a next hop): its addresses
        only, no MX.  Every failure is transient, because the fault lies
        in our configuration or the network, not with the recipient.

        @return: a L{Deferred} firing with a L{Resolution}; it does not fail.
        """
        try:
            addresses = yield self._addresses(host)
        except (_NoSuchName, _Transient) as e:
            self.log.info("Address lookup for {nexthop} failed: {why!r}", nexthop=host, why=e)
            return Resolution(failure=DNS_FAILURE)
        if not addresses:
            return Resolution(failure=NO_ADDRESS)
        return Resolution(tuple(MailHost(host, a) for a in addresses[: self.maxAddresses]))

    def resolve(self, nexthop: str) -> Deferred[Resolution]:
        """
        Resolve a next hop as written in a route: a domain (MX) or
        C{[host]}/C{[host]:port} (addresses of that host; the port is the
        caller's business).

        @raise mailfw.routing.NexthopError: if C{nexthop} is malformed.
        """
        from mailfw.routing._nexthop import parseNexthop

        parsed = parseNexthop(nexthop)
        if parsed.mx:
            d: Deferred[Resolution] = self.resolveDomain(parsed.host)
        else:
            d = self.resolveHost(parsed.host)
        return d
