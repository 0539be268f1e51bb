"""
Tests for the session's parts on their own: the input framer
(L{mailfw.smtp._framing.InputFramer}) and the reply pipeline
(L{mailfw.smtp._pipeline.ReplyPipeline}), each driven through a recording
owner, with no protocol around them.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailfw.reply import SMTPReply
from mailfw.smtp import SMTPLimits
from mailfw.smtp import _replies as R
from mailfw.smtp._framing import MAX_UNREAD, InputFramer
from mailfw.smtp._pipeline import ReplyPipeline
from mailfw.smtp._replies import Answer
from mailfw.smtp._state import ConnectionState

OK = SMTPReply(250, "2.0.0", "Ok")
BAD = SMTPReply(500, "5.5.2", "Command unrecognized")


class FramingOwner:
    """
    Records what an L{InputFramer} hands on; a line C{b"RAW n"} switches to
    raw octets for C{n} octets, a line C{b"PAUSE"} pauses.
    """

    def __init__(self) -> None:
        self.state = ConnectionState()
        self.events: list[tuple[str, bytes]] = []
        self.framer = InputFramer(self, 20)
        self.rawLeft = 0

    def lineReceived(self, line: bytes) -> None:
        self.events.append(("line", line))
        if line.startswith(b"RAW "):
            self.rawLeft = int(line[4:])
            self.framer.raw = True
        elif line == b"PAUSE":
            self.framer.pause("test")
        elif line == b"NESTED":
            # A reply resumed input from inside the loop: only buffered.
            self.framer.feed(b"AFTER\r\n")

    def rawDataReceived(self, data: bytes) -> None:
        take = data[: self.rawLeft]
        self.rawLeft -= len(take)
        self.events.append(("raw", take))
        if not self.rawLeft:
            self.framer.raw = False
            self.framer.unread(data[len(take) :])

    def lineTooLong(self) -> None:
        self.events.append(("long", b""))

    def overrun(self) -> None:
        self.events.append(("overrun", b""))
        self.state.hangUp()


class InputFramerTests(SynchronousTestCase):
    def test_linesAndRaw(self) -> None:
        """
        Lines are cut at CRLF however the input is split; raw octets go on
        as chunks, and what follows them is read as lines again.
        """
        owner = FramingOwner()
        for piece in (b"ON", b"E\r\nRAW 5\r\nab", b"cdeTWO\r", b"\n"):
            owner.framer.feed(piece)
        self.assertEqual(
            owner.events,
            [("line", b"ONE"), ("line", b"RAW 5"), ("raw", b"ab"), ("raw", b"cde"), ("line", b"TWO")],
        )

    def test_longLineSkipped(self) -> None:
        """
        A line without CRLF within the limit is refused once and skipped up
        to its CRLF, also when the CRLF is split across chunks.
        """
        owner = FramingOwner()
        owner.framer.feed(b"x" * 30)
        owner.framer.feed(b"NOT A COMMAND\r")
        owner.framer.feed(b"\nNEXT\r\n")
        self.assertEqual(owner.events, [("long", b""), ("line", b"NEXT")])

    def test_reentrantFeedKeepsOrder(self) -> None:
        """
        Input fed from inside the loop is buffered and read after what was
        already there.
        """
        owner = FramingOwner()
        owner.framer.feed(b"NESTED\r\nSECOND\r\n")
        self.assertEqual([e[1] for e in owner.events], [b"NESTED", b"SECOND", b"AFTER"])

    def test_pauseHoldsInput(self) -> None:
        """
        While any reason holds, input is kept; it is read when the last
        reason goes.  The transport stops reading meanwhile.
        """
        owner = FramingOwner()
        transport = StringTransport()
        owner.framer.attach(transport)
        owner.framer.feed(b"PAUSE\r\nHELD\r\n")
        owner.framer.pause("other")
        self.assertEqual(transport.producerState, "paused")
        owner.framer.unpause("test")
        self.assertEqual([e[1] for e in owner.events], [b"PAUSE"])
        owner.framer.unpause("other")
        self.assertEqual([e[1] for e in owner.events], [b"PAUSE", b"HELD"])
        self.assertEqual(transport.producerState, "producing")

    def test_overrun(self) -> None:
        """
        More than L{MAX_UNREAD} octets held while paused: the owner is told
        once and nothing more is buffered.
        """
        owner = FramingOwner()
        owner.framer.feed(b"PAUSE\r\n")
        owner.framer.feed(b"x" * (MAX_UNREAD - 10))
        self.assertEqual(owner.events, [("line", b"PAUSE")])
        owner.framer.feed(b"y" * 20)
        self.assertEqual(owner.events[-1], ("overrun", b""))

    def test_clearAndUnread(self) -> None:
        """
        L{InputFramer.clear} drops what was not handled (STARTTLS);
        L{InputFramer.hasUnread} says whether more was pipelined.
        """
        owner = FramingOwner()
        owner.framer.feed(b"PAUSE\r\nLEFT\r\n")
        self.assertTrue(owner.framer.hasUnread())
        self.assertEqual(owner.framer.clear(), b"LEFT\r\n")
        self.assertFalse(owner.framer.hasUnread())


class PipelineOwner:
    """
    Records what a L{ReplyPipeline} sends.
    """

    peer = "192.0.2.1:25"

    def __init__(self, limits: SMTPLimits = SMTPLimits()) -> None:
        self.state = ConnectionState()
        self.clock = Clock()
        self.sent: list[bytes] = []
        self.drained = 0
        self.pipeline = ReplyPipeline(self, limits, self.clock)

    def sendAnswer(self, answer: Answer) -> None:
        self.sent.append(answer.reply.lines(enhanced=True)[0])

    def hangUp(self) -> None:
        self.state.hangUp()

    def closingReply(self, reply: SMTPReply) -> SMTPReply:
        return reply

    def repliesDrained(self) -> None:
        self.drained += 1


class ReplyPipelineTests(SynchronousTestCase):
    def test_order(self) -> None:
        """
        A reply that is known waits for an earlier one that is not.
        """
        owner = PipelineOwner()
        slow: Deferred[Answer] = Deferred()
        owner.pipeline.respondLater(slow)
        owner.pipeline.respond(OK)
        self.assertEqual(owner.sent, [])
        self.assertTrue(owner.pipeline.pending)
        slow.callback(Answer(BAD))
        self.assertEqual(owner.sent, [b"500 5.5.2 Command unrecognized", b"250 2.0.0 Ok"])
        self.assertFalse(owner.pipeline.pending)
        self.assertEqual(owner.drained, 1)

    def test_errorLimits(self) -> None:
        """
        Past the soft limit each error waits C{errorDelay} on the clock; at
        the hard limit the answer is 421 and the session hangs up.
        """
        owner = PipelineOwner(SMTPLimits(softErrorLimit=1, hardErrorLimit=3, errorDelay=2.0))
        owner.pipeline.respond(BAD)
        owner.pipeline.respond(BAD)
        self.assertEqual(len(owner.sent), 1)
        owner.clock.advance(2)
        self.assertEqual(len(owner.sent), 2)
        owner.pipeline.respond(BAD)
        owner.clock.advance(2)
        self.assertEqual(owner.sent[-1], b"421 4.7.0 Too many errors, closing connection")
        self.assertTrue(owner.state.closing)

    def test_failureIs451(self) -> None:
        """
        An answer that fails is logged and sent as 451, in its place.
        """
        owner = PipelineOwner()
        owner.pipeline.respondLater(fail(OSError("boom")))
        self.assertEqual(owner.sent, [R.LOCAL_ERROR.lines(enhanced=True)[0]])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_stopCancels(self) -> None:
        """
        When the connection is gone, waiting answers are cancelled (unless
        they must finish, as a commit) and the error delay is dropped.
        """
        owner = PipelineOwner(SMTPLimits(softErrorLimit=0, errorDelay=5.0))
        owner.pipeline.respond(BAD)
        cancelled: list[str] = []
        cancellable: Deferred[Answer] = Deferred(lambda d: cancelled.append("cancellable"))
        kept: Deferred[Answer] = Deferred(lambda d: cancelled.append("kept"))
        owner.pipeline.respondLater(cancellable)
        owner.pipeline.respondLater(kept, cancellable=False)
        owner.state.lost()
        owner.pipeline.stop()
        self.assertEqual(cancelled, ["cancellable"])
        self.assertNoResult(kept)
        self.assertEqual(owner.clock.getDelayedCalls(), [])
        self.assertFalse(owner.pipeline.pending)
