"""
The AUTH brute-force defence: slow down a client that fails, lock one user
name for one client network, and block an address outright only when it
fails far more often than any office behind one NAT address would.

Three counters, all kept in an L{ISharedState} so that every worker process
(and, with a queue that keeps them, every node) sees the same numbers:

  - the I{penalty} of a client address: each failure doubles the delay of
    that client's next AUTH replies (2, 4, 8, then at most 15 seconds, as
    Dovecot's auth penalty), so guessing from one address is slow while a
    user who mistyped once waits two seconds;
  - the failures of one I{(client network, user name) pair}: past a
    threshold that user name is refused from that network for a while,
    without checking the password (so a locked pair is no oracle), while
    the other users at the same address go on logging in;
  - the failures of one I{address}, at a much higher threshold: the
    address is then refused for every user for a bounded time.  A pair
    lock stops one misconfigured client from feeding this counter for
    long, so reaching it takes many user names: password spraying.

A success clears the pair's failures and the address's penalty (as Dovecot
does); it never clears the address's count, or one valid account would let
an attacker reset it at will.

Loopback and the configured exempt networks (a webmail on the same host,
which submits for all its users from one address) get no penalty and no
address block; pair locks still apply to them, since they protect the
account and cost the other users nothing.

Keys, as L{mailfw.interfaces.ISharedState} asks, start with the
component's name: C{auth-penalty:ADDRESS}, C{auth-fail-pair:NETWORK:USER},
C{auth-lock-pair:NETWORK:USER}, C{auth-fail-addr:ADDRESS} and
C{auth-block-addr:ADDRESS}.  The user name in a key is case-folded, cut to
255 octets and percent-escaped, so that no odd byte reaches a database or a
log line.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.interfaces import ISharedState
from mailfw.reply import SMTPReply

__all__ = [
    "AUTH_LOCKED",
    "AUTH_LOCKOUT_UNAVAILABLE",
    "MAX_USER_OCTETS",
    "AuthLockout",
    "LockoutSettings",
    "normaliseUser",
]

AUTH_LOCKED = SMTPReply(454, "4.7.0", "Too many failed authentication attempts, try again later")
"""A locked pair or a blocked address: temporary (RFC 4954's 454 4.7.0), and
the same words whichever it is and whether or not the user exists."""

AUTH_LOCKOUT_UNAVAILABLE = SMTPReply(454, "4.7.0", "Temporary authentication failure")
"""The shared counters could not be read: refuse for now rather than let
guesses through uncounted."""

MAX_USER_OCTETS = 255
"""User names are cut to this many octets (UTF-8) in keys and log lines, the
password file's own limit."""

# Octets that stand for themselves in a key; every other is %XX.
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789.-_@+")
_MAX_OTHER_HOST = 64
_ADDRESS_PREFIX_V6 = 64

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _escape(data: bytes) -> str:
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in data)


def normaliseUser(user: str) -> str:
    """
    The form of a user name in keys and log fields: case-folded (so that
    C{Alice} and C{alice} share one count), at most L{MAX_USER_OCTETS}
    octets of UTF-8, and every octet outside C{[a-z0-9.-_@+]} written as
    C{%XX} (so that control characters, NUL, C{:} or C{%} can neither split
    a key nor forge a log line).
    """
    data = user.casefold().encode("utf-8", "surrogatepass")[:MAX_USER_OCTETS]
    return _escape(data)


