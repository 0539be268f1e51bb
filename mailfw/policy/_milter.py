"""
The C{milter} policy: the MTA side of the milter protocol (version 6, as
libmilter and Postfix speak it), so that the filters operators run with
Postfix and Sendmail (OpenDKIM, OpenDMARC, rspamd's proxy, SpamAssassin's
and ClamAV's milters) work with mailfw unchanged.

One filter connection per SMTP session, opened when the client connects
and closed when it leaves (as Postfix does).  Each stage of the session
maps onto the policy chain: connect, HELO, MAIL, RCPT as the stages of
the same names; the header fields, end of headers and the body (in chunks
of at most 64 KiB, each sent when the previous one is answered, so that a
slow filter slows the client instead of filling memory) at the
end-of-data stage; and the end of message, whose modification actions
become the verdict's message edits.

A filter that cannot be reached, closes the connection, times out or
sends a packet that is malformed, oversized or unexpected gets
C{default_action} for the rest of the session, and one log line that
names the filter and what it did.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw._sockets import socketEndpoint
from mailfw.address import Address, AddressError
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import (
    CONTINUE,
    AddHeader,
    AddRecipient,
    AuthResult,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    Discard,
    MessageEdit,
    Policy,
    Quarantine,
    ReplaceBody,
    Verdict,
)
from mailfw.policy._streaming import DEFAULT_ACTIONS, REJECT_REPLY, TEMPFAIL_REPLY, defaultVerdict
from mailfw.reply import SMTPReply, replyFromPeer

__all__ = ["MilterError", "MilterPolicy", "fromConfig", "packet", "parsePackets"]

VERSION = 6

# Commands, MTA to filter.
OPTNEG, MACRO, CONNECT, HELO, MAIL, RCPT, DATA = b"O", b"D", b"C", b"H", b"M", b"R", b"T"
HEADER, EOH, BODY, BODYEOB, ABORT, QUIT = b"L", b"N", b"B", b"E", b"A", b"Q"

# Replies, filter to MTA.
ACCEPT, CONTINUE_, DISCARD, REJECT, TEMPFAIL, REPLYCODE = b"a", b"c", b"d", b"r", b"t", b"y"
PROGRESS, SKIP, CONNFAIL, SHUTDOWN = b"p", b"s", b"f", b"4"
ADDHEADER, INSHEADER, CHGHEADER, CHGFROM = b"h", b"i", b"m", b"e"
ADDRCPT, ADDRCPT_PAR, DELRCPT, REPLBODY, QUARANTINE = b"+", b"2", b"-", b"b", b"q"
_FINAL = frozenset({ACCEPT, CONTINUE_, DISCARD, REJECT, TEMPFAIL, REPLYCODE, SKIP, CONNFAIL, SHUTDOWN})

# Actions (SMFIF_*): what a filter may change, as it asks at negotiation.
_ACTION_OF = {
    ADDHEADER: 0x01,
    INSHEADER: 0x01,
    REPLBODY: 0x02,
    ADDRCPT: 0x04,
    DELRCPT: 0x08,
    CHGHEADER: 0x10,
    QUARANTINE: 0x20,
    CHGFROM: 0x40,
    ADDRCPT_PAR: 0x80,
}
ALL_ACTIONS = 0x1FF

# Protocol flags (SMFIP_*): steps a filter does not want, or that need no
# reply.
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
NR_HDR, NOUNKNOWN, NODATA, SKIP_FLAG, RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (
    0x1000,
    0x2000,
    0x4000,
    0x8000,
    0x10000,
    0x20000,
    0x40000,
    0x80000,
)
# What mailfw can do: every step may be skipped or left unanswered;
# unknown commands are never sent.
OFFERED = (
    0x3FF | SKIP_FLAG | NR_CONN | NR_HELO | NR_MAIL | NR_RCPT | NR_DATA | NR_UNKN | NR_EOH | NR_BODY | NR_HDR
)

# Macro stages (SMFIM_*).
STAGES = ("connect", "helo", "mail", "rcpt", "data", "eom", "eoh")
_STAGE_CODE = {
    CONNECT: "connect",
    HELO: "helo",
    MAIL: "mail",
    RCPT: "rcpt",
    DATA: "data",
    BODYEOB: "eom",
    EOH: "eoh",
}

# Postfix's milter_*_macros defaults.
DEFAULT_MACROS = {
    "connect": ("j", "{daemon_name}", "v", "_", "{client_addr}", "{client_port}", "{client_name}"),
    "helo": ("{tls_version}",),
    "mail": ("{auth_type}", "{auth_authen}", "{mail_addr}", "{mail_host}", "{mail_mailer}"),
    "rcpt": ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i",),
}

CHUNK = 65535
MAX_PACKET = 1 << 20
MAX_REPLACED_BODY = 64 << 20


class MilterError(Exception):
    """
    The filter broke the protocol, closed the connection or timed out.
    """


def packet(command: bytes, data: bytes = b"") -> bytes:
    """
    One milter packet: length, command, data.
    """
    return struct.pack("!I", len(data) + 1) + command + data


def parsePackets(buffer: bytearray, limit: int = MAX_PACKET) -> list[tuple[bytes, bytes]]:
    """
    Take the complete packets off the front of C{buffer}.

    @raise MilterError: for a packet of length zero or above C{limit}.
    """
    out = []
    while len(buffer) >= 4:
        (length,) = struct.unpack("!I", buffer[:4])
        if length == 0 or length > limit:
            raise MilterError(f"packet length {length}")
        if len(buffer) < 4 + length:
            break
        out.append((bytes(buffer[4:5]), bytes(buffer[5 : 4 + length])))
        del buffer[: 4 + length]
    return out


def _strings(data: bytes, count: int) -> list[bytes]:
    """
    C{count} NUL-terminated strings from C{data}.

    @raise MilterError: if there are fewer.
    """
    parts = data.split(b"\0")
    if len(parts) < count + 1:
        raise MilterError("truncated packet")
    return parts[:count]


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


@dataclass
class _Negotiated:
    """
    What the filter asked for at option negotiation.
    """

    actions: int
    protocol: int
    macros: dict[str, tuple[str, ...]]


_DONE = Failure(ConnectionDone())


class _MilterProtocol(Protocol):
    """
    One connection to a filter: sends commands, collects the modification
    packets of the end of message, and fires the waiter of the command in
    progress with its final reply.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._buffer = bytearray()
        self._waiter: Deferred[tuple[bytes, bytes]] | None = None
        self._timer: IDelayedCall | None = None
        self._timeout = 0.0
        self.modifications: list[tuple[bytes, bytes]] = []
        self.broken: str | None = None

    def send(self, command: bytes, data: bytes = b"") -> None:
        if self.transport is not None and self.broken is None:
            self.transport.write(packet(command, data))

    def ask(self, command: bytes, data: bytes, timeout: float) -> Deferred[tuple[bytes, bytes]]:
        """
        Send a command and wait for its final reply (modifications of an
        end of message are kept in L{modifications}).
        """
        if self.broken is not None:
            return _failed(MilterError(self.broken))
        self.modifications = []
        d: Deferred[tuple[bytes, bytes]] = Deferred(lambda _: self._cancelled())
        self._waiter = d
        self._timeout = timeout
        self._arm()
        self.send(command, data)
        return d

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self._break(f"no reply within {self._timeout:g}s")

    def _cancelled(self) -> None:
        self._waiter = None
        self._break("the session stopped waiting")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        try:
            packets = parsePackets(self._buffer)
        except MilterError as e:
            self._break(str(e))
            return
        for command, body in packets:
            if self._waiter is None:
                self._break(f"unexpected packet {command!r}")
                return
            if command == PROGRESS:
                self._arm()
            elif command in _ACTION_OF:
                self.modifications.append((command, body))
                if sum(len(b) for c, b in self.modifications if c == REPLBODY) > MAX_REPLACED_BODY:
                    self._break("replacement body too large")
                    return
            elif command in _FINAL or command == OPTNEG:
                waiter, self._waiter = self._waiter, None
                if self._timer is not None and self._timer.active():
                    self._timer.cancel()
                waiter.callback((command, body))
            else:
                self._break(f"unknown packet {command!r}")
                return

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiter, self._waiter = self._waiter, None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if waiter is not None:
            waiter.errback(MilterError(reason))

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.broken is None:
            self._break("the filter closed the connection")

    def close(self) -> None:
        """
        Say goodbye and hang up.
        """
        if self.broken is None and self.transport is not None:
            self.send(QUIT)
            self.broken = "closed"
            self.transport.loseConnection()


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


