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

SCRAM-SHA-256(-PLUS) (L{mailfw.auth._scram.ScramExchange}) takes three
responses: the client-first message (after an empty C{334}, or as the
initial response), whose user name goes to the lockout's C{check} and then
to the checker's C{scramKeys} (so the C{334} server-first message comes
from a L{Deferred}, and the exchange is still L{waiting
<SASLExchange.waiting>} when it fires); the client-final message, answered
with the server-final message as a C{334} challenge; and the client's
empty response to that, which logs in through the portal and gets C{235}.
The server-final message is not put in the C{235} ("additional data with
success"): a client that does not look there would miss it.  Sent as a
challenge that the client answers empty (RFC 4422 section 5's way for
protocols without such data), it reaches every SASL client, Python's
C{smtplib} with an C{authobject} too (the integration test).  Every
L{ScramError} is a counted failure with C{535 5.7.8}; its reason goes only
to the log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import ICredentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailfw.auth._checker import SessionCredentials, TemporaryAuthFailure
from mailfw.auth._lockout import MAX_USER_OCTETS
from mailfw.auth._realm import IMailUser
from mailfw.auth._scram import ChannelBinding, ScramError, ScramExchange
from mailfw.envelope import Session
from mailfw.reply import SMTPReply
from mailfw.smtp import _auth as A

__all__ = ["AuthOutcome", "SASLExchange"]


@dataclass(frozen=True)
class AuthOutcome:
    """
    How an exchange ended: the reply, and after a success the avatar, its
    logout and the identity it authenticated as.  Or, while the exchange
    is still L{waiting <SASLExchange.waiting>}, the C{334} challenge that
    needed a lookup (SCRAM's server-first message).
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

    def __init__(
        self,
        auth: A.SMTPAuth,
        clock: IReactorTime,
        session: Session,
        peer: str,
        channelBinding: ChannelBinding | None = None,
    ) -> None:
        """
        @param session: the session at the time of AUTH: its address for
            the lockout, its TLS state, and for the checker
            (L{SessionCredentials}).
        @param channelBinding: the connection's TLS channel binding
            (L{mailfw.auth._scram.channelBindingFor}), as when EHLO
            offered the mechanisms.
        """
        self._auth = auth
        self._lockout = auth.lockout
        assert self._lockout is not None
        self._clock = clock
        self._session = session
        self._host = session.peerHost
        self._peer = peer
        self._channelBinding = channelBinding
        self._name = ""
        self._mechanism: A.Mechanism | None = None
        self._scram: ScramExchange | None = None
        # SCRAM: which message comes next ("client-first", "client-final",
        # "empty" after the server-final), and the user once known.
        self._scramNext = "client-first"
        self._user = ""
        self.waiting = False

    def begin(self, argument: str) -> Step:
        """
        C{AUTH mechanism [initial-response]}: syntax (501), mechanism (504),
        encryption (538), then the exchange.
        """
        words = argument.split(" ")
        if not words[0] or len(words) > 2 or (len(words) == 2 and not words[1]):
            return A.AUTH_SYNTAX
        name = words[0].upper()
        if not A.validMechanismName(name) or name not in self._auth.offered(self._channelBinding):
            return A.AUTH_UNKNOWN_MECHANISM
        if not self._session.tls:
            return A.AUTH_NEEDS_TLS
        initial: bytes | None = None
        if len(words) == 2:
            if words[1] == "=":
                initial = b""
            else:
                initial = A.decodeResponse(words[1].encode("ascii", "replace"))
                if initial is None:
                    return A.AUTH_BAD_BASE64
        self._name = name
        if name in A.SCRAM_MECHANISMS:
            self._scram = ScramExchange(name, self._channelBinding)
            if initial is None:
                return self._challenge(b"")
            return self._scramStep(initial)
        mechanism = A.makeMechanism(name)
        assert mechanism is not None
        self._mechanism = mechanism
        return self._step(mechanism.start(initial))

    def respond(self, line: bytes) -> Step:
        """
        The client's response line to the last challenge.
        """
        assert self.waiting
        self.waiting = False
        if line == b"*":
            return self._cancelled()
        data = A.decodeResponse(line)
        if data is None:
            self.dropped("a response that is not base64")
            return A.AUTH_BAD_BASE64
        if self._scram is not None:
            return self._scramStep(data)
        assert self._mechanism is not None
        return self._step(self._mechanism.respond(data))

    def _challenge(self, data: bytes) -> SMTPReply:
        self.waiting = True
        return SMTPReply(334, "", A.encodeChallenge(data))

    def _cancelled(self) -> Step:
        """
        C{*}: 501.  A SCRAM exchange cancelled after the server-first
        message (which tells the client the user's salt) counts as a
        failure, so that asking for salts is not free.
        """
        self.log.info("AUTH cancelled by {peer}", peer=self._peer)
        if self._scram is not None and self._scramNext == "client-final":
            return Deferred.fromCoroutine(self._refuse(self._name, self._user, "cancelled", A.AUTH_CANCELLED))
        return A.AUTH_CANCELLED

    def dropped(self, reason: str) -> None:
        """
        The exchange ended without the client's answer (a hang-up, a
        response too long or not base64).  After the server-first message
        (which tells the client the user's salt) that counts as a failure,
        as a cancel does, so that asking for salts is not free.
        """
        if self._scram is None or self._scramNext != "client-final":
            return
        self._scramNext = "dropped"
        self.log.info(
            "AUTH {mechanism} from {peer} for user {user} ended: {reason}",
            mechanism=self._name,
            peer=self._peer,
            user=self._user,
            reason=reason,
        )
        # The lockout never fails (it logs its own trouble); nobody waits.
        self._lockout.failed(self._host, self._user)  # type: ignore[union-attr]

    def _step(self, step: A.Step) -> Step:
        if isinstance(step, A.Challenge):
            return self._challenge(step.data)
        if isinstance(step, SMTPReply):
            return Deferred.fromCoroutine(self._refuse(self._name, "", "malformed response"))
        return Deferred.fromCoroutine(self._check(self._name, step))

    def _scramStep(self, data: bytes) -> Step:
        """
        The next SCRAM message: the client-first (on to the lockout and the
        keys), the client-final (answered with the server-final), or the
        empty response that ends the exchange.
        """
        scram = self._scram
        assert scram is not None
        expected = self._scramNext
        try:
            if expected == "client-first":
                self._scramNext = "client-final"
                user = scram.clientFirst(data)
                self._user = printable(user)
                return Deferred.fromCoroutine(self._serverFirst(scram, user))
            if expected == "client-final":
                self._scramNext = "empty"
                return self._challenge(scram.clientFinal(data))
        except ScramError as e:
            return Deferred.fromCoroutine(self._refuse(self._name, self._user, e.reason))
        if data:
            reason = "a response to the server-final message that is not empty"
            return Deferred.fromCoroutine(self._refuse(self._name, self._user, reason))
        return Deferred.fromCoroutine(self._login(self._name, self._user, scram.credentials()))

    async def _serverFirst(self, scram: ScramExchange, user: str) -> AuthOutcome:
        """
        The lockout's check, then the user's keys (or decoys), then the
        server-first message as a challenge.
        """
        refusal = await self._throttled(self._name, self._user)
        if refusal is not None:
            return refusal
        source = self._auth.scram
        assert source is not None
        try:
            keys = await self._bounded(maybeDeferred(source.scramKeys, user))
        except CancelledError:
            raise
        except Exception as e:
            return self._temporary(e)
        return AuthOutcome(self._challenge(scram.serverFirst(keys)))

    def _bounded(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        C{d}, failing with L{TimeoutError} after the checker's timeout.
        """
        if not d.called:
            d.addTimeout(self._auth.timeout, self._clock)
        return d

    def _temporary(self, error: Exception) -> AuthOutcome:
        """
        The checker could not decide: 454, not counted against the client.
        """
        if isinstance(error, TimeoutError):
            self.log.warn("AUTH check timed out for {peer}", peer=self._peer)
        elif isinstance(error, TemporaryAuthFailure):
            self.log.warn("AUTH check for {peer} could not be made: {reason}", peer=self._peer, reason=error)
        else:
            self.log.failure("AUTH check failed for {peer}", peer=self._peer)
        return AuthOutcome(A.AUTH_TEMPORARY)

    async def _wait(self) -> None:
        """
        The lockout's delay for this client, on the clock.
        """
        seconds = await self._lockout.delay(self._host)  # type: ignore[union-attr]
        if seconds > 0:
            await deferLater(self._clock, seconds)

    async def _refuse(
        self, mechanism: str, user: str, reason: str, reply: SMTPReply = A.AUTH_FAILED
    ) -> AuthOutcome:
        """
        Count a failed attempt and refuse it (535 unless C{reply} says
        otherwise), after the delay.
        """
        self.log.info(
            "AUTH {mechanism} failed for {peer} (user {user}): {reason}",
            event="session.authFailed",
            mechanism=mechanism,
            peer=self._peer,
            user=user,
            reason=reason,
            code=reply.code,
            enhanced=reply.enhanced,
        )
        await self._lockout.failed(self._host, user)  # type: ignore[union-attr]
        await self._wait()
        return AuthOutcome(reply)

    async def _throttled(self, mechanism: str, user: str) -> AuthOutcome | None:
        """
        The lockout's refusal of C{user} from this client (after the
        delay), or C{None} to go on.
        """
        lockout = self._lockout
        assert lockout is not None
        try:
            refusal = await lockout.check(self._host, user)
        except CancelledError:
            raise
        except Exception:
            self.log.failure("AUTH lockout check failed for {peer}", peer=self._peer)
            return AuthOutcome(A.AUTH_TEMPORARY)
        if refusal is None:
            return None
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

    async def _check(self, mechanism: str, credentials: UsernamePassword) -> AuthOutcome:
        """
        A user name and password: the lockout, then the portal, with the
        session (L{SessionCredentials}) for checkers that ask another
        service.
        """
        user = printable(credentials.username)
        refusal = await self._throttled(mechanism, user)
        if refusal is not None:
            return refusal
        withSession = SessionCredentials(credentials.username, credentials.password, self._session)
        return await self._login(mechanism, user, withSession)

    async def _login(self, mechanism: str, user: str, credentials: ICredentials) -> AuthOutcome:
        """
        Log in through the portal (the lockout has been asked), count the
        outcome and wait the delay.
        """
        lockout = self._lockout
        assert lockout is not None
        d: Deferred[Any] = maybeDeferred(self._auth.portal.login, credentials, None, IMailUser)
        try:
            _, avatar, logout = await self._bounded(d)
        except (UnauthorizedLogin, UnhandledCredentials):
            return await self._refuse(mechanism, user, "bad credentials")
        except CancelledError:
            raise
        except Exception as e:
            return self._temporary(e)
        try:
            await lockout.succeeded(self._host, user)
            await self._wait()
        except BaseException:
            logout()
            raise
        identity = str(avatar.identity)
        self.log.info(
            "AUTH {mechanism} succeeded for {peer}: authenticated as {user}",
            event="session.auth",
            mechanism=mechanism,
            peer=self._peer,
            user=identity,
        )
        return AuthOutcome(A.AUTH_OK, avatar, logout, identity)


def printable(name: bytes | str) -> str:
    """
    A user name a client sent, fit for a log event and for the lockout:
    decoded leniently, control characters escaped, at most as long as the
    lockout's own bound on names (L{MAX_USER_OCTETS}), so that two users
    whose names share a long prefix never share a lock.
    """
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:MAX_USER_OCTETS]
