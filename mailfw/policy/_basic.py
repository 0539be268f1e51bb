"""
The C{basic-checks} policy: the cheap checks every Internet MX makes before
spending anything on a message.

  - HELO syntax: a host name made of letters, digits, C{-} and C{_} (a
    fully qualified one unless C{helo_fqdn = false}) or an address
    literal; anything else gets 501 5.5.2 (Postfix's
    C{reject_invalid_helo_hostname} and C{reject_non_fqdn_helo_hostname}).
  - Forged HELO: a client without relay rights that greets with one of our
    own names or addresses gets 550 5.7.1.
  - The sender's domain: with no MX and no address record it gets
    C{unknown_sender_code} (450 4.1.8 by default, as Postfix's
    C{unknown_address_reject_code}; 550 5.1.8 when set to 550); a null MX
    (RFC 7505) gets 550 5.7.27.  A DNS timeout or SERVFAIL is temporary:
    451 4.4.3, never a refusal.  Answers are kept for C{sender_cache_ttl}
    seconds (failures are not), since most mail comes from few domains.
  - Routing tricks in a recipient's local part, from clients without relay
    rights: C{user%other@ours}, C{other!user@ours} and
    C{"user@other"@ours} get 550 5.1.3 (once, mail servers forwarded such
    addresses to C{other}; an open relay by another name).  An address the
    C{alias_file} maps, or one listed in C{allow_recipients}, is let
    through: the operator meant it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.delivery._aliases import AliasSyntaxError, AliasTable, loadTable
from mailfw.delivery._maildir import ThreadPoolRunner
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.policy import CONTINUE, Policy, Verdict
from mailfw.policy._cache import TTLCache
from mailfw.reply import SMTPReply
from mailfw.routing._mx import DNS_FAILURE, NO_MAIL_HOST, NO_SUCH_DOMAIN, NULL_MX, MXResolver

__all__ = [
    "BAD_HELO",
    "FORGED_HELO",
    "NON_FQDN_HELO",
    "ROUTING_TRICK",
    "BasicChecksPolicy",
    "fromConfig",
    "heloProblem",
]

BAD_HELO = SMTPReply(501, "5.5.2", "Invalid HELO name")
NON_FQDN_HELO = SMTPReply(501, "5.5.2", "HELO name must be a fully qualified domain name")
FORGED_HELO = SMTPReply(550, "5.7.1", "HELO name is ours: you are not me")
ROUTING_TRICK = SMTPReply(550, "5.1.3", "Routing characters (%, ! or @) in the local part are not accepted")
NULL_MX_SENDER = SMTPReply(550, "5.7.27", "Sender domain does not accept mail (null MX)")
SENDER_DNS_FAILURE = SMTPReply(451, "4.4.3", "Temporary DNS failure looking up the sender domain")

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def heloProblem(name: str, fqdn: bool = True) -> SMTPReply | None:
    """
    What is wrong with the HELO name C{name}, or C{None}.

    @param fqdn: whether a host name needs a dot (literals always pass).
    """
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
            version = 6
        else:
            version = 4
        try:
            return None if ipaddress.ip_address(literal).version == version else BAD_HELO
        except ValueError:
            return BAD_HELO
    host = name[:-1] if name.endswith(".") else name
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        return BAD_HELO
    if host.replace(".", "").isdigit():
        # A bare dotted quad: RFC 5321 4.1.3 asks for brackets.
        return BAD_HELO
    if fqdn and "." not in host:
        return NON_FQDN_HELO
    return None


def _literalAddress(name: str) -> str | None:
    if not (name.startswith("[") and name.endswith("]")):
        return None
    literal = name[1:-1]
    if literal[:5].lower() == "ipv6:":
        literal = literal[5:]
    try:
        return ipaddress.ip_address(literal).compressed
    except ValueError:
        return None


class BasicChecksPolicy(Policy):
    """
    HELO, sender domain and recipient local part checks; see the module's
    description.

    @ivar ownNames: our host names, lowercase without a trailing dot.
    @ivar ownAddresses: our addresses, compressed.
    @ivar resolver: looks up sender domains, or C{None} not to.
    @ivar unknownSender: the reply for a sender domain that does not exist.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        ownNames: Sequence[str] = (),
        ownAddresses: Sequence[str] = (),
        resolver: MXResolver | None = None,
        unknownSenderCode: int = 450,
        heloSyntax: bool = True,
        heloFQDN: bool = True,
        routingTricks: bool = True,
        allowRecipients: Sequence[str] = (),
        aliases: _AliasFile | None = None,
        clock: IReactorTime | None = None,
        senderCacheTTL: float = 300.0,
        senderCacheSize: int = 10_000,
    ) -> None:
        self.name = name
        self.ownNames = frozenset(n.lower().rstrip(".") for n in ownNames)
        self.ownAddresses = frozenset(ipaddress.ip_address(a).compressed for a in ownAddresses)
        self.resolver = resolver
        if unknownSenderCode == 550:
            self.unknownSender = SMTPReply(550, "5.1.8", "Sender address rejected: domain not found")
        else:
            self.unknownSender = SMTPReply(450, "4.1.8", "Sender address rejected: domain not found")
        self.heloSyntax = heloSyntax
        self.heloFQDN = heloFQDN
        self.routingTricks = routingTricks
        self.allowRecipients = frozenset(a.lower() for a in allowRecipients)
        self.aliases = aliases
        self.senderCacheTTL = senderCacheTTL
        self.senderCache: TTLCache[Verdict] | None = None
        if clock is not None and senderCacheTTL > 0:
            self.senderCache = TTLCache(clock, senderCacheSize)

    def checkHelo(self, session: Session, name: str) -> Verdict:
        if self.heloSyntax:
            problem = heloProblem(name, self.heloFQDN)
            if problem is not None:
                return Verdict(problem)
        if session.relayClient:
            return CONTINUE
        literal = _literalAddress(name)
        if (literal is not None and literal in self.ownAddresses) or name.lower().rstrip(
            "."
        ) in self.ownNames:
            self.log.info(
                "basic-checks {policy}: {peer} greeted with our own name {helo!r}",
                policy=self.name,
                peer=session.peerHost,
                helo=name,
            )
            return Verdict(FORGED_HELO)
        return CONTINUE

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        if self.resolver is None or sender is None or sender.domain.startswith("["):
            return CONTINUE
        domain = sender.domain
        if self.senderCache is not None:
            cached = self.senderCache.get(domain)
            if cached is not None:
                return cached
        return self.resolver.resolveDomain(domain).addCallback(self._judgeDomain, domain)

    def _judgeDomain(self, resolution: object, domain: str) -> Verdict:
        failure = getattr(resolution, "failure", None)
        if failure is DNS_FAILURE:
            # Temporary: not cached, the next message asks again.
            return Verdict(SENDER_DNS_FAILURE)
        if failure is NO_SUCH_DOMAIN or failure is NO_MAIL_HOST:
            verdict = Verdict(self.unknownSender)
        elif failure is NULL_MX:
            verdict = Verdict(NULL_MX_SENDER)
        else:
            # Hosts found, or MX hosts without addresses (a broken zone its
            # owner will fix; Postfix accepts these too).
            verdict = CONTINUE
        if self.senderCache is not None:
            self.senderCache.put(domain, verdict, self.senderCacheTTL)
        return verdict

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        address = recipient.address
        if not self.routingTricks or session.relayClient:
            return CONTINUE
        local = address.unquotedLocalpart
        if not ("%" in local or "!" in local or "@" in local):
            return CONTINUE
        if str(address).lower() in self.allowRecipients:
            return CONTINUE
        if self.aliases is None:
            return succeed(self._trick(session, address))
        return self.aliases.maps(address).addCallback(
            lambda mapped: CONTINUE if mapped else self._trick(session, address)
        )

    def _trick(self, session: Session, address: Address) -> Verdict:
        self.log.info(
            "basic-checks {policy}: refused routing in the local part of {recipient} from {peer}",
            policy=self.name,
            recipient=str(address),
            peer=session.peerHost,
        )
        return Verdict(ROUTING_TRICK)