@dataclass
class _Session:
    """
    A filter connection and where it stands for one SMTP session.

    @ivar done: the filter accepted the connection (no more questions), or
        failed (C{failure} says why; C{default_action} answers).
    @ivar messageDone: the filter accepted the message being received.
    """

    connecting: Deferred[Any] | None = None
    protocol: _MilterProtocol | None = None
    negotiated: _Negotiated | None = None
    failure: str | None = None
    done: bool = False
    messageDone: bool = False
    skipBody: bool = False
    macros: dict[str, str] = field(default_factory=dict)


class MilterPolicy(Policy):
    """
    One milter, asked at every stage it wants.

    @ivar defaultAction: C{"tempfail"}, C{"accept"} or C{"reject"}: what
        a filter that is down or misbehaves means.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        hostname: str,
        description: str,
        defaultAction: str = "tempfail",
        connectTimeout: float = 30.0,
        commandTimeout: float = 30.0,
        contentTimeout: float = 50.0,
        macros: Mapping[str, Sequence[str]] = DEFAULT_MACROS,
    ) -> None:
        self.name = name
        self._endpoint = endpoint
        self._clock = clock
        self._hostname = hostname
        self.description = description
        self.defaultAction = defaultAction
        self._connectTimeout = connectTimeout
        self._commandTimeout = commandTimeout
        self._contentTimeout = contentTimeout
        self._macros = {stage: tuple(names) for stage, names in macros.items()}
        self._sessions: dict[str, _Session] = {}

    # --- failures ---------------------------------------------------------------

    def _default(self) -> Verdict:
        return defaultVerdict(self.defaultAction)

    def _fail(self, state: _Session, session: Session, reason: str) -> Verdict:
        """
        The filter failed: log it once, hang up, and answer
        C{default_action} from now on.
        """
        if state.failure is None:
            state.failure = reason
            self.log.warn(
                "milter {policy} ({filter}) failed for {peer}: {reason}; default action {action}",
                policy=self.name,
                filter=self.description,
                peer=session.peerHost,
                reason=reason,
                action=self.defaultAction,
            )
        if state.protocol is not None and state.protocol.broken is None:
            state.protocol._break(reason)
        return self._default()

    # --- the connection ---------------------------------------------------------

    def checkConnection(self, session: Session) -> Deferred[Verdict]:
        state = self._sessions[session.id] = _Session()
        factory = Factory.forProtocol(lambda: _MilterProtocol(self._clock))
        connecting: Deferred[Any] = self._endpoint.connect(factory)
        timer = self._clock.callLater(self._connectTimeout, connecting.cancel)
        state.connecting = connecting

        def connected(protocol: _MilterProtocol) -> Deferred[Verdict]:
            state.connecting = None
            if timer.active():
                timer.cancel()
            state.protocol = protocol
            if session.id not in self._sessions:
                protocol.close()
                return succeed(CONTINUE)
            offer = struct.pack("!III", VERSION, ALL_ACTIONS, OFFERED)
            return protocol.ask(OPTNEG, offer, self._commandTimeout).addCallback(negotiated)

        def negotiated(reply: tuple[bytes, bytes]) -> Verdict | Deferred[Verdict]:
            command, data = reply
            if command != OPTNEG or len(data) < 12:
                raise MilterError(f"bad option negotiation reply {command!r}")
            version, actions, protocol = struct.unpack("!III", data[:12])
            if version < 2 or actions & ~ALL_ACTIONS or protocol & ~OFFERED:
                raise MilterError(
                    f"unsupported options: version {version}, actions {actions:#x}, protocol {protocol:#x}"
                )
            state.negotiated = _Negotiated(actions, protocol, self._requestedMacros(data[12:]))
            state.macros.update(self._connectMacros(session))
            host = session.peerHost
            family = b"6" if ":" in host else b"4"
            data = b"unknown\0" + family + struct.pack("!H", session.peerPort) + host.encode("ascii") + b"\0"
            return self._step(state, session, CONNECT, data, NOCONNECT, NR_CONN)

        def failed(f: Failure) -> Verdict:
            state.connecting = None
            if timer.active():
                timer.cancel()
            if f.check(CancelledError):
                reason = f"no connection within {self._connectTimeout:g}s"
            else:
                reason = f"cannot connect: {f.getErrorMessage()}"
            # As Postfix: the session goes on, its transactions get the
            # default action.
            self._fail(state, session, reason)
            return CONTINUE

        return connecting.addCallback(connected).addErrback(failed)

    def _requestedMacros(self, data: bytes) -> dict[str, tuple[str, ...]]:
        """
        The macro lists a filter asked for in its negotiation reply
        (SMFIR_SETSYMLIST, version 6), else ours.
        """
        macros = dict(self._macros)
        while len(data) >= 4:
            (stage,) = struct.unpack("!I", data[:4])
            text, _, data = data[4:].partition(b"\0")
            if stage < len(STAGES):
                macros[STAGES[stage]] = tuple(_text(text).split())
        return macros

    def _connectMacros(self, session: Session) -> dict[str, str]:
        host = session.peerHost
        return {
            "j": self._hostname,
            "{daemon_name}": session.listener,
            "v": "mailfw",
            "_": f"unknown [{host}]",
            "{client_addr}": host,
            "{client_port}": str(session.peerPort),
            "{client_name}": "unknown",
            "{client_ptr}": "unknown",
        }

    def _step(
        self,
        state: _Session,
        session: Session,
        command: bytes,
        data: bytes,
        skipFlag: int,
        noReplyFlag: int,
        timeout: float | None = None,
    ) -> Verdict | Deferred[Verdict]:
        """
        Send a stage's macros and command and turn the reply into a
        verdict; a step the filter does not want is skipped.
        """
        if state.failure is not None:
            # As Postfix: the session goes on; its transactions get the
            # default action.
            return CONTINUE if command in (CONNECT, HELO) else self._default()
        if state.done or state.protocol is None or state.negotiated is None:
            return CONTINUE
        negotiated, protocol = state.negotiated, state.protocol
        if negotiated.protocol & skipFlag:
            return CONTINUE
        self._sendMacros(state, command)
        if negotiated.protocol & noReplyFlag:
            protocol.send(command, data)
            return CONTINUE
        d = protocol.ask(command, data, self._commandTimeout if timeout is None else timeout)
        return d.addCallbacks(
            self._verdict,
            self._brokenDuring,
            callbackArgs=(state, session, command),
            errbackArgs=(state, session),
        )

    def _sendMacros(self, state: _Session, command: bytes) -> None:
        stage = _STAGE_CODE.get(command)
        assert state.negotiated is not None and state.protocol is not None
        if stage is None:
            return
        names = state.negotiated.macros.get(stage, ())
        pairs = [(name, state.macros[name]) for name in names if state.macros.get(name) is not None]
        if pairs:
            data = command + b"".join(
                n.encode() + b"\0" + v.encode("utf-8", "replace") + b"\0" for n, v in pairs
            )
            state.protocol.send(MACRO, data)

    def _brokenDuring(self, f: Failure, state: _Session, session: Session) -> Verdict:
        if f.check(CancelledError):
            return self._fail(state, session, "the session stopped waiting")
        return self._fail(state, session, f.getErrorMessage())

    def _verdict(
        self, reply: tuple[bytes, bytes], state: _Session, session: Session, command: bytes
    ) -> Verdict:
        """
        A final reply as a verdict.
        """
        code, data = reply
        if code == SKIP:
            state.skipBody = True
            return CONTINUE
        if code == CONTINUE_:
            return CONTINUE
        if code == ACCEPT:
            if command in (CONNECT, HELO):
                state.done = True
            elif command != RCPT:
                state.messageDone = True
            return CONTINUE
        if code == REJECT:
            return Verdict(REJECT_REPLY)
        if code == TEMPFAIL:
            return Verdict(TEMPFAIL_REPLY)
        if code == DISCARD:
            if command in (CONNECT, HELO):
                # Postfix: a discard before MAIL discards every message.
                return CONTINUE
            state.messageDone = True
            return Verdict(edits=(Discard(f"milter {self.name}"),))
        if code in (CONNFAIL, SHUTDOWN):
            return Verdict(
                SMTPReply(421, "4.7.0", "Service not available, closing transmission channel"), True
            )
        if code == REPLYCODE:
            return self._replyCode(data, state, session)
        return self._fail(state, session, f"unexpected reply {code!r}")

    def _replyCode(self, data: bytes, state: _Session, session: Session) -> Verdict:
        """
        SMFIR_REPLYCODE: C{"550 5.7.1 text"}, a 4xx or 5xx; anything else
        fails the filter.
        """
        text = _text(data.split(b"\0", 1)[0]).strip()
        code = text[:3]
        if len(text) < 3 or not code.isdigit() or code[0] not in "45" or text[3:4] not in ("", " ", "-"):
            return self._fail(state, session, f"bad reply code {text[:80]!r}")
        # Only the first line: a multi-line reply's lines are joined.
        rest = " ".join(line[4:] if line[:3] == code else line for line in text[4:].split("\r\n"))
        return Verdict(replyFromPeer(int(code), rest))

    # --- the other stages ---------------------------------------------------------

    def checkHelo(self, session: Session, name: str) -> Verdict | Deferred[Verdict]:
        state = self._sessions.get(session.id)
        if state is None:
            return CONTINUE
        state.macros["{tls_version}"] = "TLS" if session.tls else ""
        return self._step(state, session, HELO, name.encode("utf-8") + b"\0", NOHELO, NR_HELO)

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        state = self._sessions.get(session.id)
        if state is None:
            return CONTINUE
        state.messageDone = False
        address = "" if sender is None else str(sender)
        state.macros.update(
            {
                "{auth_type}": "PLAIN" if session.authenticated else None,  # type: ignore[dict-item]
                "{auth_authen}": session.authenticated,  # type: ignore[dict-item]
                "{mail_addr}": address,
                "{mail_host}": "" if sender is None else sender.domain,
                "{mail_mailer}": "smtp",
            }
        )
        arguments = [f"<{address}>"] + [k if v is None else f"{k}={v}" for k, v in parameters.items()]
        data = b"".join(a.encode("utf-8", "replace") + b"\0" for a in arguments)
        return self._step(state, session, MAIL, data, NOMAIL, NR_MAIL)

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        state = self._sessions.get(session.id)
        if state is None or state.messageDone:
            return CONTINUE
        address = str(recipient.address)
        state.macros.update(
            {"{rcpt_addr}": address, "{rcpt_host}": recipient.address.domain, "{rcpt_mailer}": "smtp"}
        )
        return self._step(state, session, RCPT, f"<{address}>\0".encode("utf-8", "replace"), NORCPT, NR_RCPT)

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        state = self._sessions.get(session.id)
        if state is None:
            return None
        if state.failure is not None:
            return _Settled(self._default())
        if state.done or state.messageDone or state.protocol is None:
            return None
        state.macros["i"] = envelope.queueID
        state.skipBody = False
        return _MilterMessage(self, state, session, header)

    def sessionEnded(self, session: Session) -> None:
        state = self._sessions.pop(session.id, None)
        if state is None:
            return
        if state.connecting is not None:
            state.connecting.cancel()
        if state.protocol is not None:
            state.protocol.close()

    # --- used by the message check ---------------------------------------------------

    def _edits(self, state: _Session, modifications: list[tuple[bytes, bytes]]) -> tuple[MessageEdit, ...]:
        """
        The end-of-message modifications as message edits; one the filter
        did not negotiate, or that does not parse, fails the filter.

        @raise MilterError: for such a modification.
        """
        assert state.negotiated is not None
        allowed = state.negotiated.actions
        edits: list[MessageEdit] = []
        body: list[bytes] = []
        for command, data in modifications:
            if not allowed & _ACTION_OF[command]:
                raise MilterError(f"modification {command!r} was not negotiated")
            if command == ADDHEADER:
                name, value = _strings(data, 2)
                edits.append(AddHeader(_text(name), _text(value)))
            elif command in (INSHEADER, CHGHEADER):
                if len(data) < 4:
                    raise MilterError("truncated header change")
                (index,) = struct.unpack("!I", data[:4])
                name, value = _strings(data[4:], 2)
                if command == INSHEADER:
                    edits.append(AddHeader(_text(name), _text(value), index))
                else:
                    edits.append(ChangeHeader(_text(name), _text(value) or None, max(index, 1)))
            elif command == CHGFROM:
                [sender] = _strings(data, 1)
                edits.append(ChangeSender(_address(sender, nullable=True)))
            elif command in (ADDRCPT, ADDRCPT_PAR):
                [address] = _strings(data, 1)
                added = _address(address)
                assert added is not None
                edits.append(AddRecipient(added))
            elif command == DELRCPT:
                [address] = _strings(data, 1)
                removed = _address(address)
                assert removed is not None
                edits.append(DeleteRecipient(removed))
            elif command == REPLBODY:
                body.append(data)
            elif command == QUARANTINE:
                [reason] = _strings(data, 1)
                edits.append(Quarantine(f"milter {self.name}: {_text(reason)}"))
        if body:
            edits.append(ReplaceBody(b"".join(body)))
        return tuple(edits)


def _address(value: bytes, nullable: bool = False) -> Address | None:
    text = _text(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text and nullable:
        return None
    try:
        return Address.parse(text, utf8=True)
    except AddressError:
        raise MilterError(f"bad address {text[:80]!r}") from None


@implementer(IMessageCheck)
class _Settled:
    """
    A message check whose verdict is known before the body.
    """

    def __init__(self, verdict: Verdict) -> None:
        self._verdict = verdict

    def write(self, data: bytes) -> None:
        return None

    def end(self, results: tuple[AuthResult, ...]) -> Verdict:
        return self._verdict

    def abort(self) -> None:
        pass


def _headerFields(header: bytes) -> list[tuple[bytes, bytes]]:
    """
    The fields of a header section as milter sends them: name, and value
    without the one space after the colon, folded lines joined with LF
    (as Postfix does).
    """
    fields: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        fields.append((name.rstrip(b" \t"), value[1:] if value.startswith(b" ") else value))
    return fields


@implementer(IMessageCheck)
class _MilterMessage:
    """
    The end-of-data stage of one message: DATA, each header field, the end
    of headers, the body chunks and the end of message, sent one command
    at a time, each when the filter has answered the one before (as
    libmilter expects).  While commands wait, the session waits too, so a
    slow filter slows the client instead of filling memory.
    """

    def __init__(self, policy: MilterPolicy, state: _Session, session: Session, header: bytes) -> None:
        self._policy = policy
        self._state = state
        self._session = session
        self._verdict: Verdict | None = None
        self._busy = False
        self._drained: list[Deferred[None]] = []
        self._ending: Deferred[Verdict] | None = None
        self._queue: deque[tuple[bytes, bytes, int, int]] = deque([(DATA, b"", NODATA, NR_DATA)])
        self._queue.extend((HEADER, n + b"\0" + v + b"\0", NOHDRS, NR_HDR) for n, v in _headerFields(header))
        self._queue.append((EOH, b"", NOEOH, NR_EOH))
        self._pump()

    def _stopped(self) -> bool:
        """
        Whether the filter has said all it will say about this message.
        """
        state = self._state
        return self._verdict is not None or state.messageDone or state.done or state.failure is not None

    def _pump(self) -> None:
        """
        Send queued commands until one waits for its answer; when none is
        left, release the session and, after the end of data, ask for the
        end of message.
        """
        while self._queue and not self._busy:
            if self._stopped():
                self._queue.clear()
                break
            command, data, skip, noReply = self._queue.popleft()
            if command == BODY and self._state.skipBody:
                continue
            timeout = self._policy._contentTimeout if command == BODY else None
            answer = self._policy._step(self._state, self._session, command, data, skip, noReply, timeout)
            if isinstance(answer, Deferred):
                self._busy = True
                answer.addCallback(self._answered)
                if self._busy:
                    return
            else:
                self._note(answer)
        if self._busy:
            return
        drained, self._drained = self._drained, []
        for waiter in drained:
            waiter.callback(None)
        if self._ending is not None and not self._ending.called:
            self._endOfMessage()

    def _answered(self, verdict: Verdict) -> None:
        self._busy = False
        self._note(verdict)
        self._pump()

    def _note(self, verdict: Verdict) -> None:
        if verdict.reply is not None or verdict.disconnect or verdict.edits:
            self._verdict = verdict

    def write(self, data: bytes) -> Deferred[None] | None:
        negotiated = self._state.negotiated
        if negotiated is None or negotiated.protocol & NOBODY or self._stopped() or self._state.skipBody:
            return None
        self._queue.extend((BODY, data[i : i + CHUNK], NOBODY, NR_BODY) for i in range(0, len(data), CHUNK))
        self._pump()
        if not self._busy:
            return None
        waiter: Deferred[None] = Deferred()
        self._drained.append(waiter)
        return waiter

    def end(self, results: tuple[AuthResult, ...]) -> Deferred[Verdict]:
        def cancel(_: Deferred[Verdict]) -> None:
            self._policy._fail(self._state, self._session, "the session stopped waiting")

        ending = self._ending = Deferred(cancel)
        self._pump()
        return ending

    def _endOfMessage(self) -> None:
        ending, state, policy = self._ending, self._state, self._policy
        assert ending is not None
        if self._verdict is not None:
            ending.callback(self._verdict)
            return
        if state.failure is not None:
            ending.callback(policy._default())
            return
        if state.messageDone or state.done or state.protocol is None:
            ending.callback(CONTINUE)
            return
        protocol = state.protocol
        policy._sendMacros(state, BODYEOB)

        def finished(reply: tuple[bytes, bytes]) -> Verdict:
            verdict = policy._verdict(reply, state, self._session, BODYEOB)
            if verdict.reply is not None and not verdict.reply.isPositive:
                return verdict
            try:
                edits = policy._edits(state, protocol.modifications)
            except MilterError as e:
                return policy._fail(state, self._session, str(e))
            return Verdict(verdict.reply, verdict.disconnect, edits=verdict.edits + edits)

        def settle(verdict: Verdict) -> None:
            if not ending.called:
                ending.callback(verdict)

        asked = protocol.ask(BODYEOB, b"", policy._contentTimeout)
        asked.addCallbacks(finished, policy._brokenDuring, errbackArgs=(state, self._session)).addCallback(
            settle
        )

    def abort(self) -> None:
        """
        The message is not queued: tell the filter (SMFIC_ABORT), which
        keeps the connection for the next message.
        """
        self._queue.clear()
        state = self._state
        if state.protocol is not None and state.failure is None and not state.done:
            state.protocol.send(ABORT)


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> MilterPolicy:
    section = Section(f"[policy.{instanceName}]", options)
    address = section.text("address")
    defaultAction = section.choice("default_action", DEFAULT_ACTIONS, "tempfail")
    connectTimeout = section.number("connect_timeout", 30.0, minimum=0.1)
    commandTimeout = section.number("command_timeout", 30.0, minimum=0.1)
    contentTimeout = section.number("content_timeout", 50.0, minimum=0.1)
    macroTable = section.table("macros", {})
    section.finish()
    macros = dict(DEFAULT_MACROS)
    for stage, names in macroTable.items():
        if stage not in STAGES:
            raise ConfigError(f"{section.title} macros: unknown stage {stage!r}; use {', '.join(STAGES)}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{section.title} macros.{stage}: expected a list of macro names")
        macros[stage] = tuple(names)
    try:
        endpoint = socketEndpoint(context.reactor, address, context.path)
    except ValueError as e:
        raise ConfigError(f"{section.title} address: {e}") from None
    return MilterPolicy(
        instanceName,
        endpoint,
        context.reactor,
        context.hostname,
        address,
        defaultAction,
        connectTimeout,
        commandTimeout,
        contentTimeout,
        macros,
    )
