"""
When to try a deferred recipient again, when to warn the sender, and when
to give up.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mailfw.address import AddressError, normaliseDomain
from mailfw.config import ConfigError, Section

__all__ = ["RetrySchedule"]

_KEYS = ("first_retry", "max_retry", "backoff", "max_lifetime", "delay_warning", "jitter")


@dataclass(frozen=True)
class RetrySchedule:
    """
    A retry schedule like Postfix's: the first retry after C{firstRetry}
    seconds, each following delay C{backoff} times the one before, never
    more than C{maxRetry}, each spread by up to C{jitter} (a fraction) either
    way so that a queue of mail deferred together does not come back
    together.  A recipient still deferred C{maxLifetime} seconds after
    arrival fails (bounces); the last attempt happens exactly then.  A delay
    notice goes out once, at the first deferral after C{delayWarning}
    seconds (C{None}: never).

    @ivar domains: C{(domain, schedule)} overrides; a domain applies to
        itself and its subdomains, the most specific one wins.
    @ivar random: returns a float in [0, 1); replaced in tests.
    """

    firstRetry: float = 300.0
    maxRetry: float = 4000.0
    backoff: float = 2.0
    maxLifetime: float = 5 * 86400.0
    delayWarning: float | None = 4 * 3600.0
    jitter: float = 0.1
    domains: tuple[tuple[str, RetrySchedule], ...] = ()
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)

    def forDomain(self, domain: str) -> RetrySchedule:
        """
        The schedule for a recipient in C{domain}.
        """
        best: tuple[int, RetrySchedule] | None = None
        for name, schedule in self.domains:
            matches = domain == name or domain.endswith("." + name)
            if matches and (best is None or len(name) > best[0]):
                best = (len(name), schedule)
        return self if best is None else best[1]

    def delay(self, attempts: int) -> float:
        """
        The delay before the next attempt after C{attempts} failed attempts
        (at least 1), jitter included.
        """
        base = min(self.firstRetry * self.backoff ** max(attempts - 1, 0), self.maxRetry)
        if self.jitter:
            base *= 1 + self.jitter * (2 * self.random() - 1)
        return max(base, 0.0)

    def expires(self, arrival: float) -> float:
        """
        When a message that arrived at C{arrival} stops being retried.
        """
        return arrival + self.maxLifetime

    def nextAttempt(self, now: float, arrival: float, attempts: int) -> float | None:
        """
        When to try again after the C{attempts}th failed attempt at C{now},
        or C{None} when the message has expired and the recipient must fail.
        """
        expires = self.expires(arrival)
        if now >= expires:
            return None
        return min(now + self.delay(attempts), expires)

    def shouldWarn(self, now: float, arrival: float) -> bool:
        """
        Whether a deferral at C{now} is late enough for a delay notice
        (the caller sends it only once per recipient).
        """
        return self.delayWarning is not None and now >= arrival + self.delayWarning

    @classmethod
    def fromSection(cls, section: Section) -> RetrySchedule:
        """
        Read the retry keys of C{[scheduler]}: C{first_retry}, C{max_retry},
        C{backoff}, C{max_lifetime}, C{delay_warning} (0 disables) and
        C{jitter}, all in seconds but for the last two (a factor and a
        fraction), and C{domains}, a table of per-domain tables with the same
        keys::

            [scheduler]
            max_lifetime = 259200
            [scheduler.domains."example.com"]
            first_retry = 60

        Other keys are left for the caller, who calls C{finish()}.

        @raise ConfigError: naming the bad key.
        """
        schedule = _fromKeys(section, cls())
        overrides = []
        for domain, table in sorted(section.table("domains", {}).items()):
            title = f'{section.title[:-1]}.domains."{domain}"]'
            if not isinstance(table, dict):
                raise ConfigError(f"{title} must be a table")
            try:
                name = normaliseDomain(domain)
            except AddressError as e:
                raise ConfigError(f"{title}: {e}") from None
            sub = Section(title, table)
            overrides.append((name, _fromKeys(sub, schedule)))
            sub.finish()
        return replace(schedule, domains=tuple(overrides))


def _fromKeys(section: Section, base: RetrySchedule) -> RetrySchedule:
    values: dict[str, Any] = {
        "firstRetry": section.number("first_retry", base.firstRetry, minimum=1),
        "maxRetry": section.number("max_retry", base.maxRetry, minimum=1),
        "backoff": section.number("backoff", base.backoff, minimum=1),
        "maxLifetime": section.number("max_lifetime", base.maxLifetime, minimum=0),
        "jitter": section.number("jitter", base.jitter, minimum=0),
    }
    warning = section.number("delay_warning", base.delayWarning or 0.0, minimum=0)
    values["delayWarning"] = warning or None
    if values["jitter"] >= 1:
        raise ConfigError(f"{section.title} jitter: must be below 1")
    if values["maxRetry"] < values["firstRetry"]:
        raise ConfigError(f"{section.title} max_retry: must be at least first_retry")
    return replace(base, **values)
