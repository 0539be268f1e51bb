"""
Tests for L{mailfw.policy._chain.PolicyChain}: the configured policies
asked in order at each stage, the first deciding verdict winning, and a
failing or slow policy answered with a logged 451.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mailfw.envelope import Session
from mailfw.policy import CONTINUE, Verdict
from mailfw.policy._chain import POLICY_FAILED, POLICY_TIMEOUT, PolicyChain, Stage
from mailfw.reply import SMTPReply
from tests._smtpdoubles import StagePolicy

SESSION = Session(listener="smtp", peerHost="192.0.2.1")
REFUSED = Verdict.reject(550, "5.7.1", "No")


def ask(chain: PolicyChain) -> Deferred[Verdict]:
    return chain.ask(Stage.HELO, lambda p: p.checkHelo(SESSION, "client.example"), "192.0.2.1:25")


class PolicyChainTests(SynchronousTestCase):
    def test_empty(self) -> None:
        """
        No policies: the chain continues at once.
        """
        chain = PolicyChain((), 60.0, Clock())
        self.assertFalse(chain)
        self.assertEqual(self.successResultOf(ask(chain)), CONTINUE)

    def test_firstDecidingVerdictWins(self) -> None:
        """
        Policies are asked in order; the first deciding verdict is the
        answer and later policies are not asked.
        """
        first, second, third = StagePolicy("a"), StagePolicy("b", helo=REFUSED), StagePolicy("c")
        chain = PolicyChain((first, second, third), 60.0, Clock())
        self.assertEqual(self.successResultOf(ask(chain)).reply, REFUSED.reply)
        self.assertEqual([len(p.calls) for p in (first, second, third)], [1, 1, 0])

    def test_headersCollected(self) -> None:
        """
        Headers of continuing verdicts are collected, in order, into the
        result, also into a deciding one.
        """
        chain = PolicyChain(
            (
                StagePolicy("a", helo=Verdict(headers=(("X-A", "1"),))),
                StagePolicy("b", helo=Verdict(headers=(("X-B", "2"),))),
            ),
            60.0,
            Clock(),
        )
        self.assertEqual(self.successResultOf(ask(chain)).headers, (("X-A", "1"), ("X-B", "2")))
        accept = Verdict(SMTPReply(250, "2.0.0", "Ok"), headers=(("X-C", "3"),))
        chain = PolicyChain(
            (StagePolicy("a", helo=Verdict(headers=(("X-A", "1"),))), StagePolicy("b", helo=accept)),
            60.0,
            Clock(),
        )
        self.assertEqual(self.successResultOf(ask(chain)).headers, (("X-A", "1"), ("X-C", "3")))

    def test_slowPolicyTimesOut(self) -> None:
        """
        A policy that does not answer within the timeout gives 451 4.4.3;
        the next policy is not asked.
        """
        clock = Clock()
        slow, after = StagePolicy("slow", helo="slow"), StagePolicy("after")
        d = ask(PolicyChain((slow, after), 30.0, clock))
        self.assertNoResult(d)
        clock.advance(29.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(d).reply, POLICY_TIMEOUT)
        self.assertEqual(after.calls, [])

    def test_timeoutLogged(self) -> None:
        """
        The timeout is logged once with the stage and the peer.
        """
        clock = Clock()
        d = ask(PolicyChain((StagePolicy("slow", helo="slow"),), 30.0, clock))
        with capturedLogs() as events:
            clock.advance(30)
        self.successResultOf(d)
        [event] = events
        self.assertEqual((event["stage"], event["peer"]), ("helo", "192.0.2.1:25"))

    def test_failureIs451(self) -> None:
        """
        A policy that raises, or answers with something that is not a
        verdict, gives 451 4.3.0 and a logged failure, never an error.
        """
        for answer in (OSError("down"), "not a verdict"):
            chain = PolicyChain((StagePolicy("bad", helo=answer),), 60.0, Clock())
            self.assertEqual(self.successResultOf(ask(chain)).reply, POLICY_FAILED)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_cancelledNotLogged(self) -> None:
        """
        A check cancelled because the client left is not logged as a
        failure.
        """
        policy = StagePolicy("slow", helo="slow")
        d = ask(PolicyChain((policy,), 60.0, Clock()))
        with capturedLogs() as events:
            d.cancel()
        self.assertEqual(self.successResultOf(d).reply, POLICY_FAILED)
        self.assertEqual(events, [])

    def test_deferredVerdictContinues(self) -> None:
        """
        A policy's L{Deferred} verdict that continues lets the next policy
        decide.
        """
        chain = PolicyChain(
            (StagePolicy("a", helo=lambda *a: succeed(CONTINUE)), StagePolicy("b", helo=REFUSED)),
            60.0,
            Clock(),
        )
        self.assertEqual(self.successResultOf(ask(chain)).reply, REFUSED.reply)