@dataclass(frozen=True)
class LockoutSettings:
    """
    The limits of L{AuthLockout}.  Windows are fixed: a count lives for its
    window from its first failure.

    @ivar penaltyDelay: seconds the first AUTH reply after one failure
        waits; it doubles with each further failure in C{penaltyWindow}
        (Dovecot's C{AUTH_PENALTY_INIT_SECS}, 2).
    @ivar maxPenaltyDelay: the cap of that delay (Dovecot's
        C{AUTH_PENALTY_MAX_SECS}, 15), reached at the fourth failure.
    @ivar penaltyWindow: how long a client's failures count for its penalty.
    @ivar userFailures: failures of one user name from one client network
        within C{userWindow} that lock that pair...
    @ivar userWindow: ... (the window) ...
    @ivar userLockout: ... for this many seconds.
    @ivar addressFailures: failures from one client address (any user
        names) within C{addressWindow} that block the address...
    @ivar addressWindow: ... (the window) ...
    @ivar addressBlock: ... for this many seconds.
    @ivar networkPrefixV4: the client network of a pair: this many leading
        bits of an IPv4 address (a /24, where one NAT pool or one office
        usually sits).
    @ivar networkPrefixV6: the same for IPv6 (a /64, what one site or one
        host is given).
    @ivar exemptNetworks: networks (CIDR strings) that get no penalty delay
        and no address block.
    """

    penaltyDelay: float = 2.0
    maxPenaltyDelay: float = 15.0
    penaltyWindow: float = 900.0
    userFailures: int = 10
    userWindow: float = 900.0
    userLockout: float = 900.0
    addressFailures: int = 100
    addressWindow: float = 3600.0
    addressBlock: float = 3600.0
    networkPrefixV4: int = 24
    networkPrefixV6: int = 64
    exemptNetworks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

    def __post_init__(self) -> None:
        for name in (
            "penaltyDelay",
            "maxPenaltyDelay",
            "penaltyWindow",
            "userWindow",
            "userLockout",
            "addressWindow",
            "addressBlock",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.userFailures < 1 or self.addressFailures < 1:
            raise ValueError("userFailures and addressFailures must be at least 1")
        if not 0 <= self.networkPrefixV4 <= 32:
            raise ValueError("networkPrefixV4 must be between 0 and 32")
        if not 0 <= self.networkPrefixV6 <= 128:
            raise ValueError("networkPrefixV6 must be between 0 and 128")
        self.exemptions()

    def exemptions(self) -> tuple[_Network, ...]:
        """
        C{exemptNetworks} parsed.

        @raise ValueError: naming a network that is not one.
        """
        networks = []
        for text in self.exemptNetworks:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"not a network: {text!r}") from None
        return tuple(networks)