class _AliasFile:
    """
    The alias file (the C{aliases} delivery agent's format), read again in
    a thread when it changed, and only when an address needs it.
    """

    log = Logger()

    def __init__(
        self, path: Path, table: AliasTable, stamp: object, runInThread: Callable[..., Deferred[object]]
    ) -> None:
        self.path = path
        self.table = table
        self.stamp = stamp
        self.runInThread = runInThread

    def maps(self, address: Address) -> Deferred[bool]:
        """
        Whether the file, as it is now, has an alias for C{address}.
        """
        d = self.runInThread(self._reload)
        return d.addCallback(lambda _: self.table.lookup(address) is not None)

    def _reload(self) -> None:
        # In a thread: stat, and parse only if the file changed.  A file
        # that became unreadable or invalid keeps the last good table.
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self.stamp:
                return
            stamp, table = loadTable(self.path, 1_000_000)
        except (OSError, AliasSyntaxError) as e:
            self.log.warn("basic-checks: cannot reload {path}: {why}", path=str(self.path), why=str(e))
            return
        self.table, self.stamp = table, (stamp.mtime, stamp.size, stamp.inode)


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> BasicChecksPolicy:
    """
    Build a C{basic-checks} policy from C{[policy.NAME]}; see
    C{docs/configuration.rst} for the options.
    """
    section = Section(f"[policy.{instanceName}]", options)
    heloSyntax = section.flag("helo_syntax", True)
    heloFQDN = section.flag("helo_fqdn", True)
    ownNames = section.strings("own_names", [context.hostname])
    ownAddresses = section.strings("own_addresses", [])
    senderDomain = section.flag("sender_domain", True)
    unknownCode = section.integer("unknown_sender_code", 450)
    senderCacheTTL = section.number("sender_cache_ttl", 300.0, minimum=0)
    routingTricks = section.flag("routing_tricks", True)
    allowRecipients = section.strings("allow_recipients", [])
    aliasFile = section.text("alias_file", None)
    section.finish()
    if unknownCode not in (450, 550):
        raise ConfigError(f"{section.title} unknown_sender_code: must be 450 or 550")
    for text in ownAddresses:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{section.title} own_addresses: bad address {text!r}") from None
    for text in allowRecipients:
        if "@" not in text:
            raise ConfigError(f"{section.title} allow_recipients: {text!r} is not an address")
    aliases = None
    if aliasFile is not None:
        path = Path(aliasFile) if os.path.isabs(aliasFile) else context.path(aliasFile)
        try:
            # At start-up, before the reactor runs.
            stamp, table = loadTable(path, 1_000_000)
        except OSError as e:
            raise ConfigError(f"{section.title} alias_file: cannot read {path}: {e.strerror}") from None
        except AliasSyntaxError as e:
            raise ConfigError(f"{section.title} alias_file: {e}") from None
        runner = ThreadPoolRunner(context.reactor, f"mailfw-basic-{instanceName}", 1)
        aliases = _AliasFile(path, table, (stamp.mtime, stamp.size, stamp.inode), runner)
    resolver = MXResolver(context.resolver(), maxAddresses=1, timeout=(1, 3, 5)) if senderDomain else None
    return BasicChecksPolicy(
        instanceName,
        ownNames,
        ownAddresses,
        resolver,
        unknownCode,
        heloSyntax,
        heloFQDN,
        routingTricks,
        allowRecipients,
        aliases,
        context.reactor,
        senderCacheTTL,
    )
