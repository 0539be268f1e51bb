"""
Tests for L{mailfw.scheduling._dsn}: RFC 3464 notices.
"""

from __future__ import annotations

import email
from email.message import Message
from typing import cast

from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryBody
from mailfw.reply import SMTPReply
from mailfw.scheduling._dsn import NoticeWriter, RecipientReport, readReturned

ORIGINAL = b"Subject: hello\r\nFrom: <sender@example.org>\r\n\r\nbody \xe9\r\n.\r\n"
REFUSED = SMTPReply(550, "5.1.1", "no such user")


def statusBlocks(part: Message) -> list[Message]:
    """
    The parts of a multipart (or the blocks of a delivery-status) part.
    """
    payload = part.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


class NoticeWriterTests(SynchronousTestCase):
    """
    L{NoticeWriter} builds RFC 3464 reports.
    """

    def setUp(self) -> None:
        self.writer = NoticeWriter("mx.example", messageID=lambda: "<id@mx.example>")

    def test_hostileValuesCannotForgeFields(self) -> None:
        """
        Values from the client (ORCPT with a UTF-8 line separator or NEL,
        ENVID) and from the remote server (a reply and host name with CR,
        LF or non-ASCII text) never break a report line or the report, even
        in a plain ASCII session.
        """
        envelope = Envelope(
            sender=Address.parse("sender@example.org"),
            recipients=(
                Recipient(
                    Address.parse("a@example.com"),
                    orcpt="utf-8;a\u2028X-Injected: yes\x85Action: delivered@example.com",
                ),
            ),
            envid="E\u2029Status: 2.0.0",
        )
        reply = SMTPReply(550, "5.1.1", "Benutzer unbekannt \u00fc")
        report = self.writer.failureReport(envelope.recipients[0], reply, "mx\u2028.example", 0.0)
        notice = self.writer.build("Q1", envelope, [report], ORIGINAL, False, 0.0)
        assert notice is not None
        _, status, _ = statusBlocks(email.message_from_bytes(notice.body))
        perMessage, perRecipient = statusBlocks(status)
        self.assertNotIn("X-Injected", perRecipient)
        self.assertEqual(perRecipient.get_all("Action"), ["failed"])
        self.assertEqual(perMessage.get_all("Status"), None)
        self.assertEqual(perRecipient["Diagnostic-Code"], "smtp; 550 5.1.1 Benutzer unbekannt ?")
        self.assertEqual(perRecipient["Remote-MTA"], "dns; mx?.example")

    def test_bounce(self) -> None:
        """
        A bounce is a multipart/report from the null sender to the original
        sender, with a human part, the delivery status fields and the whole
        original message, byte for byte.
        """
        envelope = Envelope(
            sender=Address.parse("sender@example.org"),
            recipients=(Recipient(Address.parse("a@example.com"), orcpt="rfc822;orig@example.com"),),
            envid="ENV-1",
            arrival=1000.0,
        )
        report = self.writer.failureReport(envelope.recipients[0], REFUSED, "mx.example.com", 2000.0)
        notice = self.writer.build("Q1", envelope, [report], ORIGINAL, True, 2000.0)
        assert notice is not None
        self.assertIsNone(notice.envelope.sender)
        self.assertEqual([str(r.address) for r in notice.envelope.recipients], ["sender@example.org"])
        self.assertEqual(notice.envelope.recipients[0].notify, frozenset({"NEVER"}))
        self.assertEqual(notice.envelope.size, len(notice.body))
        self.assertIn(ORIGINAL, notice.body)
        self.assertNotIn(b"\r\r\n", notice.body)
        self.assertNotIn(b"\n", notice.body.replace(b"\r\n", b""))
        message = email.message_from_bytes(notice.body)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertEqual(message["To"], "<sender@example.org>")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        human, status, original = statusBlocks(message)
        self.assertEqual(human.get_content_type(), "text/plain")
        self.assertIn("550 5.1.1 no such user", human.get_payload())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        perMessage, perRecipient = statusBlocks(status)
        self.assertEqual(perMessage["Reporting-MTA"], "dns; mx.example")
        self.assertEqual(perMessage["Original-Envelope-Id"], "ENV-1")
        self.assertEqual(perMessage["Arrival-Date"], "Thu, 01 Jan 1970 00:16:40 +0000")
        self.assertEqual(
            {k: perRecipient[k] for k in perRecipient},
            {
                "Original-Recipient": "rfc822; orig@example.com",
                "Final-Recipient": "rfc822; a@example.com",
                "Action": "failed",
                "Status": "5.1.1",
                "Remote-MTA": "dns; mx.example.com",
                "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
                "Last-Attempt-Date": "Thu, 01 Jan 1970 00:33:20 +0000",
            },
        )
        self.assertEqual(original.get_content_type(), "message/rfc822")

    def test_headersOnly(self) -> None:
        """
        With headers only, the third part is text/rfc822-headers holding the
        original header section.
        """
        envelope = makeEnvelope("a@example.com", ret="HDRS")
        self.assertFalse(self.writer.returnsFull(envelope, 10))
        returned = readReturned(MemoryBody(ORIGINAL), False)
        self.assertEqual(returned, b"Subject: hello\r\nFrom: <sender@example.org>\r\n")
        report = self.writer.failureReport(envelope.recipients[0], REFUSED, None, 2000.0)
        notice = self.writer.build("Q1", envelope, [report], returned, False, 2000.0)
        assert notice is not None
        original = statusBlocks(email.message_from_bytes(notice.body))[2]
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"body", notice.body)

    def test_largeReturnsHeaders(self) -> None:
        """
        Without RET, small messages return whole and large ones only their
        headers; RET=FULL does not override the size limit.
        """
        writer = NoticeWriter("mx.example", maxReturned=1000)
        self.assertTrue(writer.returnsFull(makeEnvelope("a@example.com"), 1000))
        self.assertFalse(writer.returnsFull(makeEnvelope("a@example.com"), 1001))
        self.assertFalse(writer.returnsFull(makeEnvelope("a@example.com", ret="FULL"), 1001))

    def test_readReturnedWithoutBlankLine(self) -> None:
        """
        A header section without an end within the limit is cut at a line
        end.
        """
        self.assertEqual(readReturned(MemoryBody(b"A: b\r\nC: dddd"), False, 8), b"A: b\r\n")
        self.assertEqual(readReturned(MemoryBody(b"A: b\r\n\r\nbody"), True), b"A: b\r\n\r\nbody")

    def test_delay(self) -> None:
        """
        A delay notice says delayed, with the retry deadline.
        """
        envelope = makeEnvelope("a@example.com")
        report = self.writer.delayReport(
            envelope.recipients[0], SMTPReply(451, "4.4.1", "no answer"), None, 2000.0, 5000.0
        )
        notice = self.writer.build("Q1", envelope, [report], b"Subject: x\r\n", False, 2000.0)
        assert notice is not None
        message = email.message_from_bytes(notice.body)
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        [_, block] = statusBlocks(statusBlocks(message)[1])
        self.assertEqual(block["Action"], "delayed")
        self.assertEqual(block["Status"], "4.4.1")
        self.assertEqual(block["Will-Retry-Until"], "Thu, 01 Jan 1970 01:23:20 +0000")

    def test_notify(self) -> None:
        """
        NOTIFY decides per recipient: NEVER suppresses everything, an
        explicit list only what it names, and no NOTIFY means failures and
        delays.
        """
        never = Recipient(Address.parse("a@example.com"), notify=frozenset({"NEVER"}))
        success = Recipient(Address.parse("b@example.com"), notify=frozenset({"SUCCESS"}))
        default = Recipient(Address.parse("c@example.com"))
        envelope = Envelope(Address.parse("s@example.org"), (never, success, default))
        reports = [self.writer.failureReport(r, REFUSED, None, 0) for r in envelope.recipients]
        self.assertEqual([r.recipient for r in self.writer.wanted(reports)], [default])
        notice = self.writer.build("Q1", envelope, reports, b"", False, 0)
        assert notice is not None
        self.assertIn(b"c@example.com", notice.body)
        self.assertNotIn(b"a@example.com", notice.body)
        self.assertIsNone(self.writer.build("Q1", envelope, reports[:2], b"", False, 0))
        delivered = RecipientReport(success, "delivered", "2.0.0")
        self.assertEqual(self.writer.wanted([delivered]), [delivered])

    def test_neverBounceABounce(self) -> None:
        """
        A notice about a message from the null sender is not built; each
        recipient is logged instead.
        """
        events: list[dict[str, object]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        envelope = makeEnvelope("a@example.com", sender=None)
        report = self.writer.failureReport(envelope.recipients[0], REFUSED, None, 0)
        self.assertIsNone(self.writer.build("Q9", envelope, [report], b"", False, 0))
        [event] = [e for e in events if e.get("queueID") == "Q9"]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["recipient"], "a@example.com")

    def test_utf8(self) -> None:
        """
        A report about an SMTPUTF8 message uses the RFC 6533 types and the
        utf-8 address type, with the UTF-8 kept as it is.
        """
        envelope = makeEnvelope("r\u00e9@example.com", sender="s\u00e9@example.org", smtputf8=True)
        report = self.writer.failureReport(envelope.recipients[0], REFUSED, None, 0)
        notice = self.writer.build("Q1", envelope, [report], "Subject: \u00e9\r\n\r\nx\r\n".encode(), True, 0)
        assert notice is not None
        self.assertTrue(notice.envelope.smtputf8)
        self.assertIn("Final-Recipient: utf-8; r\u00e9@example.com".encode(), notice.body)
        self.assertIn("Subject: \u00e9\r\n".encode(), notice.body)
        message = email.message_from_bytes(notice.body)
        self.assertEqual(message.get_param("report-type"), "global-delivery-status")
        types = [p.get_content_type() for p in message.get_payload()]  # type: ignore[union-attr]
        self.assertEqual(types, ["text/plain", "message/global-delivery-status", "message/global"])

    def test_statusWithoutEnhanced(self) -> None:
        """
        A reply without an enhanced code reports its class as the status.
        """
        r = self.writer.failureReport(
            Recipient(Address.parse("a@example.com")), SMTPReply(550, "", "no"), None, 0
        )
        self.assertEqual(r.status, "5.0.0")
