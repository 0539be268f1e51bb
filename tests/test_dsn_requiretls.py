"""
Tests for the notices about REQUIRETLS messages (RFC 8689 section 5): they
return the original header section only and, redacted so, are queued
without REQUIRETLS (as Postfix's C{requiretls_redact_dsn}), both as
L{NoticeWriter} builds them and as the L{Scheduler} queues them.
"""

from __future__ import annotations

import email
from email.message import Message

from twisted.trial.unittest import SynchronousTestCase

from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryBody
from mailfw.scheduling._dsn import NoticeWriter, readReturned
from tests.test_scheduler import (
    GREYLISTED,
    OK,
    UNKNOWN,
    FakeAgent,
    SchedulerTestsMixin,
    runUntilIdle,
    subpart,
)

ORIGINAL = b"Subject: secret\r\nFrom: <sender@example.org>\r\n\r\nfor your eyes only\r\n"
HEADER = b"Subject: secret\r\nFrom: <sender@example.org>\r\n"


def returnedPart(body: bytes) -> Message:
    """
    The third part of the notice C{body}: what it returns of the original.
    """
    return subpart(email.message_from_bytes(body), 2)


class NoticeWriterRequireTLSTests(SynchronousTestCase):
    """
    L{NoticeWriter} returns only the header of a REQUIRETLS message, and
    the notice so redacted goes back without REQUIRETLS.
    """

    def setUp(self) -> None:
        self.writer = NoticeWriter("mx.example", messageID=lambda: "<id@mx.example>")

    def test_failureReturnsHeadersOnly(self) -> None:
        """
        RET=FULL on a small REQUIRETLS message still returns only its
        header section, as text/rfc822-headers, and the bounce (nothing
        confidential left in it) does not require TLS back.
        """
        envelope = makeEnvelope("a@example.com", ret="FULL", requireTLS=True)
        self.assertFalse(self.writer.returnsFull(envelope, len(ORIGINAL)))
        report = self.writer.failureReport(envelope.recipients[0], UNKNOWN, None, 2000.0)
        returned = readReturned(MemoryBody(ORIGINAL), False)
        notice = self.writer.build("Q1", envelope, [report], returned, False, 2000.0)
        assert notice is not None
        self.assertFalse(
            notice.envelope.requireTLS, "a redacted bounce would be dropped without a REQUIRETLS path"
        )
        self.assertIsNone(notice.envelope.sender)
        part = returnedPart(notice.body)
        self.assertEqual(part.get_content_type(), "text/rfc822-headers")
        self.assertEqual(part.get_payload(), HEADER.decode())
        self.assertNotIn(b"for your eyes only", notice.body)

    def test_fullMessageGivenIsCut(self) -> None:
        """
        A caller that hands L{NoticeWriter.build} the whole REQUIRETLS
        message with C{full=True} still gets a notice with the header
        section only: the body never goes into the notice.
        """
        envelope = makeEnvelope("a@example.com", requireTLS=True)
        report = self.writer.failureReport(envelope.recipients[0], UNKNOWN, None, 2000.0)
        notice = self.writer.build("Q1", envelope, [report], ORIGINAL, True, 2000.0)
        assert notice is not None
        part = returnedPart(notice.body)
        self.assertEqual(part.get_content_type(), "text/rfc822-headers")
        self.assertEqual(part.get_payload(), HEADER.decode())
        self.assertNotIn(b"for your eyes only", notice.body)

    def test_delayKeepsRequireTLS(self) -> None:
        """
        A delay notice about a REQUIRETLS message returns the header
        section only and is queued without REQUIRETLS.
        """
        envelope = makeEnvelope("a@example.com", requireTLS=True)
        report = self.writer.delayReport(envelope.recipients[0], GREYLISTED, None, 2000.0, 5000.0)
        notice = self.writer.build("Q1", envelope, [report], HEADER, False, 2000.0)
        assert notice is not None
        self.assertFalse(notice.envelope.requireTLS)
        self.assertEqual(returnedPart(notice.body).get_content_type(), "text/rfc822-headers")

    def test_utf8HeadersOnly(self) -> None:
        """
        In an SMTPUTF8 notice the header section goes back as
        message/global-headers, still without the body.
        """
        envelope = makeEnvelope("a@example.com", sender="jörg@example.org", smtputf8=True, requireTLS=True)
        report = self.writer.failureReport(envelope.recipients[0], UNKNOWN, None, 2000.0)
        notice = self.writer.build("Q1", envelope, [report], ORIGINAL, True, 2000.0)
        assert notice is not None
        self.assertFalse(notice.envelope.requireTLS)
        self.assertEqual(returnedPart(notice.body).get_content_type(), "message/global-headers")
        self.assertNotIn(b"for your eyes only", notice.body)

    def test_otherMessagesUnchanged(self) -> None:
        """
        Without REQUIRETLS a small message still comes back whole, and the
        notice has no REQUIRETLS.
        """
        envelope = makeEnvelope("a@example.com")
        self.assertTrue(self.writer.returnsFull(envelope, len(ORIGINAL)))
        report = self.writer.failureReport(envelope.recipients[0], UNKNOWN, None, 2000.0)
        notice = self.writer.build("Q1", envelope, [report], ORIGINAL, True, 2000.0)
        assert notice is not None
        self.assertFalse(notice.envelope.requireTLS)
        self.assertEqual(returnedPart(notice.body).get_content_type(), "message/rfc822")
        self.assertIn(ORIGINAL, notice.body)


