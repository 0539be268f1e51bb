"""
Delivery status notifications (RFC 3464): bounces, delay warnings and
success reports, built with the stdlib C{email} package.

A notice is a C{multipart/report; report-type=delivery-status} with three
parts: a human-readable explanation, a C{message/delivery-status} part
(one per-message block, then one block per recipient) and the original
message (C{message/rfc822}) or only its header (C{text/rfc822-headers}).
When the original transaction used SMTPUTF8, or an address in the report
is not ASCII, the RFC 6533 types are used instead
(C{message/global-delivery-status}, C{message/global},
C{message/global-headers}) with C{utf-8} address types.

Notices go from the null sender C{<>} to the original envelope sender,
honour each recipient's NOTIFY, and are never sent for a message that
itself had the null sender (a bounce is never bounced: that is logged and
dropped).

A notice about a REQUIRETLS message (RFC 8689) returns only the original
header section, whatever C{RET} asked for (section 5: the server MUST
behave as if C{RET=HDRS} was given and disregard C{RET=FULL}), because
the return path may lack the protection the forward path had.  The notice
itself is queued without REQUIRETLS, as Postfix does by default
(C{requiretls_redact_dsn}): the body is what REQUIRETLS protected, and a
notice that needed a REQUIRETLS path back would be dropped wherever the
sender's own server lacks one, which section 5 says the REQUIRETLS of a
message SHOULD NOT cause.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy as _policy
from email.generator import BytesGenerator
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import Parser
from io import BytesIO
from typing import Any, cast

from twisted.logger import Logger

from mailfw.envelope import Envelope, Recipient
from mailfw.interfaces import IMessageBody
from mailfw.queued import Notice
from mailfw.reply import SMTPReply

__all__ = ["NoticeWriter", "RecipientReport", "readReturned"]

_KINDS = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS"}
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}


@dataclass(frozen=True)
class RecipientReport:
    """
    What a notice says about one recipient.

    @ivar action: C{"failed"}, C{"delayed"}, C{"delivered"} or
        C{"relayed"} (RFC 3464 section 2.3.3).
    @ivar status: the RFC 3463 status code, e.g. C{"5.1.1"}.
    @ivar diagnostic: the reply of the server that refused or deferred, if
        any; it becomes C{Diagnostic-Code: smtp; ...}.
    @ivar remoteMTA: the host that gave C{diagnostic}.
    @ivar lastAttempt: POSIX time of the last attempt.
    @ivar willRetryUntil: for delayed recipients, when retrying stops.
    """

    recipient: Recipient
    action: str
    status: str
    diagnostic: SMTPReply | None = None
    remoteMTA: str | None = None
    lastAttempt: float | None = None
    willRetryUntil: float | None = None


class _Generator(BytesGenerator):
    """
    A generator that writes the string payloads of C{message/*} parts
    byte for byte: the returned original and the RFC 6533 status may hold
    8-bit octets, which we carry in strings with C{surrogateescape}.
    """

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def _clean(text: str, utf8: bool) -> str:
    """
    A value from a client or a remote server made safe for one header line
    of a report: no line break of any kind (CR, LF, NEL, U+2028...) and no
    control character, which could forge fields; outside a UTF-8 report,
    ASCII only.  Anything else becomes C{?}.
    """
    return "".join(ch if ch.isprintable() and (utf8 or ch.isascii()) else "?" for ch in text)


def _date(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def _addressType(address: str) -> str:
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {address}"


def _statusOf(reply: SMTPReply) -> str:
    if reply.enhanced:
        return reply.enhanced
    return f"{reply.code // 100}.0.0"


def readReturned(body: IMessageBody, full: bool, headerLimit: int = 64 * 1024) -> bytes:
    """
    Read what a notice returns of the original: all of it when C{full},
    otherwise its header section (at most C{headerLimit} octets, cut at a
    line end).  Blocking: run it in a thread for stored bodies.
    """
    with body.open() as f:
        if full:
            return f.read()
        return _headerSection(f.read(headerLimit))


def _headerSection(data: bytes) -> bytes:
    """
    The header section at the start of C{data} (without the blank line
    that ends it), or as much of it as ends with a whole line.
    """
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[: end + 2]
    cut = data.rfind(b"\r\n")
    return data[: cut + 2] if cut >= 0 else b""


class NoticeWriter:
    """
    Builds delivery status notifications for one reporting host.

    @ivar maxReturned: messages larger than this return only their header
        section, even with C{RET=FULL}, so that a bounce never carries a
        huge attachment back (RFC 3461 section 4.3 allows this).
    """

    log = Logger()

    def __init__(
        self,
        hostname: str,
        maxReturned: int = 100 * 1024,
        messageID: Callable[[], str] | None = None,
    ) -> None:
        self.hostname = hostname
        self.maxReturned = maxReturned
        self._messageID = messageID or (
            lambda: f"<{int(time.time() * 1000):x}.{os.urandom(6).hex()}@{hostname}>"
        )

    def returnsFull(self, envelope: Envelope, size: int) -> bool:
        """
        Whether a notice about a message of C{size} octets returns all of it
        (C{RET=FULL} or no RET, and small enough) or only its header.

        Never for a REQUIRETLS message: RFC 8689 section 5 says a bounce of
        one MUST be made as if C{RET=HDRS} was given, C{RET=FULL}
        disregarded, because the return path may not be the protected
        forward path.
        """
        return envelope.ret != "HDRS" and not envelope.requireTLS and size <= self.maxReturned

    def wanted(self, reports: Sequence[RecipientReport]) -> list[RecipientReport]:
        """
        The reports whose recipients asked for that kind of notice (NOTIFY;
        without NOTIFY, failures and delays).
        """
        return [r for r in reports if r.recipient.wantsNotice(_KINDS[r.action])]

    def build(
        self,
        queueID: str,
        envelope: Envelope,
        reports: Sequence[RecipientReport],
        returned: bytes,
        full: bool,
        now: float,
    ) -> Notice | None:
        """
        The notice about C{reports} (all of one action) for the message
        C{queueID}, or C{None} when none is to be sent: no recipient asked
        for one, or the message had the null sender (logged).

        @param returned: the original message, or its header section when
            not C{full} (see L{readReturned}).
        @param full: whether C{returned} is the whole message; ignored for
            a REQUIRETLS message, which only ever gets its header section
            back (see L{returnsFull}), so a caller cannot leak its body.
        """
        if full and envelope.requireTLS:
            returned, full = _headerSection(returned), False
        reports = self.wanted(reports)
        if not reports:
            return None
        action = reports[0].action
        if envelope.sender is None:
            for report in reports:
                self.log.warn(
                    "not sending a {action} notice for {queueID} to the null sender:"
                    " {recipient} {code} {enhanced}",
                    action=action,
                    queueID=queueID,
                    recipient=str(report.recipient.address),
                    code=report.diagnostic.code if report.diagnostic else 0,
                    enhanced=report.status,
                )
            return None
        sender = envelope.sender
        utf8 = (
            envelope.smtputf8 or not sender.isASCII or not all(r.recipient.address.isASCII for r in reports)
        )
        message = self._report(queueID, envelope, reports, action, returned, full, utf8, now)
        out = BytesIO()
        generator = _Generator(out, policy=_policy.SMTPUTF8 if utf8 else _policy.SMTP)
        generator.flatten(cast(Any, message))
        data = out.getvalue()
        self.log.info(
            "{action} notice for {queueID} to {sender} about {count} recipients",
            event="notice.created",
            action=action,
            queueID=queueID,
            sender=str(sender),
            count=len(reports),
        )
        return Notice(
            Envelope(
                sender=None,
                recipients=(Recipient(sender, notify=frozenset({"NEVER"})),),
                smtputf8=utf8 and not sender.isASCII,
                body="8BITMIME" if not data.isascii() else None,
                size=len(data),
            ),
            data,
        )

    def _report(
        self,
        queueID: str,
        envelope: Envelope,
        reports: Sequence[RecipientReport],
        action: str,
        returned: bytes,
        full: bool,
        utf8: bool,
        now: float,
    ) -> Message:
        policy = _policy.SMTPUTF8 if utf8 else _policy.SMTP
        kind = "global-delivery-status" if utf8 else "delivery-status"
        report = MIMEMultipart("report", report_type=kind, policy=policy)
        report["From"] = f"Mail Delivery System <MAILER-DAEMON@{self.hostname}>"
        report["To"] = f"<{envelope.sender}>"
        report["Subject"] = _SUBJECTS[action]
        report["Date"] = _date(now)
        report["Message-ID"] = self._messageID()
        report["Auto-Submitted"] = "auto-replied"
        report.attach(self._human(queueID, envelope, reports, action, policy))
        report.attach(self._status(envelope, reports, kind, utf8, policy))
        if full:
            original = Message(policy=policy)
            original["Content-Type"] = "message/global" if utf8 else "message/rfc822"
        else:
            original = Message(policy=policy)
            original["Content-Type"] = "message/global-headers" if utf8 else "text/rfc822-headers"
        original["Content-Description"] = "Undelivered Message" if full else "Undelivered Message Headers"
        original.set_payload(returned.decode("ascii", "surrogateescape"))
        report.attach(original)
        return report

    def _human(
        self,
        queueID: str,
        envelope: Envelope,
        reports: Sequence[RecipientReport],
        action: str,
        policy: _policy.Policy,
    ) -> MIMEText:
        lines = [f"This is the mail system at host {self.hostname}.", ""]
        if action == "failed":
            lines += [
                "I'm sorry to have to inform you that your message could not",
                "be delivered to one or more recipients.",
            ]
        elif action == "delayed":
            until = reports[0].willRetryUntil
            lines += [
                "Your message could not be delivered yet to one or more recipients.",
                "It will be retried" + (f" until {_date(until)}." if until is not None else "."),
                "You do not need to send it again.",
            ]
        else:
            lines += ["Your message was successfully delivered to the recipients below."]
        lines += ["", f"Queue ID: {queueID}", ""]
        for report in reports:
            why = f": {_clean(str(report.diagnostic), True)}" if report.diagnostic is not None else ""
            via = f" (from {_clean(report.remoteMTA, True)})" if report.remoteMTA else ""
            lines.append(f"<{report.recipient.address}>{via}{why}")
        text = "\r\n".join(lines) + "\r\n"
        part = MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8", policy=policy)
        part["Content-Description"] = "Notification"
        return part

    def _status(
        self,
        envelope: Envelope,
        reports: Sequence[RecipientReport],
        kind: str,
        utf8: bool,
        policy: _policy.Policy,
    ) -> Message:
        first = [f"Reporting-MTA: dns; {self.hostname}"]
        if envelope.envid:
            first.append(f"Original-Envelope-Id: {_clean(envelope.envid, utf8)}")
        if envelope.arrival:
            first.append(f"Arrival-Date: {_date(envelope.arrival)}")
        blocks = ["\r\n".join(first)]
        for report in reports:
            fields = []
            if report.recipient.orcpt:
                addrType, _, address = report.recipient.orcpt.partition(";")
                fields.append(
                    f"Original-Recipient: {_clean(addrType.strip(), utf8)}; {_clean(address.strip(), utf8)}"
                )
            fields += [
                f"Final-Recipient: {_addressType(str(report.recipient.address))}",
                f"Action: {report.action}",
                f"Status: {report.status}",
            ]
            if report.remoteMTA:
                fields.append(f"Remote-MTA: dns; {_clean(report.remoteMTA, utf8)}")
            if report.diagnostic is not None:
                fields.append(f"Diagnostic-Code: smtp; {_clean(str(report.diagnostic), utf8)}")
            if report.lastAttempt is not None:
                fields.append(f"Last-Attempt-Date: {_date(report.lastAttempt)}")
            if report.willRetryUntil is not None and report.action == "delayed":
                fields.append(f"Will-Retry-Until: {_date(report.willRetryUntil)}")
            blocks.append("\r\n".join(fields))
        part = Message(policy=policy)
        part["Content-Type"] = f"message/{kind}"
        part["Content-Description"] = "Delivery report"
        if utf8:
            # message/global-delivery-status: the generator writes a string
            # payload of a message/* part as it is.
            text = "\r\n\r\n".join(blocks) + "\r\n"
            part.set_payload(text.encode("utf-8").decode("ascii", "surrogateescape"))
        else:
            parser = Parser(policy=_policy.compat32)
            part.set_payload([parser.parsestr(b + "\r\n", headersonly=True) for b in blocks])
        return part

    def failureReport(
        self, recipient: Recipient, reply: SMTPReply, remoteMTA: str | None, now: float
    ) -> RecipientReport:
        """
        A C{failed} report for a recipient refused with C{reply}.
        """
        return RecipientReport(recipient, "failed", _statusOf(reply), reply, remoteMTA, now)

    def delayReport(
        self,
        recipient: Recipient,
        reply: SMTPReply,
        remoteMTA: str | None,
        now: float,
        until: float,
    ) -> RecipientReport:
        """
        A C{delayed} report for a recipient deferred with C{reply}.
        """
        return RecipientReport(recipient, "delayed", _statusOf(reply), reply, remoteMTA, now, until)
