"""
The C{static} router: routing decided by the configuration alone.

A recipient is accepted when its domain is one of ours (C{LOCAL}), when it
is a domain we relay for (C{RELAY}, from anyone), or when the client has
relay rights (a C{relay_networks} address, or C{Session.relayClient}, which
the server sets for authenticated users).  Everything else is refused with
554 5.7.1, so an open relay needs an explicit configuration.

Which delivery instance a recipient goes to, and with which next hop,
comes from the C{transport} table, then the C{smarthost}, then the
defaults (C{local_agent} for local domains, C{relay_agent} with an MX
lookup of the recipient's domain for the rest).

Decisions worth knowing:

  - Only the domain decides.  C{user%other@local}, C{"user@other"@local}
    and C{other!user@local} are local parts at a local domain: they are
    routed C{LOCAL} and never reinterpreted as routes elsewhere (the
    classic relay tricks).  Source routes are stripped by the server
    before the router sees the address.
  - Address literals (C{[192.0.2.1]}) are ours only when listed in
    C{local_domains}; we cannot know every address the host answers on.
    Any other literal is a remote domain like any other: relayed only for
    relay clients, directly to that address (no MX lookup).
  - Without a C{relay_agent} instance in the configuration (the embedded
    default has only a C{local} maildir agent) relaying is refused even
    for relay clients, with the same 554 5.7.1.
  - C{recipients}, when given, lists the valid local users, so an unknown
    user is refused at RCPT time (550 5.1.1) instead of bounced later.
    C{postmaster} is always valid (RFC 5321 4.5.1).  The answer is the
    same at delivery time: an address that became invalid after a
    configuration change bounces instead of creating a new mailbox.
  - C{virtual} names a hosting table (L{mailfw.hosting}), read on every
    RCPT (nothing cached, so C{mailfw user add} takes effect at once).  A
    domain hosted there is local.  Its recipients are, in this order: a
    mailbox (routed to the delivery instance its row names, else as any
    local domain: the C{transport} entry, else C{local_agent}); the
    mailbox of the address without its C{+detail}; an alias or the
    domain's catch-all (routed to C{virtual_alias_agent}, an instance of
    plugin C{virtual-aliases}, which expands it into new queued mail);
    C{postmaster} (as a mailbox); anything else is refused 550 5.1.1 at
    RCPT time, so nothing is bounced later.  A table that cannot be read
    gives 451 4.3.0 (the client tries again).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.config import ConfigError, Section
from mailfw.envelope import Route, RouteKind, Session
from mailfw.interfaces import IDescribed, IHostingTable, IRouter
from mailfw.reply import SMTPReply
from mailfw.routing._nexthop import NexthopError, parseNexthop

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["StaticRouter", "fromConfig"]

RELAY_DENIED = SMTPReply(554, "5.7.1", "Relay access denied")
UNKNOWN_USER = SMTPReply(550, "5.1.1", "Mailbox unavailable")
TABLE_UNAVAILABLE = SMTPReply(451, "4.3.0", "Mailbox table unavailable, try again later")
MISCONFIGURED = SMTPReply(451, "4.3.5", "Mailbox misconfigured, try again later")
DETAIL_SEPARATOR = "+"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Transport:
    """
    One value of the transport table (or the smart host).

    @ivar agent: the delivery instance name.
    @ivar nexthop: the next hop as text (normalised), or C{None} to let
        the agent decide (for the relay agent: the recipient's domain).
    """

    agent: str
    nexthop: str | None = None


class DomainSet:
    """
    A set of domains where an entry C{.example.com} stands for every
    subdomain of C{example.com} (not C{example.com} itself, as in
    Postfix), and C{example.com} for exactly that domain.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._exact: set[str] = set()
        self._parents: set[str] = set()
        for entry in entries:
            self.add(entry)

    def add(self, entry: str) -> None:
        if entry.startswith("."):
            self._parents.add(entry[1:])
        else:
            self._exact.add(entry)

    def __iter__(self) -> Iterator[str]:
        """
        The entries, exact domains first, each group sorted.
        """
        yield from sorted(self._exact)
        yield from sorted("." + parent for parent in self._parents)

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        if domain in self._exact:
            return True
        if domain.startswith("["):
            return False
        labels = domain.split(".")
        return any(".".join(labels[i:]) in self._parents for i in range(1, len(labels)))


def _lookupTransport(table: Mapping[str, Transport], domain: str) -> Transport | None:
    """
    The most specific transport entry for C{domain}: the domain itself,
    then C{.parent} entries from the nearest parent up.
    """
    if domain in table:
        return table[domain]
    if domain.startswith("["):
        return None
    labels = domain.split(".")
    for i in range(1, len(labels)):
        found = table.get("." + ".".join(labels[i:]))
        if found is not None:
            return found
    return None


def _peerAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@implementer(IRouter, IDescribed)
@dataclass
class StaticRouter:
    """
    An L{IRouter} driven by tables from the configuration (see the module
    docstring for the rules).

    @ivar localDomains: domains (and address literals) we are the final
        destination for, normalised.
    @ivar relayDomains: domains accepted from anyone and delivered onwards.
    @ivar relayNetworks: client networks that may relay anywhere.
    @ivar relayAgent: the delivery instance for relayed mail, or C{None}
        when relaying is impossible (no such instance is configured).
    @ivar transport: normalised domain (or C{.parent}) to transport.
    @ivar smarthost: where relayed mail goes when no transport entry
        matches, or C{None} for an MX lookup of the recipient's domain.
    @ivar recipients: valid local users as C{localpart@domain},
        C{localpart} (at every local domain) or C{@domain} (anything
        there); C{None} accepts every local part.
    @ivar hosting: the virtual domains' table, or C{None}.
    @ivar virtualAliasAgent: the delivery instance that expands the
        table's aliases.
    @ivar agentNames: the configured delivery instances, to check the
        agent a mailbox row names (the table changes while we run).
    """

    localDomains: DomainSet
    relayDomains: DomainSet = field(default_factory=DomainSet)
    relayNetworks: tuple[_Network, ...] = ()
    localAgent: str = "local"
    relayAgent: str | None = None
    transport: Mapping[str, Transport] = field(default_factory=dict)
    smarthost: str | None = None
    recipients: frozenset[str] | None = None
    caseInsensitive: bool = True
    hosting: IHostingTable | None = None
    virtualAliasAgent: str | None = None
    agentNames: frozenset[str] = frozenset()

    log = Logger()

    def describe(self) -> str:
        text = "static, mail for {} is delivered locally".format(", ".join(self.localDomains))
        if self.hosting is not None:
            described = IDescribed(self.hosting, None)
            text += ", and for the virtual domains of " + (
                described.describe() if described is not None else "the hosting table"
            )
        return text

    def ownedPaths(self) -> list[str]:
        described = IDescribed(self.hosting, None)
        return list(described.ownedPaths()) if described is not None else []

    def route(self, recipient: Address, session: Session | None) -> Deferred[Route]:
        if self.hosting is None or recipient.domain.startswith("["):
            return succeed(self._route(recipient, session))
        return Deferred.fromCoroutine(self._routeHosted(self.hosting, recipient, session))

    async def _routeHosted(
        self, hosting: IHostingTable, recipient: Address, session: Session | None
    ) -> Route:
        try:
            if not await hosting.domain(recipient.domain):
                return self._route(recipient, session)
            return await self._routeVirtual(hosting, recipient)
        except Exception:
            self.log.failure(
                "Cannot read the virtual mailbox table for {recipient}", recipient=str(recipient)
            )
            return Route.refuse(TABLE_UNAVAILABLE)

    async def _routeVirtual(self, hosting: IHostingTable, recipient: Address) -> Route:
        mailbox = await hosting.mailbox(recipient)
        local = recipient.unquotedLocalpart
        if mailbox is None and DETAIL_SEPARATOR in local.lstrip(DETAIL_SEPARATOR):
            base = local.partition(DETAIL_SEPARATOR)[0]
            if base:
                mailbox = await hosting.mailbox(Address(base, recipient.domain))
        if mailbox is not None:
            if mailbox.agent is None:
                return self._localRoute(recipient.domain)
            if mailbox.agent not in self.agentNames:
                self.log.error(
                    "Mailbox {mailbox} names delivery instance {agent!r}, which is not configured",
                    mailbox=mailbox.address,
                    agent=mailbox.agent,
                )
                return Route.refuse(MISCONFIGURED)
            return Route(RouteKind.LOCAL, mailbox.agent, None, name=mailbox.agent)
        if await hosting.aliases(recipient):
            assert self.virtualAliasAgent is not None
            return Route(RouteKind.LOCAL, self.virtualAliasAgent, None, name=self.virtualAliasAgent)
        if local.lower() == "postmaster":
            return self._localRoute(recipient.domain)
        return Route.refuse(UNKNOWN_USER)

    def _localRoute(self, domain: str) -> Route:
        """
        Where mail for a local domain goes: its transport entry, else the
        local agent.
        """
        transport = _lookupTransport(self.transport, domain)
        if transport is not None:
            return Route(RouteKind.LOCAL, transport.agent, transport.nexthop, name=transport.agent)
        return Route(RouteKind.LOCAL, self.localAgent, None, name=self.localAgent)

    def _route(self, recipient: Address, session: Session | None) -> Route:
        domain = recipient.domain
        transport = _lookupTransport(self.transport, domain)
        if domain in self.localDomains:
            if not self._knownUser(recipient):
                return Route.refuse(UNKNOWN_USER)
            return self._localRoute(domain)
        if not (domain in self.relayDomains or self._mayRelay(session)):
            return Route.refuse(RELAY_DENIED)
        if transport is None:
            if self.relayAgent is None:
                self.log.info(
                    "Refusing to relay to {recipient}: no relay delivery agent is configured",
                    recipient=str(recipient),
                )
                return Route.refuse(RELAY_DENIED)
            transport = Transport(self.relayAgent, self.smarthost)
        nexthop = transport.nexthop
        if nexthop is None and domain.startswith("["):
            # Mail to an address literal goes to that address, not to MX.
            nexthop = domain
        return Route(RouteKind.RELAY, transport.agent, nexthop, name=transport.agent)

    def _mayRelay(self, session: Session | None) -> bool:
        if session is None or session.relayClient:
            return True
        address = _peerAddress(session.peerHost)
        return address is not None and any(address in net for net in self.relayNetworks)

    def _knownUser(self, recipient: Address) -> bool:
        local = recipient.unquotedLocalpart
        if local.lower() == "postmaster" or self.recipients is None:
            return True
        if self.caseInsensitive:
            local = local.lower()
        return (
            f"{local}@{recipient.domain}" in self.recipients
            or local in self.recipients
            or f"@{recipient.domain}" in self.recipients
        )


def _domain(section: Section, key: str, text: str, allowParent: bool = True) -> str:
    parent = allowParent and text.startswith(".")
    try:
        domain = normaliseDomain(text[1:] if parent else text)
    except AddressError as e:
        raise ConfigError(f"{section.title} {key}: {text!r}: {e}") from None
    return "." + domain if parent else domain


def _transport(section: Section, key: str, text: str) -> Transport:
    agent, sep, nexthop = text.partition(":")
    if not agent:
        raise ConfigError(f"{section.title} {key}: {text!r} names no delivery instance")
    if not sep:
        return Transport(agent)
    try:
        return Transport(agent, str(parseNexthop(nexthop)))
    except NexthopError as e:
        raise ConfigError(f"{section.title} {key}: {e}") from None


def _recipientEntry(section: Section, key: str, text: str, caseInsensitive: bool) -> str:
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain = text, ""
    if domain:
        domain = _domain(section, key, domain, allowParent=False)
    if local.startswith('"') and local.endswith('"') and len(local) > 1:
        local = local[1:-1]
    if not local and not domain:
        raise ConfigError(f"{section.title} {key}: empty entry")
    if caseInsensitive:
        local = local.lower()
    return f"{local}@{domain}" if at or domain else local


def fromConfig(
    context: ComponentContext,
    instanceName: str,
    options: Mapping[str, object],
    hosting: IHostingTable | None = None,
) -> StaticRouter:
    """
    Build a L{StaticRouter} from C{[routing]}.

    Options: C{local_domains} (default C{["localhost"]}; the server's own
    host name is always local), C{relay_domains}, C{relay_networks}
    (CIDRs), C{local_agent} (default C{"local"}), C{relay_agent} (default
    C{"outbound"}), C{transport} (table: domain or C{.parent} to
    C{"agent"} or C{"agent:nexthop"}), C{smarthost} (a next hop, or
    C{"agent:nexthop"}), C{recipients} and C{recipients_file} (valid local
    users), C{local_parts_case_insensitive} (default true), C{virtual}
    (C{"sqlite:PATH"} or C{"postgresql:CONNINFO"}: the hosting table) with
    C{virtual_alias_agent} (default C{"virtual-aliases"}) and
    C{virtual_threads} (default 4).

    @param hosting: the hosting table to use instead of opening the one
        C{virtual} names (tests).

    @raise ConfigError: naming the bad key.
    """
    section = Section("[routing]", options)
    known = context.agentNames

    def agentName(key: str, name: str) -> str:
        if name not in known:
            raise ConfigError(
                f"{section.title} {key}: no delivery instance named {name!r} "
                f"(configured: {', '.join(sorted(known)) or 'none'})"
            )
        return name

    localDomains = DomainSet(
        _domain(section, "local_domains", d) for d in section.strings("local_domains", ["localhost"])
    )
    # A host name that is not a valid mail domain cannot receive mail.
    with contextlib.suppress(AddressError):
        localDomains.add(normaliseDomain(context.hostname))
    relayDomains = DomainSet(
        _domain(section, "relay_domains", d) for d in section.strings("relay_domains", [])
    )
    networks: list[_Network] = []
    for text in section.strings("relay_networks", []):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{section.title} relay_networks: bad network {text!r}") from None

    localAgent = agentName("local_agent", section.text("local_agent", "local"))
    relayAgent: str | None
    if section.has("relay_agent"):
        relayAgent = agentName("relay_agent", section.text("relay_agent"))
    else:
        relayAgent = "outbound" if "outbound" in known else None

    transport: dict[str, Transport] = {}
    for key, value in section.table("transport", {}).items():
        if not isinstance(value, str):
            raise ConfigError(f"{section.title} transport.{key}: expected a string")
        entry = _transport(section, f"transport.{key}", value)
        agentName(f"transport.{key}", entry.agent)
        transport[_domain(section, f"transport.{key}", key)] = entry

    smarthost: str | None = None
    smarthostText = section.text("smarthost", None)
    if smarthostText is not None:
        if not smarthostText.startswith("[") and ":" in smarthostText:
            # "agent:nexthop": the smart host has its own delivery instance
            # (for example one with AUTH credentials).
            entry = _transport(section, "smarthost", smarthostText)
            relayAgent = agentName("smarthost", entry.agent)
            smarthost = entry.nexthop
        else:
            if relayAgent is None:
                raise ConfigError(
                    f"{section.title} smarthost: needs a relay delivery instance "
                    '(add [delivery.outbound] plugin = "smtp-relay", or set relay_agent)'
                )
            try:
                smarthost = str(parseNexthop(smarthostText))
            except NexthopError as e:
                raise ConfigError(f"{section.title} smarthost: {e}") from None

    if relayAgent is None:
        orphans = [d for d in section.strings("relay_domains", [])]
        uncovered = [
            d
            for d in orphans
            if _lookupTransport(transport, _domain(section, "relay_domains", d).lstrip(".")) is None
        ]
        if uncovered:
            raise ConfigError(
                f"{section.title} relay_domains: {uncovered[0]!r} has no transport entry "
                "and there is no relay delivery instance (set relay_agent)"
            )

    caseInsensitive = section.flag("local_parts_case_insensitive", True)
    entries = list(section.strings("recipients", []))
    recipientsFile = section.text("recipients_file", None)
    if recipientsFile is not None:
        path = Path(recipientsFile)
        if not path.is_absolute():
            path = context.path(recipientsFile)
        try:
            # Read once at start-up, before the reactor runs.
            lines = path.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{section.title} recipients_file: cannot read {path}: {e}") from None
        entries.extend(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    recipients: frozenset[str] | None = None
    if section.has("recipients") or recipientsFile is not None:
        recipients = frozenset(_recipientEntry(section, "recipients", e, caseInsensitive) for e in entries)
    virtual = section.text("virtual", None)
    aliasAgent = section.text("virtual_alias_agent", "virtual-aliases")
    threads = section.integer("virtual_threads", 4, minimum=1)
    section.finish()
    virtualAliasAgent: str | None = None
    if virtual is not None:
        if aliasAgent not in known:
            raise ConfigError(
                f"{section.title} virtual_alias_agent: the virtual table's aliases need a delivery instance "
                f'named {aliasAgent!r}: add [delivery.{aliasAgent}] plugin = "virtual-aliases" '
                f"with the same virtual = {virtual!r}"
            )
        virtualAliasAgent = aliasAgent
        if hosting is None:
            from mailfw.delivery._maildir import ThreadPoolRunner
            from mailfw.hosting._sql import tableFromText

            runner = ThreadPoolRunner(context.reactor, "mailfw-virtual", threads)
            hosting = tableFromText(virtual, context.dataDir, runner, f"{section.title} virtual")
    else:
        hosting = None

    return StaticRouter(
        localDomains=localDomains,
        relayDomains=relayDomains,
        relayNetworks=tuple(networks),
        localAgent=localAgent,
        relayAgent=relayAgent,
        transport=transport,
        smarthost=smarthost,
        recipients=recipients,
        caseInsensitive=caseInsensitive,
        hosting=hosting,
        virtualAliasAgent=virtualAliasAgent,
        agentNames=frozenset(known),
    )
