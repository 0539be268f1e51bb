"""
The end-of-data policy stage: checks fed the body as it streams, their
verdicts (refusals, edits, authentication results) applied before the 250,
and the chain's per-policy error handling.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.address import Address
from mailfw.envelope import Envelope, Session
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
    Policy,
    Quarantine,
    ReplaceBody,
    Verdict,
)
from mailfw.policy._chain import ChainLink
from mailfw.smtp._headers import MessageDraft
from tests._smtpdoubles import HOSTNAME, PROLOGUE, connect

BODY = b"Subject: hello\r\nFrom: <sender@example.net>\r\n\r\nline one\r\nline two\r\n"


@implementer(IMessageCheck)
class RecordingCheck:
    """
    A check that keeps the chunks it is fed and answers C{answer} (a
    verdict, an exception to raise, or C{"slow"} for a Deferred the test
    fires).
    """

    def __init__(self, answer: Any, wait: Deferred[None] | None = None) -> None:
        self.answer = answer
        self.wait = wait
        self.chunks: list[bytes] = []
        self.seenResults: tuple[AuthResult, ...] | None = None
        self.aborted = False
        self.pending: Deferred[Verdict] | None = None

    def write(self, data: bytes) -> Deferred[None] | None:
        self.chunks.append(data)
        wait, self.wait = self.wait, None
        return wait

    def end(self, results: tuple[AuthResult, ...]) -> Any:
        self.seenResults = results
        if isinstance(self.answer, BaseException):
            raise self.answer
        if self.answer == "slow":
            self.pending = Deferred()
            return self.pending
        return self.answer

    def abort(self) -> None:
        self.aborted = True


class MessagePolicy(Policy):
    """
    A policy whose end-of-data stage is C{check}; it records the header it
    was shown and the sessions that ended.
    """

    def __init__(
        self, check: RecordingCheck | None, name: str = "filter", sender: Verdict | None = None
    ) -> None:
        self.name = name
        self.check = check
        self.sender = sender
        self.headers: list[bytes] = []
        self.ended: list[Session] = []

    def checkSender(self, session: Session, sender: Address | None, parameters: Any) -> Verdict:
        return self.sender or CONTINUE

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> RecordingCheck | None:
        self.headers.append(header)
        return self.check

    def sessionEnded(self, session: Session) -> None:
        self.ended.append(session)


def send(*policies: Any, body: bytes = BODY, **kw: Any) -> Any:
    conn = connect(policies=policies, **kw)
    conn.send(PROLOGUE + body + b".\r\n")
    return conn


class MessageStageTests(SynchronousTestCase):
    def test_checkSeesHeaderAndBody(self) -> None:
        """
        The check is shown the header section as it will be queued (the
        Received field on top, the empty line at its end) and is fed the
        body only.
        """
        check = RecordingCheck(Verdict())
        policy = MessagePolicy(check)
        conn = send(policy)
        self.assertEqual(conn.newCodes()[-1], b"250")
        [header] = policy.headers
        self.assertTrue(header.startswith(b"Received: from client.example.net"), header)
        self.assertTrue(header.endswith(b"From: <sender@example.net>\r\n\r\n"), header)
        self.assertEqual(b"".join(check.chunks), b"line one\r\nline two\r\n")
        [(_, incoming)] = conn.queue.committed
        self.assertEqual(incoming.data, header + b"line one\r\nline two\r\n")

    def test_refusedAtEndOfData(self) -> None:
        """
        A refusing check's reply answers the DATA, nothing is queued, and the
        log names the policy that refused.
        """
        check = RecordingCheck(Verdict.reject(550, "5.7.1", "Spam"))
        conn = send(MessagePolicy(check, name="spam"))
        self.assertEqual(conn.lines()[-1], b"550 5.7.1 Spam")
        self.assertEqual(conn.queue.committed, [])
        [(_, incoming)] = conn.queue.messages
        self.assertTrue(incoming.aborted)

    def test_laterChecksAbortedAfterRefusal(self) -> None:
        """
        The checks after a refusing one are not asked, and are aborted.
        """
        first = RecordingCheck(Verdict.reject(554, "5.7.1", "Virus"))
        second = RecordingCheck(Verdict())
        send(MessagePolicy(first, "av"), MessagePolicy(second, "spam"))
        self.assertIsNone(second.seenResults)
        self.assertTrue(second.aborted)

    def test_resultsAndHeaders(self) -> None:
        """
        Results of every stage end in one Authentication-Results field on
        top of the queued copy; a later check sees the results of earlier
        stages and checks; added fields go where the edit says.
        """
        spf = AuthResult("spf", "pass", properties=(("smtp.mailfrom", "example.net"),))
        dkim = AuthResult("dkim", "pass", properties=(("header.d", "example.net"),))
        dmarc = RecordingCheck(Verdict(results=(AuthResult("dmarc", "pass"),)))
        policies = (
            MessagePolicy(None, "spf", sender=Verdict(results=(spf,))),
            MessagePolicy(
                RecordingCheck(Verdict(results=(dkim,), edits=(AddHeader("X-Scanned", "yes"),))), "dkim"
            ),
            MessagePolicy(dmarc, "dmarc"),
        )
        conn = send(*policies)
        self.assertEqual(dmarc.seenResults, (spf, dkim))
        [(_, incoming)] = conn.queue.committed
        header = incoming.header
        self.assertTrue(
            header.startswith(
                f"Authentication-Results: {HOSTNAME};\r\n\tspf=pass smtp.mailfrom=example.net;\r\n"
                "\tdkim=pass header.d=example.net;\r\n\tdmarc=pass\r\nReceived: ".encode()
            ),
            header,
        )
        self.assertTrue(header.endswith(b"From: <sender@example.net>\r\nX-Scanned: yes\r\n\r\n"), header)

    def test_forgedResultsRemoved(self) -> None:
        """
        A client's Authentication-Results field that claims our authserv-id
        is removed; another server's is kept.
        """
        forged = f"Authentication-Results: {HOSTNAME.upper()} (forged); dkim=pass\r\n".encode()
        theirs = b"Authentication-Results: other.example; spf=fail\r\n"
        check = RecordingCheck(Verdict(results=(AuthResult("dkim", "none"),)))
        conn = send(MessagePolicy(check), body=forged + theirs + BODY)
        [(_, incoming)] = conn.queue.committed
        self.assertNotIn(b"forged", incoming.data)
        self.assertIn(theirs, incoming.data)

    def test_envelopeEdits(self) -> None:
        """
        Sender and recipient edits change the queued envelope.
        """
        edits = (
            ChangeSender(Address.parse("bounces@example.net")),
            AddRecipient(Address.parse("archive@example.org")),
            DeleteRecipient(Address.parse("rcpt@example.org")),
        )
        conn = send(MessagePolicy(RecordingCheck(Verdict(edits=edits))))
        [(_, incoming)] = conn.queue.committed
        assert incoming.envelope is not None
        self.assertEqual(str(incoming.envelope.sender), "bounces@example.net")
        self.assertEqual([str(r.address) for r in incoming.envelope.recipients], ["archive@example.org"])

    def test_replaceBody(self) -> None:
        """
        A replaced body is what the queue stores below the header section.
        """
        conn = send(MessagePolicy(RecordingCheck(Verdict(edits=(ReplaceBody(b"new body\n"),)))))
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.data.endswith(b"\r\n\r\nnew body\r\n"), incoming.data)

    def test_quarantine(self) -> None:
        """
        A quarantined message is accepted and stored held.
        """
        conn = send(MessagePolicy(RecordingCheck(Verdict(edits=(Quarantine("suspicious"),)))))
        self.assertEqual(conn.newCodes()[-1], b"250")
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.hold)

    def test_discard(self) -> None:
        """
        A discarded message is answered 250 and not queued; so is one whose
        recipients were all deleted.
        """
        for edit in (Discard("filter said so"), DeleteRecipient(Address.parse("rcpt@example.org"))):
            conn = send(MessagePolicy(RecordingCheck(Verdict(edits=(edit,)))))
            self.assertEqual(conn.newCodes()[-1], b"250")
            self.assertEqual(conn.queue.committed, [])

    def test_failingCheckDefers(self) -> None:
        """
        A check that raises gives 451 4.3.0 with on_error = "defer" (the
        default) and is skipped with on_error = "accept".
        """
        conn = send(MessagePolicy(RecordingCheck(RuntimeError("filter down"))))
        self.assertEqual(conn.lines()[-1], b"451 4.3.0 Local error in processing, try again later")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        link = ChainLink(MessagePolicy(RecordingCheck(RuntimeError("filter down"))), onError="accept")
        conn = send(link)
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(len(conn.queue.committed), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_checkTimeout(self) -> None:
        """
        A check that does not answer within its link's timeout gives
        451 4.4.3.
        """
        check = RecordingCheck("slow")
        conn = send(ChainLink(MessagePolicy(check), timeout=5.0))
        self.assertEqual(conn.newCodes()[-1], b"354")
        conn.clock.advance(5)
        self.assertEqual(conn.lines()[-1], b"451 4.4.3 Temporary lookup failure, try again later")
        self.assertEqual(conn.queue.committed, [])

    def test_slowCheckHoldsInput(self) -> None:
        """
        A check whose write returns a Deferred stops the session reading
        until it fires.
        """
        wait: Deferred[None] = Deferred()
        check = RecordingCheck(Verdict(), wait)
        conn = connect(policies=(MessagePolicy(check),))
        conn.send(PROLOGUE + BODY)
        self.assertEqual(conn.transport.producerState, "paused")
        wait.callback(None)
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(b".\r\n")
        self.assertEqual(conn.newCodes()[-1], b"250")

    def test_abortedWhenClientLeaves(self) -> None:
        """
        A client that hangs up during DATA aborts the checks.
        """
        check = RecordingCheck(Verdict())
        conn = connect(policies=(MessagePolicy(check),))
        conn.send(PROLOGUE + BODY)
        conn.proto.connectionLost()
        self.assertTrue(check.aborted)

    def test_sessionEnded(self) -> None:
        """
        Each policy is told when a session ends, with its id.
        """
        policy = MessagePolicy(None)
        conn = connect(policies=(policy,))
        conn.proto.connectionLost()
        [session] = policy.ended
        self.assertEqual(session.id, conn.proto.session.id)
        self.assertTrue(session.id)

    def test_noPoliciesNoChange(self) -> None:
        """
        Without policies, the queued copy is the message as received with
        the Received field on top.
        """
        conn = send()
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.data.startswith(b"Received: "))
        self.assertTrue(incoming.data.endswith(BODY))


class MessageDraftTests(SynchronousTestCase):
    HEADER = (
        b"Received: x\r\nSubject: one\r\nTo: <a@example.org>,\r\n <b@example.org>\r\nSubject: two\r\n\r\n"
    )

    def draft(self, *edits: Any) -> bytes:
        draft = MessageDraft(self.HEADER, Envelope(None))
        draft.apply(edits)
        return draft.header

    def test_unchanged(self) -> None:
        """
        Without edits the header section is kept byte for byte.
        """
        self.assertEqual(self.draft(), self.HEADER)

    def test_addAndInsert(self) -> None:
        """
        Added fields go at the end (before the empty line); inserted ones
        before the field at their index, folded continuation lines
        included.
        """
        header = self.draft(
            AddHeader("X-End", "1"), AddHeader("X-Top", "2", index=0), AddHeader("X-Three", "3", 3)
        )
        self.assertEqual(
            header,
            b"X-Top: 2\r\nReceived: x\r\nSubject: one\r\nX-Three: 3\r\nTo: <a@example.org>,\r\n <b@example.org>\r\n"
            b"Subject: two\r\nX-End: 1\r\n\r\n",
        )

    def test_changeAndDelete(self) -> None:
        """
        ChangeHeader replaces the nth field of a name, deletes it with
        None, and adds a missing one.
        """
        header = self.draft(
            ChangeHeader("subject", "changed", 2), ChangeHeader("To", None), ChangeHeader("X-New", "v")
        )
        self.assertEqual(header, b"Received: x\r\nSubject: one\r\nsubject: changed\r\nX-New: v\r\n\r\n")

    def test_foldedValueKept(self) -> None:
        """
        A value folded with LF and white space (as milters send it) is
        stored with CRLF.
        """
        self.assertIn(b"X-Long: a\r\n\tb\r\n", self.draft(AddHeader("X-Long", "a\n\tb")))

    def test_invalidDropped(self) -> None:
        """
        A value that would end the header section, or a bad name, is
        dropped.
        """
        self.assertEqual(
            self.draft(AddHeader("X-Bad", "a\r\n\r\nbody"), AddHeader("Bad Name", "x")), self.HEADER
        )
