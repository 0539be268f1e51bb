"""
One AUTH exchange (RFC 4954): from the C{AUTH} command's argument through
the client's responses to the final reply, with the brute-force defence.

The exchange knows nothing of the connection: it takes the command's
argument and the client's response lines, and answers each with the next
step, either an immediate reply (a C{334} challenge while it waits for the
client, or a refusal that ends it) or a L{Deferred} firing with the
L{AuthOutcome}.  The protocol keeps the order of replies and applies a
successful outcome to its session.

The defence is the L{mailfw.smtp._auth.Lockout} in L{SMTPAuth.lockout}
(L{mailfw.auth.AuthLockout} when configured), called in the order it
documents: C{check} once the user name is known and before the password is
checked (a refusal is sent without C{failed}); C{failed} or C{succeeded}
after the check; then C{delay}, and the final reply waits that long on the
reactor's clock (a timer, so other connections go on).  So a failure's own
reply waits, refusals wait the client's penalty, and the right password
after a typo (C{succeeded} clears the penalty) is answered at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailfw.auth._realm import IMailUser
from mailfw.reply import SMTPReply
from mailfw.smtp import _auth as A

__all__ = ["AuthOutcome", "SASLExchange"]


@dataclass(frozen=True)
class AuthOutcome:
    """
    How an exchange ended: the reply, and after a success the avatar, its
    logout and the identity it authenticated as.
    """

    reply: SMTPReply
    avatar: Any = None
    logout: Callable[[], None] | None = None
    identity: str = ""


Step = SMTPReply | Deferred[AuthOutcome]
"""An immediate reply (C{334}: the exchange waits for a response), or the
outcome to come."""


class SASLExchange:
    """
    One AUTH command and its responses.

    @ivar waiting: whether the last step was a challenge, so that the next
        input line is a response for L{respond}.
    """

    log = Logger()

    def __init__(self, auth: A.SMTPAuth, clock: IReactorTime, host: str, peer: str) -> None:
        self._auth = auth
        self._lockout = auth.lockout
        assert self._lockout is not None
        self._clock = clock
        self._host = host
        self._peer = peer
        self._mechanism: A.Mechanism | None = None
        self.waiting = False

    def begin(self, argument: str, tls: bool) -> Step:
        """
        C{AUTH mechanism [initial-response]}: syntax (501), mechanism (504),
        encryption (538), then the exchange.
        """
        words = argument.split(" ")
        if not words[0] or len(words) > 2 or (len(words) == 2 and not words[1]):
            return A.AUTH_SYNTAX
        name = words[0].upper()
        if not A.validMechanismName(name) or name not in self._auth.mechanisms:
            return A.AUTH_UNKNOWN_MECHANISM
        if not tls:
            return A.AUTH_NEEDS_TLS
        initial: bytes | None = None
        if len(words) == 2:
            if words[1] == "=":
                initial = b""
            else:
                initial = A.decodeResponse(words[1].encode("ascii", "replace"))
                if initial is None:
                    return A.AUTH_BAD_BASE64
        mechanism = A.makeMechanism(name)
        assert mechanism is not None
        self._mechanism = mechanism
        return self._step(mechanism.start(initial))

    def respond(self, line: bytes) -> Step:
        """
        The client's response line to the last challenge.
        """
        mechanism = self._mechanism
        assert mechanism is not None and self.waiting
        self.waiting = False
        if line == b"*":
            self.log.info("AUTH cancelled by {peer}", peer=self._peer)
            return A.AUTH_CANCELLED
        data = A.decodeResponse(line)
        if data is None:
            return A.AUTH_BAD_BASE64
        return self._step(mechanism.respond(data))

    def _step(self, step: A.Step) -> Step:
        assert self._mechanism is not None
        name = self._mechanism.name
        if isinstance(step, A.Challenge):
            self.waiting = True
            return SMTPReply(334, "", A.encodeChallenge(step.data))
        if isinstance(step, SMTPReply):
            return Deferred.fromCoroutine(self._refuse(name, "", "malformed response"))
        return Deferred.fromCoroutine(self._check(name, step))

    async def _wait(self) -> None:
        """
        The lockout's delay for this client, on the clock.
        """
        seconds = await self._lockout.delay(self._host)  # type: ignore[union-attr]
        if seconds > 0:
            await deferLater(self._clock, seconds)

    async def _refuse(self, mechanism: str, user: str, reason: str) -> AuthOutcome:
        """
        Count a failed attempt and refuse it with 535, after the delay.
        """
        self.log.info(
            "AUTH {mechanism} failed for {peer} (user {user}): {reason}",
            mechanism=mechanism,
            peer=self._peer,
            user=user,
            reason=reason,
            code=A.AUTH_FAILED.code,
            enhanced=A.AUTH_FAILED.enhanced,
        )
        await self._lockout.failed(self._host, user)  # type: ignore[union-attr]
        await self._wait()
        return AuthOutcome(A.AUTH_FAILED)

    async def _check(self, mechanism: str, credentials: UsernamePassword) -> AuthOutcome:
        lockout = self._lockout
        assert lockout is not None
        user = printable(credentials.username)
        try:
            refusal = await lockout.check(self._host, user)
        except CancelledError:
            raise
        except Exception:
            self.log.failure("AUTH lockout check failed for {peer}", peer=self._peer)
            return AuthOutcome(A.AUTH_TEMPORARY)
        if refusal is not None:
            self.log.info(
                "AUTH {mechanism} from {peer} for user {user} refused: throttled",
                mechanism=mechanism,
                peer=self._peer,
                user=user,
                code=refusal.code,
                enhanced=refusal.enhanced,
            )
            await self._wait()
            return AuthOutcome(refusal)
        d: Deferred[Any] = maybeDeferred(self._auth.portal.login, credentials, None, IMailUser)
        if not d.called:
            d.addTimeout(self._auth.timeout, self._clock)
        try:
            _, avatar, logout = await d
        except (UnauthorizedLogin, UnhandledCredentials):
            return await self._refuse(mechanism, user, "bad credentials")
        except CancelledError:
            raise
        except TimeoutError:
            self.log.warn("AUTH check timed out for {peer}", peer=self._peer)
            return AuthOutcome(A.AUTH_TEMPORARY)
        except Exception:
            self.log.failure("AUTH check failed for {peer}", peer=self._peer)
            return AuthOutcome(A.AUTH_TEMPORARY)
        try:
            await lockout.succeeded(self._host, user)
            await self._wait()
        except BaseException:
            logout()
            raise
        identity = str(avatar.identity)
        self.log.info(
            "AUTH {mechanism} succeeded for {peer}: authenticated as {user}",
            mechanism=mechanism,
            peer=self._peer,
            user=identity,
        )
        return AuthOutcome(A.AUTH_OK, avatar, logout, identity)


def printable(name: bytes | str) -> str:
    """
    A user name a client sent, fit for a log event: decoded leniently,
    control characters escaped, at most 64 characters.
    """
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:64]
