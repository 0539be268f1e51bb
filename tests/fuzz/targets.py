"""
Fuzz targets: each takes one input of arbitrary octets and raises only
when mailfw misbehaves (an exception that escapes, a broken invariant, a
reply that is not a reply).

Every target is a plain function, so the same code runs under atheris
(coverage-guided, L{tests.fuzz.run}) and in the ordinary test run, which
replays the seed corpus and the regression inputs (L{tests.fuzz.test_fuzz}).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.auth import MailRealm, PasswordFileChecker, hashPassword
from mailfw.auth._scram import ChannelBinding, ScramError, ScramExchange, ScramKeys
from mailfw.envelope import Envelope, Recipient
from mailfw.reply import SMTPReply, replyFromPeer
from mailfw.scheduling._dsn import NoticeWriter
from mailfw.smtp._auth import (
    AuthThrottle,
    Challenge,
    SMTPAuth,
    ThrottleLockout,
    decodeResponse,
    makeMechanism,
)
from mailfw.smtp._body import ChunkReader, DotReader
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._parser import (
    Command,
    decodeXtext,
    encodeXtext,
    parseBdat,
    parseCommandLine,
    parseDomainArgument,
    parseMailFrom,
    parseRcptTo,
)
from mailfw.smtp._server import SMTPServerProtocol
from mailfw.smtp._settings import SessionSettings
from tests._smtpdoubles import DictRouter, RecordingQueue, TLSStringTransport

__all__ = ["TARGETS", "Misbehaviour"]

# One reply line: three digits, a space or a dash, printable text.
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*\Z")


class Misbehaviour(AssertionError):
    """
    mailfw broke one of the promises a target checks.
    """


class _Failures:
    """
    Collects what mailfw logged as a failure (an exception that a Deferred
    or a callback swallowed) while a target ran: an exception that went
    into the log instead of escaping is still a crash.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)

    def forget(self) -> None:
        """
        Drop what was logged before a target ran (under pytest, this
        observer sees every test of the process from its import on).
        """
        self.events.clear()

    def check(self) -> None:
        if self.events:
            events, self.events = self.events, []
            failure = events[0].get("log_failure")
            raise Misbehaviour(
                f"{len(events)} failure(s) logged; first: {events[0].get('log_format')!r}\n"
                + (failure.getTraceback() if failure is not None else "")
            )


_failures = _Failures()
globalLogPublisher.addObserver(provider(ILogObserver)(_failures))


def _chunks(data: bytes, sizes: bytes) -> list[bytes]:
    """
    Cut C{data} into pieces whose sizes (1 to 64) come from C{sizes}, so
    that a fuzzer also explores where the network splits the input.
    """
    out, i, n = [], 0, 0
    while i < len(data):
        size = (sizes[n % len(sizes)] % 64 + 1) if sizes else len(data)
        out.append(data[i : i + size])
        i += size
        n += 1
    return out


def _split(data: bytes) -> tuple[bytes, bytes]:
    """
    The first octets choose the chunk sizes, the rest is the input.
    """
    count = data[0] % 8 if data else 0
    return data[1 : 1 + count], data[1 + count :]


# --- the command parser -----------------------------------------------------


def fuzzCommand(data: bytes) -> None:
    """
    The command line parser, and the MAIL, RCPT, BDAT, EHLO argument
    parsers behind it: every input gives a value or a refusing reply.
    """

    parsed = parseCommandLine(data)
    if isinstance(parsed, SMTPReply):
        if parsed.code < 500:
            raise Misbehaviour(f"a refused command line got {parsed}")
        return
    if not isinstance(parsed, Command) or not parsed.verb.isalpha() or parsed.verb != parsed.verb.upper():
        raise Misbehaviour(f"bad verb {parsed!r}")
    argument = parsed.argument
    for esmtp in (True, False):
        mail = parseMailFrom(argument, esmtp)
        if not isinstance(mail, SMTPReply) and mail.sender is not None:
            _checkAddress(mail.sender, mail.smtputf8)
        for utf8 in (False, True):
            rcpt = parseRcptTo(argument, "mx.example", esmtp, utf8)
            if not isinstance(rcpt, SMTPReply):
                _checkAddress(rcpt.address, utf8)
                if not isinstance(rcpt.address, Address):
                    raise Misbehaviour(f"RCPT gave {rcpt.address!r}")
    parseBdat(argument)
    parseDomainArgument(argument)