class SchedulerRequireTLSNoticeTests(SchedulerTestsMixin):
    """
    The scheduler queues the notices of a REQUIRETLS message with the
    header section only, without REQUIRETLS.
    """

    def queuedNotices(self, agent: FakeAgent) -> list[tuple[bool, Message, bytes]]:
        return [
            (d.envelope.requireTLS, email.message_from_bytes(d.body), d.body)
            for d in agent.deliveries
            if d.envelope.sender is None
        ]

    def test_bounce(self) -> None:
        """
        A refused recipient of a REQUIRETLS message sent with RET=FULL
        gets a bounce that holds only the header, queued without
        REQUIRETLS.
        """
        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN if a == "bad@example.com" else OK)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("bad@example.com", ret="FULL", requireTLS=True), ORIGINAL)
        self.clock.advance(0)
        [(requireTLS, bounce, body)] = self.queuedNotices(agent)
        self.assertFalse(requireTLS, "the redacted bounce was queued with REQUIRETLS")
        self.assertEqual(bounce["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(subpart(bounce, 2).get_content_type(), "text/rfc822-headers")
        self.assertIn(b"Subject: secret", body)
        self.assertNotIn(b"for your eyes only", body)

    def test_delayAndBounce(self) -> None:
        """
        A REQUIRETLS message deferred for days gets a delay notice and then
        a bounce, neither with the body nor with REQUIRETLS.
        """
        agent = FakeAgent(self.clock, reply=lambda a: GREYLISTED if a == "a@example.com" else OK)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("a@example.com", requireTLS=True), ORIGINAL)
        runUntilIdle(self.clock)
        [(delayTLS, delay, delayBody), (bounceTLS, bounce, bounceBody)] = self.queuedNotices(agent)
        self.assertEqual(delay["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(bounce["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual((delayTLS, bounceTLS), (False, False))
        for message, body in ((delay, delayBody), (bounce, bounceBody)):
            self.assertEqual(subpart(message, 2).get_content_type(), "text/rfc822-headers")
            self.assertNotIn(b"for your eyes only", body)

    def test_otherBouncesUnchanged(self) -> None:
        """
        The bounce of a message without REQUIRETLS is queued without it
        and returns the whole message.
        """
        agent = FakeAgent(self.clock, reply=lambda a: UNKNOWN)
        self.makeScheduler(agent)
        self.enqueue(makeEnvelope("bad@example.com"), ORIGINAL)
        self.clock.advance(0)
        [(requireTLS, bounce, body)] = self.queuedNotices(agent)
        self.assertFalse(requireTLS)
        self.assertEqual(subpart(bounce, 2).get_content_type(), "message/rfc822")
        self.assertIn(b"for your eyes only", body)
