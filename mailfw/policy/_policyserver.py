"""
The C{policy-server} policy: the client side of Postfix's SMTPD access
policy delegation protocol, so that the policy servers operators already
run (postgrey, policyd-spf, policyd-rate-limit...) work unchanged.

For each recipient (C{protocol_state=RCPT}) and, if configured, at the end
of the message (C{END-OF-MESSAGE}) mailfw sends the attributes Postfix
sends, one C{name=value} line each and an empty line, and reads one
C{action=...} line and an empty line back.  The action is one of Postfix's
access-table actions, mapped to a verdict.  Requests share one connection,
one at a time, reopened when it fails; a server that does not answer in
time, closes the connection or answers nonsense gets C{default_action}.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw._sockets import socketEndpoint
from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import CONTINUE, AddHeader, AuthResult, Discard, Policy, Quarantine, Verdict
from mailfw.policy._streaming import DEFAULT_ACTIONS, defaultVerdict
from mailfw.reply import SMTPReply, replyFromPeer

__all__ = ["PolicyServerPolicy", "fromConfig", "verdictFor"]

STATES = ("RCPT", "END-OF-MESSAGE")
MAX_REPLY = 4096
_ACTION = re.compile(r"([A-Za-z_]+|[45]\d\d)(?:\s+(.*))?\Z", re.DOTALL)
_HEADER = re.compile(r"([\x21-\x39\x3b-\x7e]+):\s*(.*)\Z", re.DOTALL)

log = Logger()


class PolicyServerError(Exception):
    """
    The policy server did not answer, or answered something that is not a
    policy reply.
    """


def verdictFor(action: str) -> Verdict:
    """
    The verdict for one C{action=} value of Postfix's access tables.

    @raise PolicyServerError: for an action that is not one.
    """
    match = _ACTION.match(action.strip())
    if match is None:
        raise PolicyServerError(f"bad action {action[:80]!r}")
    word, text = match.group(1), (match.group(2) or "").strip()
    upper = word.upper()
    if word.isdigit():
        return Verdict(replyFromPeer(int(word), text or "Access denied"))
    if upper == "OK":
        return Verdict(SMTPReply(250, "2.0.0", "Ok"))
    if upper in ("DUNNO", "DEFER_IF_REJECT", "FILTER", "INFO", "BCC", "REDIRECT"):
        return CONTINUE
    if upper == "WARN":
        log.info("policy server warns: {text}", text=text)
        return CONTINUE
    if upper == "REJECT":
        return Verdict(replyFromPeer(550, text or "5.7.1 Access denied"))
    if upper in ("DEFER", "DEFER_IF_PERMIT"):
        return Verdict(replyFromPeer(450, text or "4.7.1 Try again later"))
    if upper == "PREPEND":
        header = _HEADER.match(text)
        if header is None:
            raise PolicyServerError(f"bad PREPEND {text[:80]!r}")
        return Verdict(edits=(AddHeader(header.group(1), header.group(2), index=0),))
    if upper == "HOLD":
        return Verdict(edits=(Quarantine(f"policy server: {text or 'HOLD'}"),))
    if upper == "DISCARD":
        return Verdict(edits=(Discard(f"policy server: {text or 'DISCARD'}"),))
    raise PolicyServerError(f"unknown action {word[:40]!r}")


class _PolicyProtocol(Protocol):
    """
    One connection to the policy server; requests go one at a time.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._waiting: deque[tuple[bytes, Deferred[str]]] = deque()
        self._current: Deferred[str] | None = None
        self._timer: IDelayedCall | None = None
        self.lost = False

    def request(self, attributes: bytes) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self._waiting.append((attributes, d))
        self._next()
        return d

    def _next(self) -> None:
        if self._current is not None or not self._waiting or self.transport is None:
            return
        attributes, self._current = self._waiting.popleft()
        self._timer = self._clock.callLater(self._timeout, self._fail, "no answer in time")
        self.transport.write(attributes)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            reply, self._buffer = self._buffer.split(b"\n\n", 1)
            if self._current is None:
                self._fail("an answer nobody asked for")
                return
            action = None
            for line in reply.decode("utf-8", "replace").split("\n"):
                name, _, value = line.partition("=")
                if name == "action":
                    action = value
            if action is None:
                self._fail("a reply without action=")
                return
            current, self._current = self._current, None
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            current.callback(action)
            self._next()
        if len(self._buffer) > MAX_REPLY:
            self._fail("an oversized reply")

    def _fail(self, reason: str) -> None:
        self.lost = True
        pending = ([self._current] if self._current is not None else []) + [d for _, d in self._waiting]
        self._current, self._waiting = None, deque()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        for d in pending:
            d.errback(PolicyServerError(reason))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if not self.lost:
            self._fail("the server closed the connection")