def _checkAddress(address: Any, utf8: bool) -> None:
    """
    A parsed address reparses to itself.
    """

    again = Address.parse(str(address), utf8=True)
    if again != address:
        raise Misbehaviour(f"{address!r} reparses as {again!r}")
    if not utf8 and not address.isASCII:
        raise Misbehaviour(f"non-ASCII {address!r} accepted without SMTPUTF8")


# --- address parsing and IDNA --------------------------------------------------


def fuzzAddress(data: bytes) -> None:
    """
    L{Address.parse} and L{normaliseDomain}: a value or L{AddressError};
    what parses is normal (parsing it again changes nothing) and within
    the RFC 5321 lengths.
    """

    text = data.decode("utf-8", "replace")
    for utf8 in (False, True):
        try:
            address = Address.parse(text, utf8=utf8)
        except (AddressError, UnicodeError):
            pass
        else:
            _checkAddress(address, utf8)
            if len(address.domain) > 255:
                raise Misbehaviour(f"domain of {len(address.domain)} octets accepted")
        try:
            domain = normaliseDomain(text, utf8=utf8)
        except (AddressError, UnicodeError):
            continue
        if not domain.isascii():
            raise Misbehaviour(f"normalised domain {domain!r} is not ASCII")
        if normaliseDomain(domain, utf8=utf8) != domain:
            raise Misbehaviour(f"normalising {domain!r} again changes it")


# --- the DATA and BDAT readers ---------------------------------------------------


def _referenceDot(data: bytes) -> tuple[bytes, bytes | None]:
    """
    RFC 5321 4.5.2 the slow and obvious way: the text up to the first
    CRLF.CRLF (the DATA command's CRLF counts), dot-unstuffed.
    """
    buf = b"\r\n" + data
    end = buf.find(b"\r\n.\r\n")
    if end < 0:
        return b"", None
    text = buf[: end + 2]
    return text.replace(b"\r\n.", b"\r\n")[2:], buf[end + 5 :]


def fuzzBody(data: bytes) -> None:
    """
    L{DotReader} and L{ChunkReader}: however the input is cut into
    chunks, the decoded text, the octets after the end and the flags are
    those of the whole input at once, and the text is what the reference
    decoder makes of it.
    """

    sizes, body = _split(data)
    results = []
    for pieces in ([body], _chunks(body, sizes)):
        reader = DotReader(1000)
        out, rest = [], None
        for piece in pieces:
            if reader.done:
                rest = (rest or b"") + piece
                continue
            text, after = reader.feed(piece)
            out.append(text)
            if after is not None:
                rest = after
        results.append((b"".join(out) if reader.done else None, rest, reader.done, reader.bareLineEnding))
    whole, chunked = results
    if whole[:3] != chunked[:3]:
        raise Misbehaviour(f"DATA decoded differently in chunks: {whole[:3]!r} != {chunked[:3]!r}")
    if whole[2] and whole[3] != chunked[3]:
        raise Misbehaviour("the bare line ending flag depends on the chunks")
    text, rest = _referenceDot(body)
    if rest is not None and (whole[0], whole[1]) != (text, rest):
        raise Misbehaviour(f"DATA decoded as {whole[:2]!r}, the reference says {(text, rest)!r}")
    if rest is None and whole[2]:
        raise Misbehaviour("DATA ended without CRLF.CRLF")

    flags = []
    for pieces in ([body], _chunks(body, sizes)):
        chunk = ChunkReader(1000)
        passed = b"".join(chunk.feed(piece) for piece in pieces) + chunk.finish()
        if passed != body:
            raise Misbehaviour("BDAT text changed on the way")
        flags.append((chunk.bareLineEnding, chunk.lineTooLong))
    if flags[0] != flags[1]:
        raise Misbehaviour(f"BDAT flags depend on the chunks: {flags}")
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", body) is not None
    if flags[0][0] != bare:
        raise Misbehaviour(f"BDAT bare line ending flag {flags[0][0]}, expected {bare}")


