"""
Dovecot's authentication service as an AUTH backend.

Dovecot's C{auth-client} socket speaks a line protocol (version 1.2 here,
"Dovecot Authentication Protocol" in Dovecot's design documentation):
both sides send C{VERSION}, the client its C{CPID}, the server its
C{MECH}, C{SPID}, C{CUID} and C{COOKIE} lines and then C{DONE}; after that
the client sends C{AUTH <id> <mechanism> service=smtp ... resp=<base64>}
and the server answers each request by its ID with C{OK}, C{FAIL} or
C{CONT} (a challenge).  Fields are separated by tabs and use Dovecot's
tab-escaping (L{escape}).

L{DovecotAuthClient} keeps one connection for all sessions, requests told
apart by ID, and bounds what a slow or broken server can cost: a timeout
per request, a limit on requests in flight, a limit on line length, and a
growing pause between connection attempts while Dovecot is down, during
which AUTH fails at once instead of waiting.  L{DovecotChecker} checks
PLAIN and LOGIN credentials through it, sending them as PLAIN.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.auth._checker import TemporaryAuthFailure
from mailfw.interfaces import ISessionCredentials

__all__ = [
    "DEFAULT_SOCKET",
    "DovecotAuthClient",
    "DovecotAuthProtocol",
    "DovecotChecker",
    "DovecotProtocolError",
    "DovecotReply",
    "DovecotTimeout",
    "DovecotUnavailable",
    "escape",
    "unescape",
]

DEFAULT_SOCKET = "/run/dovecot/auth-client"

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2

MAX_LINE = 16384
"""Dovecot's own limit (C{AUTH_CLIENT_MAX_LINE_LENGTH}); a longer line from
the server means the stream cannot be trusted any more."""

MAX_RESPONSE = 8192
"""Longest SASL response (decoded) sent in an C{AUTH} line, so that the
line, base64 and all, stays well below L{MAX_LINE}."""

_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n", "\x00": "\x010"}
_UNESCAPES = {"0": "\x00", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}


class DovecotUnavailable(TemporaryAuthFailure):
    """
    Dovecot could not answer: it is down, refused the connection, lost it,
    or could not decide (C{FAIL ... temp}).  AUTH gets C{454 4.7.0}.
    """


class DovecotTimeout(DovecotUnavailable, TimeoutError):
    """
    Dovecot did not answer a request in time.  Also a Twisted
    L{TimeoutError}, which the session logs as a timeout.
    """


class DovecotProtocolError(DovecotUnavailable):
    """
    Dovecot said something this client does not understand: the
    connection is dropped, since what follows cannot be trusted.
    """


def escape(value: str) -> str:
    """
    Dovecot's tab-escaping: C{\\x01} followed by a letter stands for the
    characters that would break a line or a field.
    """
    return "".join(_ESCAPES.get(c, c) for c in value)


def unescape(value: str) -> str:
    """
    Undo L{escape}; an unknown escape stands for the character after it
    (Dovecot's rule), and a trailing lone C{\\x01} is dropped.
    """
    if "\x01" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for c in chars:
        if c == "\x01":
            following = next(chars, "")
            out.append(_UNESCAPES.get(following, following))
        else:
            out.append(c)
    return "".join(out)


@dataclass(frozen=True)
class DovecotReply:
    """
    Dovecot's answer to one request.

    @ivar kind: C{"OK"}, C{"FAIL"} or C{"CONT"}.
    @ivar requestID: the ID of the request it answers.
    @ivar parameters: the optional parameters (C{user}, C{reason},
        C{code}, ...); a flag without a value (C{temp}) maps to C{""}.
    @ivar challenge: for C{CONT}, the decoded challenge.
    """

    kind: str
    requestID: int
    parameters: Mapping[str, str] = field(default_factory=dict)
    challenge: bytes = b""

    @property
    def temporary(self) -> bool:
        """
        Whether a C{FAIL} means "could not decide" rather than "wrong".
        """
        return "temp" in self.parameters or self.parameters.get("code") == "temp_fail"


def _parameters(fields: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in fields:
        name, _, value = item.partition("=")
        out[name] = value
    return out


class DovecotAuthProtocol(LineOnlyReceiver):
    """
    One connection to Dovecot's C{auth-client} socket: the handshake, then
    replies handed to the L{DovecotAuthClient} by request ID.

    @ivar mechanisms: what Dovecot offers, by upper-case name, with its
        flags (C{plaintext}, ...).
    @ivar ready: whether the handshake is complete.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, client: DovecotAuthClient, pid: int) -> None:
        self.client = client
        self.pid = pid
        self.mechanisms: dict[str, frozenset[str]] = {}
        self.serverVersion: tuple[str, str] | None = None
        self.serverPID = ""
        self.connectionID = ""
        self.cookie = ""
        self.ready = False
        self.broken: DovecotUnavailable | None = None

    def connectionMade(self) -> None:
        self.sendLine(f"VERSION\t{PROTOCOL_MAJOR}\t{PROTOCOL_MINOR}".encode("ascii"))
        self.sendLine(f"CPID\t{self.pid}".encode("ascii"))

    def lineReceived(self, line: bytes) -> None:
        if self.broken is not None:
            return
        text = line.decode("utf-8", "replace")
        command, *fields = (unescape(f) for f in text.split("\t"))
        if self.ready:
            self._reply(command, fields)
        else:
            self._handshake(command, fields)

    def _handshake(self, command: str, fields: list[str]) -> None:
        if command == "VERSION":
            if len(fields) < 2 or fields[0] != str(PROTOCOL_MAJOR):
                self.fault(f"unsupported protocol version {'.'.join(fields)!r}")
                return
            self.serverVersion = (fields[0], fields[1])
        elif self.serverVersion is None:
            self.fault(f"expected VERSION, got {command!r}")
        elif command == "MECH":
            if fields and fields[0]:
                self.mechanisms[fields[0].upper()] = frozenset(fields[1:])
        elif command == "SPID":
            self.serverPID = fields[0] if fields else ""
        elif command == "CUID":
            self.connectionID = fields[0] if fields else ""
        elif command == "COOKIE":
            self.cookie = fields[0] if fields else ""
        elif command == "DONE":
            self.ready = True
            self.client.handshakeDone(self)
        # Any other handshake line is a later protocol's addition: ignored.

    def _reply(self, command: str, fields: list[str]) -> None:
        if command not in ("OK", "FAIL", "CONT"):
            # The protocol says unknown commands are to be ignored.
            return
        if not fields or not fields[0].isdigit() or not fields[0].isascii():
            self.fault(f"{command} without a request ID")
            return
        requestID = int(fields[0])
        if command == "CONT":
            data = fields[1] if len(fields) > 1 else ""
            try:
                challenge = base64.b64decode(data.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                self.fault(f"CONT {requestID} with a challenge that is not base64")
                return
            reply = DovecotReply(command, requestID, {}, challenge)
        else:
            reply = DovecotReply(command, requestID, _parameters(fields[1:]))
        self.client.replyReceived(self, reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fault(f"line longer than {self.MAX_LENGTH} octets")

    def fault(self, reason: str, error: type[DovecotUnavailable] = DovecotProtocolError) -> None:
        """
        Give up on this connection: Dovecot said something that makes the
        rest of the stream untrustworthy (or nothing at all, for too long).
        """
        if self.broken is None:
            self.broken = error(reason)
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.broken is not None:
            reason = Failure(self.broken)
        self.client.protocolLost(self, reason)

    def sendLine(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + self.delimiter)


class _OneConnection(Factory):
    """
    Hands out one protocol, without logging each start and stop (as
    C{connectProtocol}'s factory does) for every reconnection.
    """

    noisy = False

    def __init__(self, protocol: DovecotAuthProtocol) -> None:
        self.connection = protocol

    def buildProtocol(self, addr: object) -> DovecotAuthProtocol:
        return self.connection


@dataclass(eq=False)
class _Request:
    requestID: int
    mechanism: str
    fields: list[str]
    response: bytes | None
    deferred: Deferred[DovecotReply]
    timer: IDelayedCall | None = None


def _reason(f: Failure) -> str:
    return str(f.value) or type(f.value).__name__


class DovecotAuthClient(Service):
    """
    The connection to Dovecot's authentication service, shared by all
    sessions.

    The connection is made when the first request needs it (and at
    start-up, to log early whether Dovecot can be reached).  When it
    cannot be made, or is lost before its handshake, requests fail with
    L{DovecotUnavailable} at once for a pause that doubles from
    C{minDelay} up to C{maxDelay} seconds; a connection lost after its
    handshake is made again by the next request.

    @param endpoint: where Dovecot's C{auth-client} listener is.
    @param clock: for the timeouts and the pauses.
    @param timeout: seconds a request may wait for its answer, connecting
        included.
    @param maxPending: requests allowed in flight; more fail at once.
    @param service: the C{service=} parameter, which Dovecot's
        configuration can match (C{protocol smtp { ... }}).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        timeout: float = 30.0,
        maxPending: int = 1000,
        service: str = "smtp",
        minDelay: float = 0.5,
        maxDelay: float = 30.0,
        description: str = "",
    ) -> None:
        if maxPending < 1 or timeout <= 0:
            raise ValueError("maxPending must be at least 1 and timeout positive")
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.maxPending = maxPending
        self.serviceName = service
        self.minDelay = minDelay
        self.maxDelay = maxDelay
        self.description = description or repr(endpoint)
        self._pid = os.getpid()
        self._nextID = 0
        self._protocol: DovecotAuthProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._handshaking: DovecotAuthProtocol | None = None
        self._handshakeTimer: IDelayedCall | None = None
        self._stopped = False
        self._waiting: dict[int, _Request] = {}
        self._sent: dict[int, _Request] = {}
        self._delay = minDelay
        self._retryAt = 0.0

    # --- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        self._stopped = True
        self._cancelHandshakeTimer()
        protocols = (self._protocol, self._handshaking)
        self._protocol = self._handshaking = None
        if self._connecting is not None:
            self._connecting.cancel()
        for protocol in protocols:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.loseConnection()
        self._failAll(DovecotUnavailable("the server is stopping"), self._waiting, self._sent)

    # --- requests ------------------------------------------------------------

    @property
    def pending(self) -> int:
        """
        Requests waiting for the connection or for their answer.
        """
        return len(self._waiting) + len(self._sent)

    def authenticate(
        self,
        mechanism: str,
        response: bytes | None,
        secured: bool = False,
        peerHost: str | None = None,
        peerPort: int | None = None,
    ) -> Deferred[DovecotReply]:
        """
        Start an authentication: C{AUTH <id> <mechanism> service=...}.

        @param response: the initial response, or C{None} for none.
        @param secured: the client's session is encrypted.
        @return: fires with Dovecot's first L{DovecotReply}, or fails with
            L{DovecotUnavailable} (a subclass of it on timeout and protocol
            errors).
        """
        if self._stopped:
            return fail(DovecotUnavailable("the server is stopping"))
        if self.pending >= self.maxPending:
            return fail(DovecotUnavailable(f"{self.pending} requests already waiting for Dovecot"))
        if self._protocol is None and self._handshaking is None:
            wait = self._retryAt - self.clock.seconds()
            if wait > 0:
                return fail(DovecotUnavailable(f"Dovecot unreachable; next attempt in {wait:.1f}s"))
        fields = [f"service={escape(self.serviceName)}"]
        if secured:
            fields.append("secured")
        if peerHost:
            fields.append(f"rip={escape(peerHost)}")
        if peerPort:
            fields.append(f"rport={peerPort}")
        self._nextID = self._nextID % 0xFFFFFFFF + 1
        request = _Request(self._nextID, mechanism.upper(), fields, response, Deferred(self._cancel))
        request.timer = self.clock.callLater(self.timeout, self._expire, request)
        if self._protocol is not None:
            self._send(self._protocol, request)
        else:
            self._waiting[request.requestID] = request
            self._connect()
        return request.deferred

    def _send(self, protocol: DovecotAuthProtocol, request: _Request) -> None:
        if request.mechanism not in protocol.mechanisms:
            self._finish(request, Failure(DovecotUnavailable(f"Dovecot does not offer {request.mechanism}")))
            return
        fields = ["AUTH", str(request.requestID), request.mechanism, *request.fields]
        if request.response is not None:
            fields.append("resp=" + base64.b64encode(request.response).decode("ascii"))
        self._sent[request.requestID] = request
        protocol.sendLine("\t".join(fields).encode("utf-8"))

    def _finish(self, request: _Request, result: DovecotReply | Failure) -> None:
        self._waiting.pop(request.requestID, None)
        self._sent.pop(request.requestID, None)
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        if request.deferred.called:
            return
        if isinstance(result, DovecotReply):
            request.deferred.callback(result)
        else:
            request.deferred.errback(result)

    def _expire(self, request: _Request) -> None:
        request.timer = None
        self.log.warn(
            "Dovecot auth request {requestID} timed out after {timeout}s ({endpoint})",
            requestID=request.requestID,
            timeout=self.timeout,
            endpoint=self.description,
        )
        self._finish(request, Failure(DovecotTimeout(f"no answer from Dovecot within {self.timeout}s")))

    def _cancel(self, d: Deferred[DovecotReply]) -> None:
        for requests in (self._waiting, self._sent):
            for request in list(requests.values()):
                if request.deferred is d:
                    requests.pop(request.requestID)
                    if request.timer is not None and request.timer.active():
                        request.timer.cancel()
                    request.timer = None

    def _failAll(self, error: Exception, *groups: dict[int, _Request]) -> None:
        for group in groups:
            for request in list(group.values()):
                self._finish(request, Failure(error))

    # --- the connection ------------------------------------------------------

    def _connect(self) -> None:
        if self._stopped or self._protocol is not None or self._handshaking is not None:
            return
        protocol = self._handshaking = DovecotAuthProtocol(self, self._pid)
        # Bounds connecting and the handshake together: a Dovecot that
        # accepts but never says DONE must not hold requests forever.
        self._handshakeTimer = self.clock.callLater(self.timeout, self._handshakeTimedOut, protocol)
        self._connecting = d = self.endpoint.connect(_OneConnection(protocol))

        def connected(p: DovecotAuthProtocol) -> None:
            self._connecting = None

        def failed(f: Failure) -> None:
            self._connecting = None
            if self._handshaking is protocol:
                self._handshaking = None
                self._cancelHandshakeTimer()
                self._unreachable(f)

        d.addCallbacks(connected, failed)

    def _handshakeTimedOut(self, protocol: DovecotAuthProtocol) -> None:
        self._handshakeTimer = None
        if self._handshaking is not protocol:
            return
        if self._connecting is not None:
            self._connecting.cancel()
        else:
            protocol.fault(f"no handshake within {self.timeout}s", DovecotTimeout)

    def _cancelHandshakeTimer(self) -> None:
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None

    def _unreachable(self, failure: Failure) -> None:
        """
        No working connection: pause further attempts, fail the waiting
        requests (with the protocol error or timeout, if that was why).
        """
        if self._stopped:
            return
        reason = _reason(failure)
        self._retryAt = self.clock.seconds() + self._delay
        self.log.warn(
            "cannot reach Dovecot auth at {endpoint}: {reason}; next attempt in {delay}s",
            endpoint=self.description,
            reason=reason,
            delay=self._delay,
        )
        self._delay = min(self._delay * 2, self.maxDelay)
        error = failure.value
        if not isinstance(error, DovecotUnavailable):
            error = DovecotUnavailable(f"Dovecot unreachable: {reason}")
        self._failAll(error, self._waiting)

    def handshakeDone(self, protocol: DovecotAuthProtocol) -> None:
        """
        Called by C{protocol} on C{DONE}: send what was waiting.
        """
        if protocol is not self._handshaking:
            # The service stopped meanwhile.
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return
        self._handshaking = None
        self._cancelHandshakeTimer()
        self._protocol = protocol
        self._delay = self.minDelay
        self._retryAt = 0.0
        self.log.info(
            "connected to Dovecot auth at {endpoint} (mechanisms {mechanisms})",
            endpoint=self.description,
            mechanisms=" ".join(sorted(protocol.mechanisms)),
        )
        for request in list(self._waiting.values()):
            del self._waiting[request.requestID]
            self._send(protocol, request)

    def replyReceived(self, protocol: DovecotAuthProtocol, reply: DovecotReply) -> None:
        """
        Called by C{protocol} for each C{OK}, C{FAIL} and C{CONT}.
        """
        request = self._sent.get(reply.requestID)
        if request is None or protocol is not self._protocol:
            # A request that timed out or was cancelled: its answer is late.
            self.log.info(
                "Dovecot answered {kind} for unknown request {requestID}",
                kind=reply.kind,
                requestID=reply.requestID,
            )
            return
        self._finish(request, reply)

    def protocolLost(self, protocol: DovecotAuthProtocol, reason: Failure) -> None:
        """
        Called by C{protocol} when its connection ends: its requests fail.
        """
        if protocol is self._protocol:
            self._protocol = None
            if self._stopped:
                return
            self.log.warn(
                "connection to Dovecot auth at {endpoint} lost: {reason}",
                endpoint=self.description,
                reason=_reason(reason),
            )
            error = reason.value
            if not isinstance(error, DovecotUnavailable):
                error = DovecotUnavailable(f"connection to Dovecot lost: {_reason(reason)}")
            self._failAll(error, self._sent)
            if self._waiting:
                self._connect()
        elif protocol is self._handshaking:
            self._handshaking = None
            self._cancelHandshakeTimer()
            self._unreachable(reason)


@implementer(ICredentialsChecker)
class DovecotChecker:
    """
    Checks user names and passwords with Dovecot, as PLAIN.

    LOGIN credentials go the same way: mailfw has already collected both
    answers.  C{FAIL} is L{UnauthorizedLogin}; C{FAIL} with C{temp}, a
    timeout or an unreachable Dovecot is L{DovecotUnavailable} (454), and
    is logged.  The avatar ID is the user name Dovecot answers with
    (C{user=}, after its C{auth_username_format}).

    Credentials providing L{ISessionCredentials} send the client's
    address (C{rip}, C{rport}) and C{secured} only for an encrypted
    session; others are sent as C{secured}, because the server accepts
    PLAIN and LOGIN only inside TLS.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, client: DovecotAuthClient) -> None:
        self.client = client

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        username, password = credentials.username, credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        response = b"\x00" + bytes(username) + b"\x00" + bytes(password)
        if not username or not password or response.count(b"\x00") != 2 or len(response) > MAX_RESPONSE:
            return fail(UnauthorizedLogin())
        try:
            name = bytes(username).decode("utf-8")
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin())
        secured, peerHost, peerPort = True, None, None
        if ISessionCredentials.providedBy(credentials):
            session = credentials.session
            secured, peerHost, peerPort = session.tls, session.peerHost, session.peerPort

        def answered(reply: DovecotReply) -> str:
            if reply.kind == "OK":
                return reply.parameters.get("user") or name
            if reply.kind == "FAIL":
                if reply.temporary:
                    raise DovecotUnavailable(
                        f"Dovecot could not decide: {reply.parameters.get('reason', '')}"
                    )
                raise UnauthorizedLogin(reply.parameters.get("reason", ""))
            raise DovecotProtocolError(f"Dovecot sent {reply.kind} to a complete PLAIN response")

        def unavailable(f: Failure) -> Failure:
            if f.check(DovecotUnavailable):
                self.log.warn("Dovecot auth check for {user} failed: {reason}", user=name, reason=_reason(f))
            return f

        d = self.client.authenticate("PLAIN", response, secured, peerHost, peerPort)
        return d.addCallback(answered).addErrback(unavailable)