def _parseHost(host: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Client:
    """
    Where one client host is counted.

    @ivar network: its network for pair locks: the IPv4 /24 or IPv6 /64 by
        default.
    @ivar address: its unit for penalties and address blocks: one IPv4
        address, or one IPv6 /64 (a single host is usually given a whole
        /64, and counting each of its addresses would give an attacker
        2**64 tries).
    @ivar exempt: whether it is in an exempt network (no penalty, no
        address block).
    """

    network: str
    address: str
    exempt: bool


@functools.lru_cache(maxsize=4096)
def _locate(host: str, prefixV4: int, prefixV6: int, exempt: tuple[_Network, ...]) -> Client:
    # Cached: parsing with ipaddress costs tens of microseconds, and one
    # AUTH exchange asks for the same host three times.
    parsed = _parseHost(host)
    if parsed is None:
        other = "host:" + _escape(host.encode("utf-8", "surrogatepass")[:_MAX_OTHER_HOST])
        return Client(other, other, False)
    if parsed.version == 4:
        network = ipaddress.ip_network((parsed, prefixV4), strict=False)
        address = str(parsed)
    else:
        network = ipaddress.ip_network((parsed, prefixV6), strict=False)
        address = str(ipaddress.ip_network((parsed, _ADDRESS_PREFIX_V6), strict=False))
    return Client(str(network), address, any(parsed in n for n in exempt))


class AuthLockout:
    """
    Decides, for the SMTP session, how long each AUTH reply waits and which
    attempts are refused before any password is checked.

    The session calls, for each AUTH exchange: L{check} once the user name
    is known (and sends the refusal it returns, if any, without checking
    the password and without calling L{failed}); then L{failed} or
    L{succeeded} after the check; then L{delay}, and it sends the reply
    that many seconds later, on the reactor's clock.  So a failure's own
    reply waits (2 s for the first, as Dovecot's), refusals wait the
    client's penalty, and the right password after a typo is answered at
    once.

    None of the returned L{Deferred}s fails: when the shared state does,
    the failure is logged, L{check} refuses with
    L{AUTH_LOCKOUT_UNAVAILABLE}, L{delay} answers the longest delay and
    L{failed} / L{succeeded} go on.

    @ivar settings: the limits.
    """

    log = Logger()

    def __init__(
        self, state: ISharedState, clock: IReactorTime, settings: LockoutSettings = LockoutSettings()
    ) -> None:
        self.state = state
        self.clock = clock
        self.settings = settings
        self._exempt = settings.exemptions()

    # Grouping

    def locate(self, host: str) -> Client:
        """
        Where C{host} is counted.  An IPv4-mapped IPv6 address counts as
        IPv4; a host that is no IP address (a UNIX socket's) is its own
        network and address.
        """
        settings = self.settings
        return _locate(host, settings.networkPrefixV4, settings.networkPrefixV6, self._exempt)

    # The API the session calls

    def delay(self, host: str) -> Deferred[float]:
        """
        Seconds to wait before the next AUTH reply to C{host}: 0 for a
        client without recent failures, else C{penaltyDelay} doubled for
        each failure after the first, at most C{maxPenaltyDelay}.
        """
        return Deferred.fromCoroutine(self._delay(host))

    async def _delay(self, host: str) -> float:
        settings, client = self.settings, self.locate(host)
        if client.exempt:
            return 0.0
        try:
            failures = await self.state.count(
                f"auth-penalty:{client.address}", 0, settings.penaltyWindow, self.clock.seconds()
            )
        except Exception:
            self.log.failure("reading the AUTH penalty of {peer} failed", peer=host)
            return settings.maxPenaltyDelay
        if failures <= 0:
            return 0.0
        # Capping the exponent first keeps the float finite for any count.
        return float(min(settings.penaltyDelay * 2 ** min(failures - 1, 32), settings.maxPenaltyDelay))

    def check(self, host: str, user: str) -> Deferred[SMTPReply | None]:
        """
        Whether C{user} may try a password from C{host} now.

        @return: C{None} to go on and check the password, or the refusal to
            send (L{AUTH_LOCKED}: the address is blocked or the pair is
            locked).
        """
        return Deferred.fromCoroutine(self._check(host, user))

    async def _check(self, host: str, user: str) -> SMTPReply | None:
        settings, client, now = self.settings, self.locate(host), self.clock.seconds()
        try:
            if not client.exempt:
                blocked = await self.state.count(
                    f"auth-block-addr:{client.address}", 0, settings.addressBlock, now
                )
                if blocked:
                    return AUTH_LOCKED
            locked = await self.state.count(
                _pairKey("auth-lock-pair", client, user), 0, settings.userLockout, now
            )
        except Exception:
            self.log.failure("reading the AUTH lockout of {peer} failed", peer=host)
            return AUTH_LOCKOUT_UNAVAILABLE
        return AUTH_LOCKED if locked else None

    def failed(self, host: str, user: str) -> Deferred[None]:
        """
        Count a wrong password (or unknown user) for C{user} from C{host};
        lock the pair or block the address when this failure reaches its
        threshold, and log that once.
        """
        return Deferred.fromCoroutine(self._guard(self._failed(host, user), host))

    async def _failed(self, host: str, user: str) -> None:
        settings, client, now = self.settings, self.locate(host), self.clock.seconds()
        pairKey = _pairKey("auth-fail-pair", client, user)
        failures = await self.state.count(pairKey, 1, settings.userWindow, now)
        if failures >= settings.userFailures:
            # Start the lock before forgetting the count, so that no moment
            # exists in which neither holds the pair back.
            await self.state.count(_pairKey("auth-lock-pair", client, user), 1, settings.userLockout, now)
            await self.state.forget(pairKey)
            self.log.warn(
                "AUTH for {user} from {network} locked until {until}"
                " after {failures} failures (the last from {peer})",
                event="auth-pair-locked",
                user=normaliseUser(user),
                network=client.network,
                peer=host,
                failures=failures,
                until=now + settings.userLockout,
            )
        if client.exempt:
            return
        await self.state.count(f"auth-penalty:{client.address}", 1, settings.penaltyWindow, now)
        addressKey = f"auth-fail-addr:{client.address}"
        failures = await self.state.count(addressKey, 1, settings.addressWindow, now)
        if failures >= settings.addressFailures:
            await self.state.count(f"auth-block-addr:{client.address}", 1, settings.addressBlock, now)
            await self.state.forget(addressKey)
            self.log.warn(
                "AUTH from {address} blocked for every user until {until}"
                " after {failures} failures (the last for {user} from {peer})",
                event="auth-address-blocked",
                user=normaliseUser(user),
                peer=host,
                address=client.address,
                failures=failures,
                until=now + settings.addressBlock,
            )

    def succeeded(self, host: str, user: str) -> Deferred[None]:
        """
        A right password for C{user} from C{host}: forget the pair's
        failures and the address's penalty, not its count toward a block.
        """
        return Deferred.fromCoroutine(self._guard(self._succeeded(host, user), host))

    async def _succeeded(self, host: str, user: str) -> None:
        client = self.locate(host)
        await self.state.forget(_pairKey("auth-fail-pair", client, user))
        if not client.exempt:
            await self.state.forget(f"auth-penalty:{client.address}")

    async def _guard(self, work: Coroutine[Any, Any, None], host: str) -> None:
        try:
            await work
        except Exception:
            self.log.failure("recording an AUTH outcome of {peer} failed", peer=host)


def _pairKey(prefix: str, client: Client, user: str) -> str:
    return f"{prefix}:{client.network}:{normaliseUser(user)}"
