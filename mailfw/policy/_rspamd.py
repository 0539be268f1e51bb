"""
The C{rspamd} policy: rspamd's HTTP protocol (C{POST /checkv2}), as Haraka,
maddy and KumoMTA speak it, at the end-of-data stage.

The request starts when the header section is accepted: the envelope and
the client go in request headers (C{IP}, C{Helo}, C{From}, one C{Rcpt}
per recipient, C{Queue-Id}, C{User}, C{TLS-Cipher}, C{MTA-Name},
C{Password}) and the message is the request body, sent chunked as it
streams in (rspamd accepts chunked requests; the real one is tested), so
the message is never held whole.  Connections are pooled and kept alive
across messages.  rspamd's answer becomes the verdict: its action
(reject, soft reject, greylist, add header, rewrite subject), the header
changes of its C{milter} block, and an C{X-Spam-Status:} result field on
accepted mail.

rspamd that cannot be reached, answers with an HTTP error, something that
is not its JSON, too much, or nothing within C{scan_timeout}: the message
gets C{default_action}, and one log line names the filter and what it
did.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import (
    CONTINUE,
    AddHeader,
    AuthResult,
    ChangeHeader,
    Discard,
    MessageEdit,
    Quarantine,
    Verdict,
)
from mailfw.policy._streaming import DEFAULT_ACTIONS, BodyStream, FilterPolicy, StallTimer
from mailfw.reply import SMTPReply, replyFromPeer

__all__ = ["RspamdError", "RspamdPolicy", "fromConfig", "verdictOf"]

REJECT_REPLY = SMTPReply(550, "5.7.1", "Spam message rejected")
SOFT_REJECT_REPLY = SMTPReply(451, "4.7.1", "Try again later")
GREYLIST_REPLY = SMTPReply(451, "4.7.1", "Greylisted, please try again later")

# rspamd's own limit on a message (its max_message option) by default:
# larger ones are not sent, so rspamd never refuses one for its size.
DEFAULT_MAX_SIZE = 50 << 20
# A reply lists every symbol with its description; this is far above any.
MAX_REPLY = 2 << 20
RESULT_HEADER = "X-Spam-Status"
MAX_IDLE_CONNECTIONS = 16

_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_FIELD_NAME = re.compile(rb"([^:\s]+)[ \t]*:")


class RspamdError(Exception):
    """
    rspamd's answer is not one this client understands.
    """


def _text(value: object, limit: int = 400) -> str:
    """
    A string from rspamd's JSON made safe for a reply or a header: printable,
    one line, bounded.
    """
    text = value if isinstance(value, str) else ""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()[:limit]


def _count(header: bytes, name: str) -> int:
    """
    How many fields called C{name} the header section has.
    """
    wanted = name.lower().encode("utf-8", "replace")
    count = 0
    for line in header.split(b"\r\n"):
        match = _FIELD_NAME.match(line)
        if match is not None and line[:1] not in (b" ", b"\t") and match.group(1).lower() == wanted:
            count += 1
    return count


def _milterEdits(block: object, header: bytes) -> tuple[list[MessageEdit], set[str]]:
    """
    The C{milter} block of a reply as message edits: C{remove_headers}
    (name to occurrence: 0 all, N the Nth, -N the Nth from the end) first,
    then C{add_headers} (name to a value, C{{"value", "order"}} or a list
    of them; an C{order} inserts at that index).

    @return: the edits and the names of the fields added.
    @raise RspamdError: for a block that does not have that shape.
    """
    edits: list[MessageEdit] = []
    added: set[str] = set()
    if block is None:
        return edits, added
    if not isinstance(block, dict):
        raise RspamdError("milter block is not an object")
    removals = block.get("remove_headers", {})
    additions = block.get("add_headers", {})
    if not isinstance(removals, dict) or not isinstance(additions, dict):
        raise RspamdError("milter headers are not objects")
    for name, which in removals.items():
        if not _HEADER_NAME.match(name) or not isinstance(which, int) or isinstance(which, bool):
            raise RspamdError(f"bad header removal {name[:40]!r}")
        present = _count(header, name)
        if which == 0:
            occurrences = list(range(present, 0, -1))
        elif which > 0:
            occurrences = [which] if which <= present else []
        else:
            occurrences = [present + which + 1] if -which <= present else []
        edits.extend(ChangeHeader(name, None, occurrence) for occurrence in occurrences)
    for name, values in additions.items():
        if not _HEADER_NAME.match(name):
            raise RspamdError(f"bad header name {name[:40]!r}")
        for value in values if isinstance(values, list) else [values]:
            order: object = None
            if isinstance(value, dict):
                order = value.get("order")
                value = value.get("value")
            if not isinstance(value, str) or not (
                order is None or (isinstance(order, int) and not isinstance(order, bool))
            ):
                raise RspamdError(f"bad header value for {name[:40]!r}")
            # rspamd folds long values with LF (or CRLF): the stored copy
            # uses CRLF.
            folded = value.replace("\r\n", "\n").replace("\n", "\r\n")
            index = None if order is None or order <= 0 else order - 1
            edits.append(AddHeader(name, folded, index))
            added.add(name.lower())
    return edits, added


def verdictOf(reply: object, header: bytes) -> Verdict:
    """
    rspamd's JSON answer as a verdict.

    @param header: the header section rspamd saw (its header removals
        count occurrences in it).
    @raise RspamdError: for an answer without a known action or with a
        malformed part.
    """
    if not isinstance(reply, dict):
        raise RspamdError("the answer is not a JSON object")
    action = reply.get("action")
    score, required = reply.get("score", 0.0), reply.get("required_score", 0.0)
    if not isinstance(score, (int, float)) or not isinstance(required, (int, float)):
        raise RspamdError("score is not a number")
    messages = reply.get("messages")
    message = _text(messages.get("smtp_message")) if isinstance(messages, dict) else ""
    if action == "reject":
        return Verdict(replyFromPeer(550, f"5.7.1 {message}") if message else REJECT_REPLY)
    if action == "soft reject":
        return Verdict(replyFromPeer(451, f"4.7.1 {message}") if message else SOFT_REJECT_REPLY)
    if action == "greylist":
        return Verdict(replyFromPeer(451, f"4.7.1 {message}") if message else GREYLIST_REPLY)
    if action not in ("no action", "add header", "rewrite subject", "discard", "quarantine"):
        raise RspamdError(f"unknown action {_text(action, 40)!r}")
    edits, added = _milterEdits(reply.get("milter"), header)
    spam = action != "no action"
    if action == "add header" and "x-spam" not in added:
        edits.append(AddHeader("X-Spam", "Yes"))
    elif action == "rewrite subject":
        subject = reply.get("subject")
        if not isinstance(subject, str):
            raise RspamdError("rewrite subject without a subject")
        edits.append(ChangeHeader("Subject", _text(subject, 998), 1))
    elif action == "discard":
        edits.append(Discard(f"rspamd: score {score:.2f}"))
    elif action == "quarantine":
        edits.append(Quarantine(f"rspamd: score {score:.2f}"))
    if RESULT_HEADER.lower() not in added:
        # Ours, like Authentication-Results: one the client wrote goes.
        present = _count(header, RESULT_HEADER)
        edits.extend(ChangeHeader(RESULT_HEADER, None, n) for n in range(present, 0, -1))
        status = f"{'Yes' if spam else 'No'}, score={score:.2f} required={required:.2f}"
        edits.append(AddHeader(RESULT_HEADER, status))
    return Verdict(edits=tuple(edits))


class RspamdPolicy(FilterPolicy):
    """
    rspamd, asked about each message at the end of data.

    @ivar defaultAction: C{"tempfail"}, C{"accept"} or C{"reject"}: what
        rspamd that is down or misbehaves means for a message.
    """

    log = Logger()
    filterKind = "rspamd"

    def __init__(
        self,
        name: str,
        url: str,
        client: HTTPClient,
        clock: IReactorTime,
        hostname: str,
        password: str | None = None,
        scanTimeout: float = 30.0,
        defaultAction: str = "tempfail",
        maxSize: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.name = name
        self.url = self.description = url.rstrip("/")
        self._client = client
        self._clock = clock
        self._hostname = hostname
        self._password = password
        self.scanTimeout = scanTimeout
        self.defaultAction = defaultAction
        self.maxSize = maxSize

    def skipped(self, session: Session, envelope: Envelope, size: int) -> None:
        self.log.info(
            "rspamd {policy} skipped {queueID} from {peer}: {size} octets is above max_size {maxSize}",
            policy=self.name,
            queueID=envelope.queueID,
            peer=session.peerHost,
            size=size,
            maxSize=self.maxSize,
        )

    def requestHeaders(self, session: Session, envelope: Envelope) -> Headers:
        """
        The envelope and the client as rspamd's request headers.
        """

        def value(text: str) -> bytes:
            return _text(text, 1000).encode("utf-8", "replace")

        headers: dict[bytes, list[bytes]] = {
            b"From": [value(f"<{envelope.senderText}>")],
            b"Rcpt": [value(f"<{r.address}>") for r in envelope.recipients],
            b"Queue-Id": [value(envelope.queueID)],
            b"MTA-Name": [value(self._hostname)],
        }
        # No Hostname: mailfw does not look up the client's name, and
        # "unknown" would tell rspamd that its reverse DNS failed.
        if session.peerHost:
            headers[b"IP"] = [value(session.peerHost)]
        if session.helo:
            headers[b"Helo"] = [value(session.helo)]
        if session.authenticated:
            headers[b"User"] = [value(session.authenticated)]
        if session.tls:
            # rspamd marks the message as received over TLS when it sees
            # TLS-Cipher; the cipher itself is not known to policies.
            headers[b"TLS-Cipher"] = [b"unknown"]
        if self._password is not None:
            headers[b"Password"] = [value(self._password)]
        return Headers(headers)

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        if envelope.size is not None and envelope.size > self.maxSize:
            self.skipped(session, envelope, envelope.size)
            return None
        return _RspamdScan(self, self._client, self._clock, session, envelope, header)


@implementer(IMessageCheck)
class _RspamdScan:
    """
    One message on its way to rspamd: the request is made when the check
    opens, its body streamed from L{write}, and its answer is the verdict.
    """

    def __init__(
        self,
        policy: RspamdPolicy,
        client: HTTPClient,
        clock: IReactorTime,
        session: Session,
        envelope: Envelope,
        header: bytes,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._session = session
        self._envelope = envelope
        self._header = header
        self._size = len(header)
        self._verdict: Verdict | None = None
        self._ending: Deferred[Verdict] | None = None
        self._timer = StallTimer(
            clock, policy.scanTimeout, lambda: self._fail(f"no progress within {policy.scanTimeout:g}s")
        )
        self._body = BodyStream()
        self._body.write(header)
        self._request = client.request(
            "POST",
            policy.url + "/checkv2",
            data=self._body,
            headers=policy.requestHeaders(session, envelope),
            allow_redirects=False,
            unbuffered=True,
        )
        self._request.addCallback(self._answered).addCallbacks(self._settle, self._failed)

    # --- rspamd's side --------------------------------------------------------------

    def _answered(self, response: IResponse) -> Deferred[Verdict]:
        if response.code != 200:
            raise RspamdError(f"HTTP status {response.code}")
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            if self._verdict is not None:
                raise RspamdError("dropped")
            size[0] += len(data)
            if size[0] > MAX_REPLY:
                raise RspamdError(f"answer larger than {MAX_REPLY} octets")
            chunks.append(data)

        def parse(_: object) -> Verdict:
            try:
                reply = json.loads(b"".join(chunks))
            except ValueError:
                raise RspamdError("the answer is not JSON") from None
            return verdictOf(reply, self._header)

        collected: Deferred[Any] = treq.collect(response, collect)
        return collected.addCallback(parse)

    def _settle(self, verdict: Verdict) -> None:
        if self._verdict is None:
            self._verdict = verdict
        self._timer.stop()
        self._body.stop()
        ending, self._ending = self._ending, None
        if ending is not None:
            ending.callback(self._verdict)

    def _failed(self, f: Failure) -> None:
        if self._verdict is not None:
            self._settle(self._verdict)
            return
        if f.check(CancelledError):
            reason = "the scan was cancelled"
        elif f.check(RspamdError):
            reason = f.getErrorMessage()
        else:
            reason = f"{f.type.__name__}: {f.getErrorMessage()}" if f.type else f.getErrorMessage()
        self._settle(self._policy.failed(self._session, reason))

    def _fail(self, reason: str) -> None:
        """
        Give up on rspamd now: log, default action, drop the request.
        """
        if self._verdict is None:
            self._verdict = self._policy.failed(self._session, reason)
        self._drop()

    def _drop(self) -> None:
        """
        Stop sending, hang up if the answer has not begun (else its next
        data drops the connection), and answer with the verdict decided.
        """
        if not self._request.called:
            self._request.cancel()
        self._settle(self._verdict or CONTINUE)

    # --- IMessageCheck --------------------------------------------------------------

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._verdict is not None or self._body.stopped:
            return None
        self._size += len(data)
        if self._size > self._policy.maxSize:
            self._policy.skipped(self._session, self._envelope, self._size)
            self._verdict = CONTINUE
            self._drop()
            return None
        wait = self._body.write(data)
        if wait is None:
            return None
        self._timer.arm()
        return wait.addCallback(self._timer.progress)

    def end(self, results: tuple[AuthResult, ...]) -> Verdict | Deferred[Verdict]:
        if self._verdict is not None:
            return self._verdict

        def cancel(_: Deferred[Verdict]) -> None:
            self._ending = None
            self._fail("the session stopped waiting")

        self._ending = Deferred(cancel)
        ending = self._ending
        self._body.finish()
        self._timer.stop()
        self._timer.arm()
        return ending

    def abort(self) -> None:
        if self._verdict is None:
            self._verdict = CONTINUE
        self._drop()


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> RspamdPolicy:
    section = Section(f"[policy.{instanceName}]", options)
    url = section.text("url")
    password = section.text("password", None)
    scanTimeout = section.number("scan_timeout", 30.0, minimum=0.1)
    defaultAction = section.choice("default_action", DEFAULT_ACTIONS, "tempfail")
    maxSize = section.integer("max_size", DEFAULT_MAX_SIZE, minimum=1)
    section.finish()
    if not re.fullmatch(r"https?://[^/\s]+/?", url):
        raise ConfigError(f"{section.title} url: expected http://HOST:PORT, got {url!r}")
    pool = HTTPConnectionPool(context.reactor, persistent=True)
    # Twisted keeps 2 idle connections per host by default; a busy MX has
    # more messages in flight, each of which would otherwise reconnect.
    pool.maxPersistentPerHost = MAX_IDLE_CONNECTIONS
    agent = Agent(context.reactor, connectTimeout=scanTimeout, pool=pool)
    return RspamdPolicy(
        instanceName,
        url,
        HTTPClient(agent),
        context.reactor,
        context.hostname,
        password,
        scanTimeout,
        defaultAction,
        maxSize,
    )