# --- AUTH decoding ---------------------------------------------------------------


def fuzzAuth(data: bytes) -> None:
    """
    The AUTH response decoder and the PLAIN and LOGIN mechanisms: a
    response is base64 or refused, and a mechanism answers any octets with
    a challenge, a refusal or credentials.
    """

    decoded = decodeResponse(data)
    for name in ("PLAIN", "LOGIN"):
        mechanism = makeMechanism(name)
        assert mechanism is not None
        payload = decoded if decoded is not None else data
        steps = [mechanism.start(None), mechanism.respond(payload)]
        if isinstance(steps[-1], Challenge):
            steps.append(mechanism.respond(payload))
        for step in steps:
            if not isinstance(step, (Challenge, SMTPReply, UsernamePassword)):
                raise Misbehaviour(f"{name} gave {step!r}")


# --- DSN parameters and notices --------------------------------------------------


def fuzzDSN(data: bytes) -> None:
    """
    The DSN parameters (RET, ENVID, NOTIFY, ORCPT, xtext) as the parser
    reads them, and a bounce built from what they and a peer's reply hold:
    a well-formed message whatever went in.
    """

    text = data.decode("utf-8", "replace")
    mailPart, _, rest = text.partition("\n")
    rcptPart, _, peerText = rest.partition("\n")
    try:
        decoded = decodeXtext(mailPart)
    except ValueError:
        pass
    else:
        if decodeXtext(encodeXtext(decoded)) != decoded:
            raise Misbehaviour(f"xtext round trip lost {decoded!r}")
    mail = parseMailFrom(f"FROM:<s@example.org> {mailPart}")
    rcpt = parseRcptTo(f"TO:<r@example.net> {rcptPart}", "mx.example", smtputf8=True)
    if isinstance(mail, SMTPReply) or isinstance(rcpt, SMTPReply):
        return
    recipient = Recipient(rcpt.address, rcpt.notify, rcpt.orcpt)
    envelope = Envelope(mail.sender, (recipient,), ret=mail.ret, envid=mail.envid, smtputf8=True)
    writer = NoticeWriter("mx.example", messageID=lambda: "<fuzz@mx.example>")
    reply = replyFromPeer(550, peerText)
    report = writer.failureReport(recipient, reply, peerText[:40] or None, 0.0)
    # The returned message is one the server accepted: CRLF lines only.
    returned = re.sub(rb"\r\n|\r|\n", b"\r\n", peerText.encode("utf-8", "replace"))
    notice = writer.build("Q1", envelope, [report], returned, True, 0.0)
    if notice is None:
        return
    body = notice.body
    if re.search(rb"\r(?!\n)|(?<!\r)\n", body):
        raise Misbehaviour("bare CR or LF in a bounce")
    if any(len(line) > 998 for line in body.split(b"\r\n")):
        raise Misbehaviour("a bounce line longer than 998 octets")
    parsed = message_from_bytes(body)
    if parsed.get_content_type() != "multipart/report" or not parsed.is_multipart():
        raise Misbehaviour(f"the bounce is {parsed.get_content_type()}")


# --- the SCRAM exchange ------------------------------------------------------------


def fuzzScram(data: bytes) -> None:
    """
    A server SCRAM-SHA-256 exchange fed a client-first and a client-final
    message from the input: it fails only with L{ScramError}, and never
    authenticates without the password.
    """

    first, _, final = data.partition(b"\n")
    for mechanism, binding in (
        ("SCRAM-SHA-256", None),
        ("SCRAM-SHA-256-PLUS", ChannelBinding("tls-exporter", b"\x01" * 32)),
    ):
        exchange = ScramExchange(mechanism, binding, serverNonce="fuzznonce")
        try:
            exchange.clientFirst(first)
            exchange.serverFirst(_KEYS)
            exchange.clientFinal(final)
        except ScramError:
            continue
        raise Misbehaviour(f"SCRAM accepted {data!r} without the password")


