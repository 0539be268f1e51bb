"""
Tests for L{mailfw.reply.SMTPReply}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailfw.reply import SMTPReply


class SMTPReplyTests(SynchronousTestCase):
    def test_classes(self) -> None:
        """
        The code decides positive, transient and permanent.
        """
        self.assertTrue(SMTPReply(250, "2.0.0", "ok").isPositive)
        self.assertTrue(SMTPReply(451, "4.3.0", "later").isTransient)
        self.assertTrue(SMTPReply(550, "5.1.1", "no").isPermanent)

    def test_invalid(self) -> None:
        """
        Codes out of range and text with line breaks are refused.
        """
        self.assertRaises(ValueError, SMTPReply, 199, "", "x")
        self.assertRaises(ValueError, SMTPReply, 250, "", "a\r\nb")

    def test_lines(self) -> None:
        """
        Enhanced codes are optional; extra texts make a multi-line reply.
        """
        reply = SMTPReply(250, "2.0.0", "first")
        self.assertEqual(reply.lines(), [b"250 2.0.0 first"])
        self.assertEqual(reply.lines(enhanced=False, more=("second",)), [b"250-first", b"250 second"])

    def test_lineLengthLimit(self) -> None:
        """
        No reply line exceeds 512 octets with its CRLF (RFC 5321
        4.5.3.1.5), even when its text echoes a long client argument.
        """
        [line] = SMTPReply(555, "5.5.4", "Unsupported parameter " + "K" * 2000).lines()
        self.assertEqual(len(line + b"\r\n"), 512)
        self.assertTrue(line.startswith(b"555 5.5.4 Unsupported parameter KKK"))
