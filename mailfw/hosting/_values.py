"""
The values of the hosting tables (virtual domains, mailboxes, aliases and
sender rights) and the rules that normalise their keys.  They sit below
L{mailfw.interfaces}, which names them, so they import only other values.

Keys are compared in one form everywhere: the domain normalised by
L{normaliseDomain} (lower case, IDNA as U-labels) and the local part
lower-cased, because a hosting table that told C{Alice@} from C{alice@}
would refuse mail that every other mail system delivers.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailfw.address import Address, AddressError, normaliseDomain

__all__ = [
    "AliasEntry",
    "HostingError",
    "Mailbox",
    "SenderRight",
    "addressKey",
    "aliasKey",
    "domainKey",
    "senderKey",
]


class HostingError(ValueError):
    """
    An operation on a hosting table was refused: a bad address, a domain
    that is not hosted, a domain that still has mailboxes.  The message is
    meant for the operator, as one line.
    """


@dataclass(frozen=True)
class Mailbox:
    """
    One mailbox of a virtual domain.  Passwords are not here: they stay in
    the AUTH backend, so one user can be a mailbox without a password
    (mail only) or log in without being a mailbox.

    @ivar address: the key, C{local@domain} (see L{addressKey}).
    @ivar agent: the delivery instance for its mail, or C{None} for the
        router's C{local_agent}.
    @ivar path: where the mailbox lives, for agents that can use a path of
        their own per recipient; C{None} lets the agent's template decide.
    @ivar messagesPerHour: a sending quota for the user of this address,
        or C{None} for no limit (read by sending quotas, not by routing).
    @ivar messagesPerDay: the same per day.
    """

    address: str
    agent: str | None = None
    path: str | None = None
    messagesPerHour: int | None = None
    messagesPerDay: int | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


@dataclass(frozen=True)
class AliasEntry:
    """
    One target of an alias.

    @ivar address: C{local@domain}, or C{@domain} for the domain's catch-all.
    @ivar target: a full address the mail is sent on to.
    """

    address: str
    target: str


@dataclass(frozen=True)
class SenderRight:
    """
    A right of an authenticated user to send as an address.

    @ivar user: the AUTH identity, as the AUTH backend spells it.
    @ivar address: C{local@domain}, or C{@domain} for every address there.
    """

    user: str
    address: str


def domainKey(text: str) -> str:
    """
    The normalised form of a domain name.

    @raise HostingError: if it is not a valid domain.
    """
    if text.startswith("["):
        raise HostingError(f"{text!r}: an address literal cannot be a virtual domain")
    try:
        return normaliseDomain(text.rstrip("."))
    except AddressError as e:
        raise HostingError(f"bad domain {text!r}: {e}") from None


def addressKey(address: Address | str) -> str:
    """
    The table key of a mailbox address: local part unquoted and
    lower-cased, domain normalised.

    @raise HostingError: if C{address} is text that is not an address.
    """
    if isinstance(address, str):
        try:
            address = Address.parse(address.strip(), utf8=True)
        except AddressError as e:
            raise HostingError(f"bad address {address!r}: {e}") from None
    if address.domain.startswith("["):
        raise HostingError(f"{address}: an address literal cannot be a virtual domain")
    return f"{address.unquotedLocalpart.lower()}@{address.domain}"


def aliasKey(text: str) -> str:
    """
    The key of an alias: an address (L{addressKey}) or C{@domain} for the
    domain's catch-all.

    @raise HostingError: if it is neither.
    """
    text = text.strip()
    if text.startswith("@"):
        return "@" + domainKey(text[1:])
    return addressKey(text)


senderKey = aliasKey
"""The key of a sender right has the same two forms as an alias."""
