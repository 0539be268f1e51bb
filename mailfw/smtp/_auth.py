"""
SMTP AUTH (RFC 4954): the SASL mechanisms PLAIN (RFC 4616) and LOGIN, the
settings the server needs, and the brute-force throttle.

The mechanisms only turn client responses into
L{twisted.cred.credentials.UsernamePassword}; checking them is the
L{twisted.cred.portal.Portal}'s job, so any C{ICredentialsChecker} for
C{IUsernamePassword} works (the password file, the C{twisted.cred.strcred}
checkers).  Both mechanisms send the password in the clear, so the server
offers and accepts them only inside TLS.

SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (L{mailfw.auth._scram}) never send
the password, but need the user's stored keys in the middle of the
exchange: they are offered, also only inside TLS, when the portal's
checker for SCRAM credentials provides
L{mailfw.auth._scram.IScramKeySource} (the password file does), and
C{-PLUS} only on a connection with a channel binding
(L{SMTPAuth.offered}).  The exchange itself is in L{mailfw.smtp._sasl}.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.auth._scram import MECHANISMS as SCRAM_MECHANISMS
from mailfw.auth._scram import SCRAM_PLUS, ChannelBinding, IScramCredentials, IScramKeySource
from mailfw.reply import SMTPReply

__all__ = [
    "MECHANISMS",
    "SASL_LINE_LIMIT",
    "SCRAM_MECHANISMS",
    "AuthThrottle",
    "Challenge",
    "Lockout",
    "SMTPAuth",
    "ThrottleLockout",
    "decodeResponse",
    "makeMechanism",
    "scramKeySource",
]

# RFC 4954 4: a SASL response line may be 12288 octets long.
SASL_LINE_LIMIT = 12288

_MECHANISM_NAME = re.compile(r"[A-Z0-9_-]{1,20}\Z")
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")

AUTH_OK = SMTPReply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = SMTPReply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY = SMTPReply(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED = SMTPReply(454, "4.7.0", "Too many failed authentication attempts, try again later")
AUTH_CANCELLED = SMTPReply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = SMTPReply(501, "5.5.2", "Cannot decode response as base64")
AUTH_SYNTAX = SMTPReply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_UNKNOWN_MECHANISM = SMTPReply(504, "5.5.4", "Unrecognized authentication type")
AUTH_NEEDS_TLS = SMTPReply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_LINE_TOO_LONG = SMTPReply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_ALREADY = SMTPReply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = SMTPReply(503, "5.5.1", "Mail transaction in progress")
AUTH_NEED_EHLO = SMTPReply(503, "5.5.1", "Send EHLO first")
SENDER_NOT_OWNED = SMTPReply(553, "5.7.1", "Sender address not owned by authenticated user")
AUTH_PARAMETER_SYNTAX = SMTPReply(501, "5.5.4", "Syntax: AUTH=<> or AUTH=xtext")


@dataclass(frozen=True)
class Challenge:
    """
    The server's next challenge (sent base64 encoded after C{334}).
    """

    data: bytes


Step = Challenge | UsernamePassword | SMTPReply
"""What a mechanism answers: another challenge, credentials to check, or
a refusal (535: the response was malformed)."""


class Mechanism(Protocol):
    """
    One SASL exchange on the server side.
    """

    name: str

    def start(self, initial: bytes | None) -> Step:
        """
        Begin, with the initial response if the client sent one.
        """

    def respond(self, data: bytes) -> Step:
        """
        The client's (decoded) response to the last challenge.
        """


class Plain:
    """
    RFC 4616: one message, C{[authzid] NUL authcid NUL passwd}.

    Acting as another user (an authorization identity that differs from
    the authentication identity) is not supported and fails like a wrong
    password.
    """

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return AUTH_FAILED
        authzid, authcid, password = parts
        if not authcid or not password or (authzid and authzid != authcid):
            return AUTH_FAILED
        return UsernamePassword(authcid, password)


class Login:
    """
    The LOGIN mechanism (draft-murchison-sasl-login): the user name, then
    the password, each answering a prompt.  An initial response is the
    user name.
    """

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: bytes | None = None

    def start(self, initial: bytes | None) -> Step:
        if initial is None:
            return Challenge(b"Username:")
        return self.respond(initial)

    def respond(self, data: bytes) -> Step:
        if self._username is None:
            self._username = data
            return Challenge(b"Password:")
        if not self._username or not data:
            return AUTH_FAILED
        return UsernamePassword(self._username, data)


_PASSWORD_MECHANISMS: dict[str, Callable[[], Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}

MECHANISMS: tuple[str, ...] = (*SCRAM_MECHANISMS, *_PASSWORD_MECHANISMS)
"""The mechanisms this server implements, strongest first: the default
list, of which L{SMTPAuth.offered} drops those the connection or the
checker cannot do."""


def makeMechanism(name: str) -> Mechanism | None:
    """
    A new exchange for the password mechanism C{name} (upper case), or
    C{None} (SCRAM runs in L{mailfw.smtp._sasl}, since it waits for the
    user's keys).
    """
    factory = _PASSWORD_MECHANISMS.get(name)
    return None if factory is None else factory()


def scramKeySource(portal: Portal) -> IScramKeySource | None:
    """
    The checker that can run SCRAM in C{portal}, if any: the one the
    portal gives SCRAM credentials to, if it also gives out keys.
    """
    checker = portal.checkers.get(IScramCredentials)
    return checker if IScramKeySource.providedBy(checker) else None


def validMechanismName(name: str) -> bool:
    """
    Whether C{name} is a syntactically valid SASL mechanism name (RFC 4422
    3.1).
    """
    return _MECHANISM_NAME.match(name) is not None


def decodeResponse(line: bytes) -> bytes | None:
    """
    Strictly decode one base64 client response; C{None} if it is not
    base64 (501 5.5.2).
    """
    if not _BASE64.match(line):
        return None
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        return None


def encodeChallenge(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(eq=False)
class _Record:
    failures: deque[float] = field(default_factory=deque)
    lockedUntil: float = 0.0


class AuthThrottle:
    """
    Counts failed AUTH attempts per client address, in memory.

    After C{maxFailures} failures within C{window} seconds the address is
    locked out for C{lockout} seconds: AUTH gets 454 4.7.0 without a
    check.  Every failure reply (and every lockout reply) is sent only
    after C{failureDelay} seconds.  Successes do not clear the count (an
    attacker with one valid account could otherwise reset it).

    IPv6 clients are counted per /64, since one host usually has a whole
    /64.  At most C{maxClients} addresses are remembered; the least
    recently seen is forgotten first, so memory stays bounded however
    many addresses an attacker has.
    """

    def __init__(
        self,
        clock: IReactorTime,
        maxFailures: int = 5,
        window: float = 600.0,
        lockout: float = 600.0,
        failureDelay: float = 2.0,
        maxClients: int = 10000,
    ) -> None:
        if maxFailures < 1 or maxClients < 1:
            raise ValueError("maxFailures and maxClients must be at least 1")
        self.clock = clock
        self.maxFailures = maxFailures
        self.window = window
        self.lockout = lockout
        self.failureDelay = failureDelay
        self.maxClients = maxClients
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    @staticmethod
    def key(host: str) -> str:
        """
        The counter an address uses: the address, or its /64 for IPv6.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def lockedOut(self, host: str) -> bool:
        """
        Whether AUTH from C{host} is refused now.
        """
        record = self._records.get(self.key(host))
        return record is not None and record.lockedUntil > self.clock.seconds()

    def penalized(self, host: str) -> bool:
        """
        Whether C{host} has failures in the window, or is locked out.
        """
        record = self._records.get(self.key(host))
        if record is None:
            return False
        now = self.clock.seconds()
        return record.lockedUntil > now or any(t > now - self.window for t in record.failures)

    def failed(self, host: str) -> bool:
        """
        Count a failed attempt from C{host}.

        @return: whether this failure locked the address out.
        """
        key, now = self.key(host), self.clock.seconds()
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
            while len(self._records) > self.maxClients:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        failures = record.failures
        failures.append(now)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        while len(failures) > self.maxFailures:
            failures.popleft()
        if len(failures) >= self.maxFailures and record.lockedUntil <= now:
            record.lockedUntil = now + self.lockout
            failures.clear()
            return True
        return False


class Lockout(Protocol):
    """
    The brute-force defence the SASL exchange asks (the API of
    L{mailfw.auth.AuthLockout}): C{check} once the user name is known and
    before the password is checked, C{failed} or C{succeeded} after, then
    the reply waits C{delay}.
    """

    def delay(self, host: str) -> Deferred[float]:
        """
        Seconds the next AUTH reply to C{host} waits (0 without failures).
        """

    def check(self, host: str, user: str) -> Deferred[SMTPReply | None]:
        """
        A refusal (454) if C{user} from C{host} is locked out now, else
        C{None}.
        """

    def failed(self, host: str, user: str) -> Deferred[None]:
        """
        Count a failed attempt.
        """

    def succeeded(self, host: str, user: str) -> Deferred[None]:
        """
        Note a successful attempt.
        """


class ThrottleLockout:
    """
    L{Lockout} over an L{AuthThrottle}: per address only, for
    configurations that have no shared lockout.  Replies to an address with
    failures in the throttle's window wait the throttle's failure delay.
    """

    log = Logger()

    def __init__(self, throttle: AuthThrottle) -> None:
        self.throttle = throttle

    def delay(self, host: str) -> Deferred[float]:
        return succeed(self.throttle.failureDelay if self.throttle.penalized(host) else 0.0)

    def check(self, host: str, user: str) -> Deferred[SMTPReply | None]:
        return succeed(AUTH_LOCKED if self.throttle.lockedOut(host) else None)

    def failed(self, host: str, user: str) -> Deferred[None]:
        if self.throttle.failed(host):
            self.log.warn(
                "too many failed AUTH attempts from {host} (last user {user}): locked out",
                host=host,
                user=user,
            )
        return succeed(None)

    def succeeded(self, host: str, user: str) -> Deferred[None]:
        # An attacker with one valid account must not reset the count.
        return succeed(None)


@dataclass
class SMTPAuth:
    """
    What the server needs to offer AUTH on a listener.

    @ivar portal: checks credentials and gives an
        L{mailfw.interfaces.IMailUser} avatar.
    @ivar mechanisms: the mechanisms offered, in order, where the
        connection and the checker can do them (L{offered}); all of
        L{MECHANISMS} by default.
    @ivar throttle: the brute-force counters, shared by all listeners.
    @ivar receivedIdentity: name the authenticated user in the
        C{Received:} header (by default it goes only to the log).
    @ivar timeout: seconds the portal may take before AUTH gets 454.
    @ivar lockout: the brute-force defence the SASL exchange asks; by
        default a L{ThrottleLockout} over C{throttle}.
    @ivar scram: the portal's checker that gives SCRAM keys, if any
        (L{scramKeySource}).
    """

    portal: Portal
    throttle: AuthThrottle
    mechanisms: tuple[str, ...] = MECHANISMS
    receivedIdentity: bool = False
    timeout: float = 30.0
    lockout: Lockout | None = None
    scram: IScramKeySource | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.lockout is None:
            self.lockout = ThrottleLockout(self.throttle)
        unknown = [m for m in self.mechanisms if m not in MECHANISMS]
        if unknown or not self.mechanisms:
            raise ValueError(f"mechanisms must be a non-empty subset of {', '.join(MECHANISMS)}")
        self.scram = scramKeySource(self.portal)
        if not self.offered(ChannelBinding("", b"")):
            raise ValueError("SCRAM mechanisms need a checker with SCRAM keys")

    def offered(self, channelBinding: ChannelBinding | None) -> tuple[str, ...]:
        """
        The mechanisms to offer on a connection with C{channelBinding}
        (L{mailfw.auth._scram.channelBindingFor}): SCRAM only with a checker
        that has keys, C{-PLUS} only with a binding, since a client told of
        C{-PLUS} must be able to use it.
        """
        return tuple(
            m
            for m in self.mechanisms
            if m not in SCRAM_MECHANISMS
            or (self.scram is not None and (m != SCRAM_PLUS or channelBinding is not None))
        )
