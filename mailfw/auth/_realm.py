"""
The avatar of an authenticated mail user and the realm that makes it.

A successful C{AUTH} logs in through a L{twisted.cred.portal.Portal}; the
realm turns the checker's avatar ID into an L{IMailUser}, which says which
sender addresses the user may use and which domains it may flush with
ETRN (L{mailfw.interfaces.IMailUser}).

With a hosting table (L{mailfw.interfaces.IHostingTable}), the realm also
asks it at login which addresses the user may send as: its own mailbox
(when the user name is a mailbox address) and the rights that C{mailfw
sender allow} granted.  They are read once per login, so a change applies
from the user's next AUTH; a table that cannot be read fails the login
with a temporary error (454) rather than guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.etrn import domainCovered
from mailfw.interfaces import IHostingTable, IMailUser

__all__ = ["SENDER_CHECKS", "IMailUser", "MailRealm", "MailUser", "useHostedSenders"]

SENDER_CHECKS = ("exact", "domain", "any")


def _domainOf(pattern: str) -> str:
    return pattern.rpartition("@")[2]


@implementer(IMailUser)
@dataclass(frozen=True)
class MailUser:
    """
    An L{IMailUser} from a password file line or the configuration.

    @ivar senderCheck: C{"exact"}: the sender must match one of C{senders}
        (an address matches its own pattern, ignoring case; C{@domain}
        matches every address in that domain; C{*} every address);
        C{"domain"}: any address in the domain of one of C{senders};
        C{"any"}: any sender.
    @ivar allowNullSender: whether C{MAIL FROM:<>} is allowed (read
        receipts and other notifications use it).
    """

    identity: str
    senders: tuple[str, ...] = ()
    etrnDomains: tuple[str, ...] = ()
    senderCheck: str = "exact"
    allowNullSender: bool = True

    def maySend(self, sender: Address | None) -> bool:
        if sender is None:
            return self.allowNullSender
        if self.senderCheck == "any":
            return True
        domain = sender.domain
        mailbox = f"{sender.localpart.lower()}@{domain}"
        for pattern in self.senders:
            if pattern == "*":
                return True
            if pattern.startswith("@"):
                if pattern[1:] == domain:
                    return True
            elif self.senderCheck == "domain":
                if _domainOf(pattern) == domain:
                    return True
            elif pattern.lower() == mailbox:
                return True
        return False

    def mayFlush(self, domain: str) -> bool:
        try:
            domain = normaliseDomain(domain.rstrip("."))
        except AddressError:
            return False
        return domainCovered(self.etrnDomains, domain)


def _defaultSenders(identity: str) -> tuple[str, ...]:
    """
    A user called by an address may send as that address.
    """
    try:
        return (str(Address.parse(identity, utf8=True)),)
    except AddressError:
        return ()


@implementer(IRealm)
class MailRealm:
    """
    Makes L{MailUser} avatars.

    @param lookup: gives the sender patterns and ETRN domains a checker
        knows for an avatar ID (the password file's third and fourth
        fields), or C{None}.
    @param senders: extra sender patterns per user, from C{[auth] senders}.
    @param etrn: extra ETRN domains per user, from C{[auth] etrn}.
    @ivar hosting: the hosting table whose sender rights are added at
        login, or C{None}.
    """

    def __init__(
        self,
        lookup: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]] | None] | None = None,
        senders: Mapping[str, tuple[str, ...]] | None = None,
        etrn: Mapping[str, tuple[str, ...]] | None = None,
        senderCheck: str = "exact",
        allowNullSender: bool = True,
        hosting: IHostingTable | None = None,
    ) -> None:
        if senderCheck not in SENDER_CHECKS:
            raise ValueError(f"senderCheck must be one of {', '.join(SENDER_CHECKS)}")
        self._lookup = lookup
        self._senders = dict(senders or {})
        self._etrn = dict(etrn or {})
        self.senderCheck = senderCheck
        self.allowNullSender = allowNullSender
        self.hosting = hosting

    def avatarFor(self, avatarId: str, hostedSenders: tuple[str, ...] = ()) -> MailUser:
        """
        The avatar for C{avatarId}, with every right known for it.

        @param hostedSenders: the sender patterns the hosting table gives it.
        """
        known = self._lookup(avatarId) if self._lookup is not None else None
        senders, etrn = known if known is not None else ((), ())
        senders = senders + self._senders.get(avatarId, ())
        senders += tuple(s for s in hostedSenders if s not in senders)
        etrn = etrn + self._etrn.get(avatarId, ())
        if not senders:
            senders = _defaultSenders(avatarId)
        return MailUser(avatarId, senders, etrn, self.senderCheck, self.allowNullSender)

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, object, Callable[[], None]] | Deferred[tuple[Any, object, Callable[[], None]]]:
        if IMailUser not in interfaces:
            # twisted.cred's documented answer for "no avatar of that kind".
            raise NotImplementedError("MailRealm only makes IMailUser avatars")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        identity = str(avatarId)
        if self.hosting is None:
            return IMailUser, self.avatarFor(identity), lambda: None
        return self.hosting.sendersFor(identity).addCallback(
            lambda hosted: (IMailUser, self.avatarFor(identity, hosted), lambda: None)
        )


def useHostedSenders(portal: Portal, router: object) -> bool:
    """
    Let the portal's L{MailRealm} consult the hosting table that C{router}
    reads (C{[routing] virtual}), so that one table answers both "is this
    a mailbox?" and "may this user send as it?".

    @return: whether the realm now consults a table.
    """
    hosting = getattr(router, "hosting", None)
    realm = portal.realm
    if hosting is None or not isinstance(realm, MailRealm) or not IHostingTable.providedBy(hosting):
        return False
    realm.hosting = hosting
    return True