@dataclass
class _SessionState:
    transactions: int = 0
    recipients: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class PolicyServerPolicy(Policy):
    """
    Asks a Postfix policy server at the configured protocol states.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        description: str,
        states: tuple[str, ...] = ("RCPT",),
        defaultAction: str = "tempfail",
        timeout: float = 10.0,
        policyContext: str = "",
    ) -> None:
        self.name = name
        self._endpoint = endpoint
        self._clock = clock
        self.description = description
        self.states = states
        self.defaultAction = defaultAction
        self._timeout = timeout
        self._policyContext = policyContext
        self._protocol: _PolicyProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._waiters: list[Deferred[_PolicyProtocol]] = []
        self._sessions: dict[str, _SessionState] = {}

    def _connect(self) -> Deferred[_PolicyProtocol]:
        """
        The shared connection, opened (again) when needed.
        """
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return succeed(protocol)
        waiter: Deferred[_PolicyProtocol] = Deferred()
        self._waiters.append(waiter)
        if self._connecting is None:
            factory = Factory.forProtocol(lambda: _PolicyProtocol(self._clock, self._timeout))
            connecting: Deferred[Any] = self._endpoint.connect(factory)
            connecting.addTimeout(self._timeout, self._clock)
            self._connecting = connecting
            connecting.addCallbacks(self._connected, self._connectFailed)
        return waiter

    def _connected(self, protocol: _PolicyProtocol) -> None:
        self._connecting, self._protocol = None, protocol
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _connectFailed(self, f: Failure) -> None:
        self._connecting = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(f)

    def _ask(self, attributes: dict[str, str]) -> Deferred[Verdict]:
        text = "".join(f"{k}={_clean(v)}\n" for k, v in attributes.items()) + "\n"

        def send(protocol: _PolicyProtocol) -> Deferred[str]:
            return protocol.request(text.encode("utf-8", "replace"))

        def failed(f: Failure) -> Verdict:
            self.log.warn(
                "policy server {policy} ({server}) failed: {reason}; default action {action}",
                policy=self.name,
                server=self.description,
                reason=f.getErrorMessage() or repr(f.value),
                action=self.defaultAction,
            )
            # Postfix's own answer when its policy server fails.
            return defaultVerdict(self.defaultAction, SMTPReply(451, "4.3.5", "Server configuration problem"))

        d = self._connect().addCallback(send).addCallback(verdictFor)
        return d.addErrback(failed)

    def _attributes(self, session: Session, envelope: Envelope, state: str) -> dict[str, str]:
        tracked = self._sessions.setdefault(session.id, _SessionState())
        return {
            "request": "smtpd_access_policy",
            "protocol_state": state,
            "protocol_name": "ESMTP" if session.esmtp else "SMTP",
            "client_address": session.peerHost,
            "client_port": str(session.peerPort),
            "client_name": "unknown",
            "reverse_client_name": "unknown",
            "helo_name": session.helo or "",
            "sender": envelope.senderText,
            "recipient": "",
            "recipient_count": "0",
            "queue_id": envelope.queueID,
            "instance": f"{session.id}.{tracked.transactions}",
            "size": str(envelope.size or 0),
            "sasl_method": "PLAIN" if session.authenticated else "",
            "sasl_username": session.authenticated or "",
            "sasl_sender": "",
            "encryption_protocol": "TLS" if session.tls else "",
            "stress": "",
            "policy_context": self._policyContext,
            "server_name": "mailfw",
        }

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict:
        # A new transaction: a new instance attribute.
        self._sessions.setdefault(session.id, _SessionState()).transactions += 1
        return CONTINUE

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        if "RCPT" not in self.states:
            return CONTINUE
        attributes = self._attributes(session, envelope, "RCPT")
        attributes["recipient"] = str(recipient.address)
        attributes["recipient_count"] = str(len(envelope.recipients))
        return self._ask(attributes)

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        if "END-OF-MESSAGE" not in self.states:
            return None
        return _EndOfMessage(self, session, envelope)

    def sessionEnded(self, session: Session) -> None:
        self._sessions.pop(session.id, None)


@implementer(IMessageCheck)
class _EndOfMessage:
    def __init__(self, policy: PolicyServerPolicy, session: Session, envelope: Envelope) -> None:
        self._policy = policy
        self._session = session
        self._envelope = envelope
        self._size = 0

    def write(self, data: bytes) -> None:
        self._size += len(data)

    def end(self, results: tuple[AuthResult, ...]) -> Deferred[Verdict]:
        attributes = self._policy._attributes(self._session, self._envelope, "END-OF-MESSAGE")
        attributes["recipient_count"] = str(len(self._envelope.recipients))
        attributes["size"] = str(self._size)
        return self._policy._ask(attributes)

    def abort(self) -> None:
        pass


def _clean(value: str) -> str:
    # One attribute a line: no line breaks inside a value.
    return value.replace("\n", " ").replace("\r", " ")


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> PolicyServerPolicy:
    section = Section(f"[policy.{instanceName}]", options)
    address = section.text("address")
    states = section.strings("protocol_states", ["RCPT"])
    defaultAction = section.choice("default_action", DEFAULT_ACTIONS, "tempfail")
    timeout = section.number("request_timeout", 10.0, minimum=0.1)
    policyContext = section.text("policy_context", "")
    section.finish()
    unknown = sorted(set(states) - set(STATES))
    if unknown or not states:
        raise ConfigError(f"{section.title} protocol_states: use {', '.join(STATES)}")
    try:
        endpoint = socketEndpoint(context.reactor, address, context.path)
    except ValueError as e:
        raise ConfigError(f"{section.title} address: {e}") from None
    return PolicyServerPolicy(
        instanceName, endpoint, context.reactor, address, tuple(states), defaultAction, timeout, policyContext
    )
