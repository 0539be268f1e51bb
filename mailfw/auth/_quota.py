"""
Sending quotas per authenticated user: how many messages and recipients
one account may send per hour and per day.

This is what a hosting provider needs first when an account is
compromised: the spammer who has its password sends a few messages, not a
million.  The counts live in L{ISharedState}, so every worker process (and,
with a PostgreSQL queue, every node) counts against the same numbers, and
they survive a restart when the queue keeps them.

A message is checked when the session knows its user and sender (MAIL) and
each recipient when it is added (RCPT); it is charged only once it is
accepted (the 250 after the data), so a refused or abandoned transaction
costs nothing.  Checking and charging are separate steps, so a user's
concurrent sessions can overshoot a limit by the messages they have in
flight at once.  Windows are fixed: an hour's count starts with the first
message counted in it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.address import Address, AddressError
from mailfw.config import ConfigError, Section
from mailfw.interfaces import IHostingTable, ISharedState
from mailfw.reply import SMTPReply

__all__ = [
    "OVER_QUOTA",
    "Quota",
    "SendingQuotas",
    "quotaFromOptions",
    "quotasFromSection",
    "useHostedQuotas",
]

HOUR = 3600.0
DAY = 86400.0

OVER_QUOTA = SMTPReply(450, "4.7.1", "Sending quota exceeded, try again later")

#: The longest user name used in a counter's key; longer names share the
#: prefix's counters rather than make keys of any length.
_MAX_USER = 256


@dataclass(frozen=True)
class Quota:
    """
    Limits for one user; C{None} is no limit.
    """

    messagesPerHour: int | None = None
    messagesPerDay: int | None = None
    recipientsPerHour: int | None = None
    recipientsPerDay: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


#: Configuration key, attribute, what it counts ("messages" or
#: "recipients") and its window.
_LIMITS = (
    ("messages_per_hour", "messagesPerHour", "messages", HOUR),
    ("messages_per_day", "messagesPerDay", "messages", DAY),
    ("recipients_per_hour", "recipientsPerHour", "recipients", HOUR),
    ("recipients_per_day", "recipientsPerDay", "recipients", DAY),
)


def _key(kind: str, window: float, user: str) -> str:
    return f"quota:{kind}:{int(window)}:{user.lower()[:_MAX_USER]}"


class SendingQuotas:
    """
    Checks and charges sending quotas.

    @ivar default: the quota of users without their own.
    @ivar users: per-user quotas from the configuration, by lower-case user
        name; they replace the default entirely.
    @ivar lookup: an optional source of per-user quotas consulted before
        C{users} (a hosting table's quota column); it answers C{None} for a
        user it has no quota for.
    """

    log = Logger()

    def __init__(
        self,
        state: ISharedState,
        clock: IReactorTime,
        default: Quota,
        users: Mapping[str, Quota] | None = None,
        lookup: Callable[[str], Deferred[Quota | None]] | None = None,
    ) -> None:
        self.state = state
        self.clock = clock
        self.default = default
        self.users = {name.lower(): quota for name, quota in (users or {}).items()}
        self.lookup = lookup

    def quotaFor(self, user: str) -> Deferred[Quota]:
        """
        The quota that applies to C{user}.
        """
        configured = self.users.get(user.lower(), self.default)
        if self.lookup is None:
            return succeed(configured)
        return self.lookup(user).addCallback(lambda found: configured if found is None else found)

    def checkMessage(self, user: str) -> Deferred[SMTPReply | None]:
        """
        Whether C{user} may start another message: C{None}, or the reply
        that refuses it (450 4.7.1), logged once with the user's name.
        """
        return Deferred.fromCoroutine(self._check(user, "messages", 1))

    def checkRecipient(self, user: str, pending: int) -> Deferred[SMTPReply | None]:
        """
        Whether C{user} may add one more recipient to a message that has
        C{pending} already.
        """
        return Deferred.fromCoroutine(self._check(user, "recipients", pending + 1))

    async def _check(self, user: str, kind: str, wanted: int) -> SMTPReply | None:
        quota = await self.quotaFor(user)
        now = self.clock.seconds()
        for key, attribute, counts, window in _LIMITS:
            limit = getattr(quota, attribute)
            if counts != kind or limit is None:
                continue
            used = await self.state.count(_key(kind, window, user), 0, window, now)
            if used + wanted > limit:
                self.log.info(
                    "sending quota: {user} is over {limit} {kind} per {period}",
                    user=user,
                    limit=limit,
                    kind=kind,
                    period="hour" if window == HOUR else "day",
                    used=used,
                    setting=key,
                )
                return OVER_QUOTA
        return None

    def charge(self, user: str, recipients: int) -> Deferred[None]:
        """
        Count one accepted message with C{recipients} recipients.
        """
        return Deferred.fromCoroutine(self._charge(user, recipients))

    async def _charge(self, user: str, recipients: int) -> None:
        now = self.clock.seconds()
        for _, _, kind, window in _LIMITS:
            amount = 1 if kind == "messages" else recipients
            await self.state.count(_key(kind, window, user), amount, window, now)

    def usage(self, user: str) -> Deferred[dict[str, tuple[int, int | None]]]:
        """
        What C{user} has used of each limit: configuration key to
        C{(used, limit)}, for C{mailfw user quota}.
        """
        return Deferred.fromCoroutine(self._usage(user))

    async def _usage(self, user: str) -> dict[str, tuple[int, int | None]]:
        quota = await self.quotaFor(user)
        now = self.clock.seconds()
        result = {}
        for key, attribute, kind, window in _LIMITS:
            used = await self.state.count(_key(kind, window, user), 0, window, now)
            result[key] = (used, getattr(quota, attribute))
        return result


def _quotaFrom(section: Section, base: Quota) -> Quota:
    values = {
        attribute: section.integer(key, getattr(base, attribute), minimum=0)
        for key, attribute, _, _ in _LIMITS
    }
    return Quota(**values)


def quotaFromOptions(title: str, options: Mapping[str, object], base: Quota = Quota()) -> Quota:
    """
    A L{Quota} from a table of C{messages_per_hour}, C{messages_per_day},
    C{recipients_per_hour} and C{recipients_per_day}; missing keys keep
    C{base}'s values.

    @raise ConfigError: naming C{title} for unknown keys or bad values.
    """
    section = Section(title, options)
    quota = _quotaFrom(section, base)
    section.finish()
    return quota


def quotasFromSection(
    options: Mapping[str, object], state: ISharedState, clock: IReactorTime
) -> SendingQuotas | None:
    """
    Build the quotas of C{[auth.quotas]}: the four limits as the default,
    and C{users = { "alice" = { messages_per_hour = 5 } }} for users whose
    quota differs (a user's table starts from the default).  C{None} when
    no limit is set anywhere.

    @raise ConfigError: naming the section.
    """
    section = Section("[auth.quotas]", options)
    default = _quotaFrom(section, Quota())
    users = section.table("users", {})
    section.finish()
    perUser: dict[str, Quota] = {}
    for name, table in users.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[auth.quotas] users: {name!r} must be a table of limits")
        perUser[name] = quotaFromOptions(f"[auth.quotas.users.{name}]", table, default)
    if default.unlimited and all(q.unlimited for q in perUser.values()):
        return None
    return SendingQuotas(state, clock, default, perUser)


def useHostedQuotas(quotas: SendingQuotas, router: object) -> bool:
    """
    Let C{quotas} read a user's message limits from the hosting table that
    C{router} reads (C{[routing] virtual}): a mailbox's C{messagesPerHour}
    and C{messagesPerDay} columns, where set, replace the configured
    message limits of the user authenticated as that address (the
    recipient limits stay the default's).  As
    L{mailfw.auth._realm.useHostedSenders} does for sender rights.

    @return: whether the quotas now consult a table.
    """
    hosting = getattr(router, "hosting", None)
    if hosting is None or not IHostingTable.providedBy(hosting):
        return False
    table: IHostingTable = hosting

    def lookup(user: str) -> Deferred[Quota | None]:
        try:
            address = Address.parse(user, utf8=True)
        except AddressError:
            return succeed(None)

        def found(box: Any) -> Quota | None:
            if box is None or (box.messagesPerHour is None and box.messagesPerDay is None):
                return None
            base = quotas.users.get(user.lower(), quotas.default)
            hour, day = box.messagesPerHour, box.messagesPerDay
            return replace(
                base,
                messagesPerHour=base.messagesPerHour if hour is None else hour,
                messagesPerDay=base.messagesPerDay if day is None else day,
            )

        return table.mailbox(address).addCallback(found)

    quotas.lookup = lookup
    return True