_KEYS: Any = None


def _scramKeys() -> Any:

    return ScramKeys.fromPassword("secret password", iterations=4096)


# --- a whole SMTP session -------------------------------------------------------------


class _Session:
    """
    What every session of the session target shares: the settings of an
    MX and of a submissions listener with AUTH (PLAIN, LOGIN, SCRAM).
    """

    def __init__(self) -> None:

        prepare()
        self.clock = Clock()
        throttle = AuthThrottle(self.clock)
        self.queue = RecordingQueue()
        self.router = DictRouter()
        path = Path(tempfile.mkdtemp(prefix="mailfw-fuzz-")) / "passwd"
        path.write_text(f"user:{hashPassword('pencil', logN=4, r=1, p=1)}:::{_KEYS.format()}\n")
        self.auth = SMTPAuth(
            Portal(
                MailRealm(senders={"user": ("user@example.org",)}),
                [PasswordFileChecker(path, maybeDeferred, scramSecret=b"secret")],
            ),
            throttle,
            timeout=30,
            lockout=ThrottleLockout(throttle),
        )


_shared: _Session | None = None


def fuzzSession(data: bytes) -> None:
    """
    A whole server session, on the MX and on the submissions listener with
    AUTH, fed the input in chunks: whatever arrives, everything written is
    a well-formed reply, no failure is logged and the session ends cleanly
    when the connection does.
    """
    global _shared

    if _shared is None:
        _shared = _Session()
    shared = _shared
    sizes, body = _split(data)
    limits = SMTPLimits(maxMessageSize=64 * 1024, maxRecipients=5, hardErrorLimit=50, errorDelay=0)
    for kind, transportFactory in (("smtp", StringTransport), ("submissions", TLSStringTransport)):
        settings = SessionSettings(
            kind,
            "mx.example",
            shared.queue,  # type: ignore[arg-type]
            shared.router,
            shared.clock,
            (),
            limits,
            None,
            auth=shared.auth if kind == "submissions" else None,
        )
        server = SMTPServerProtocol(settings)
        transport = transportFactory(peerAddress=IPv4Address("TCP", "192.0.2.9", 4000))
        server.makeConnection(transport)
        for piece in _chunks(body, sizes):
            if transport.disconnecting:
                break
            server.dataReceived(piece)
            shared.clock.advance(0)
        shared.clock.advance(1)
        output = transport.value()
        if output and not output.endswith(b"\r\n"):
            raise Misbehaviour(f"output ends mid-line: {output[-80:]!r}")
        for line in output.split(b"\r\n")[:-1]:
            if not _REPLY_LINE.match(line):
                raise Misbehaviour(f"{kind}: not a reply line: {line[:200]!r}")
        server.connectionLost(Failure(ConnectionDone("fuzz input ended")))
        shared.clock.advance(120)
        _failures.check()
    del shared.queue.messages[:]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "command": fuzzCommand,
    "address": fuzzAddress,
    "body": fuzzBody,
    "auth": fuzzAuth,
    "dsn": fuzzDSN,
    "scram": fuzzScram,
    "session": fuzzSession,
}


def prepare() -> None:
    """
    Build what the targets share (slow key derivations) once, outside the
    fuzzed calls.
    """
    global _KEYS
    if _KEYS is None:
        _KEYS = _scramKeys()


def checkLogged() -> None:
    """
    Raise L{Misbehaviour} for a failure logged since the last call.
    """
    _failures.check()


def runOne(name: str, data: bytes) -> None:
    """
    Run target C{name} on C{data}, raising whatever it raises, also a
    failure only logged.
    """
    prepare()
    _failures.forget()
    TARGETS[name](data)
    _failures.check()
