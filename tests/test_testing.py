"""
Tests for the public helpers in L{mailfw.testing}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from mailfw.envelope import Envelope, Recipient, Session
from mailfw.policy import CONTINUE, Policy, Verdict
from mailfw.queued import Selector
from mailfw.testing import connectedServer


class RejectNet(Policy):
    """
    Refuses recipients at example.net: a policy as a plugin author writes
    one.
    """

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        if recipient.address.domain == "example.net":
            return Verdict.reject(550, "5.7.1", "not here")
        return CONTINUE


class ConnectedServerTests(SynchronousTestCase):
    def test_greetingAndDelivery(self) -> None:
        """
        The helper's server greets, accepts a message for a local domain
        into its memory queue, and refuses relaying.
        """
        conn = connectedServer()
        self.assertEqual(conn.codes(), [220])
        conn.send(
            b"EHLO c.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
            b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(conn.codes(), [220, 250, 250, 250, 554, 354, 250, 221])
        self.assertTrue(conn.closed)
        [message] = self.successResultOf(conn.queue.list(Selector()))
        self.assertEqual([str(r.recipient.address) for r in message.recipients], ["b@example.org"])

    def test_policy(self) -> None:
        """
        A policy given to the helper is asked at its stage.
        """
        conn = connectedServer(localDomains=("example.org", "example.net"), policies=[RejectNet()])
        conn.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(conn.replies()[-1], b"550 5.7.1 not here")
