"""
The conformance kit for policies: what every L{IPolicy} must do, as a test
mixin that plugin authors run against their own policy.

Usage::

    class MyPolicyContractTests(PolicyContractTests, SynchronousTestCase):
        def makePolicy(self) -> IPolicy:
            return MyPolicy(...)

Combine it with L{twisted.trial.unittest.SynchronousTestCase}; override
L{resultOf} if the policy's L{Deferred}s fire later.

What the contract pins: every stage answers with a L{Verdict} (or a
L{Deferred} firing with one) for ordinary input, the end-of-data stage
included (a check fed a body, then ended); a reply in a verdict is a
real SMTP reply (2xx to accept, 4xx or 5xx to refuse); headers are name and
value pairs that cannot break the header section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IMessageCheck, IPolicy
from mailfw.verdict import Verdict

__all__ = ["PolicyContractTests"]

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

SESSION = Session(listener="smtp", peerHost="192.0.2.1", helo="client.example", esmtp=True)
SENDER = Address.parse("sender@example.net")
RECIPIENT = Recipient(Address.parse("rcpt@example.org"))
ENVELOPE = Envelope(sender=SENDER, recipients=(RECIPIENT,), helo="client.example", peerHost="192.0.2.1")
HEADERS = b"From: <sender@example.net>\r\nTo: <rcpt@example.org>\r\nSubject: contract\r\n"


class PolicyContractTests(_Base):
    """
    Tests every L{IPolicy} must pass.
    """

    def makePolicy(self) -> IPolicy:
        """
        The policy under test.
        """
        raise NotImplementedError("subclasses of PolicyContractTests define makePolicy")

    def resultOf(self, d: Deferred[Any]) -> Any:
        """
        The result of C{d}; override to drive a policy that answers later.
        """
        return self.successResultOf(d)

    def verdicts(self) -> list[Verdict]:
        policy = self.makePolicy()
        answers = [
            policy.checkConnection(SESSION),
            policy.checkHelo(SESSION, "client.example"),
            policy.checkSender(SESSION, SENDER, {}),
            policy.checkSender(SESSION, None, {}),
            policy.checkRecipient(SESSION, ENVELOPE, RECIPIENT),
            policy.checkMessage(SESSION, ENVELOPE, HEADERS),
        ]
        check = policy.openMessage(SESSION, ENVELOPE, HEADERS + b"\r\n")
        if check is not None:
            wait = check.write(b"A body line.\r\n")
            if isinstance(wait, Deferred):
                self.resultOf(wait)
            answers.append(check.end(()))
        policy.sessionEnded(SESSION)
        return [self.resultOf(a) if isinstance(a, Deferred) else a for a in answers]

    def test_provides(self) -> None:
        """
        The policy provides L{IPolicy} and has a name for the logs.
        """
        policy = self.makePolicy()
        self.assertTrue(verifyObject(IPolicy, policy))
        self.assertIsInstance(policy.name, str)
        check = policy.openMessage(SESSION, ENVELOPE, HEADERS + b"\r\n")
        if check is not None:
            self.assertTrue(verifyObject(IMessageCheck, check))
            check.abort()

    def test_everyStageAnswers(self) -> None:
        """
        Every stage answers with a L{Verdict} whose reply, if any, is an SMTP
        reply the server can send.
        """
        for verdict in self.verdicts():
            self.assertIsInstance(verdict, Verdict)
            if verdict.reply is not None:
                self.assertTrue(200 <= verdict.reply.code < 600)

    def test_headersAreSafe(self) -> None:
        """
        Headers a verdict adds are (name, value) pairs without line breaks,
        so they cannot break the message's header section.
        """
        for verdict in self.verdicts():
            for name, value in verdict.headers:
                self.assertTrue(name and ":" not in name and name.isascii(), name)
                self.assertNotIn("\r", value)
                self.assertNotIn("\n", value)
