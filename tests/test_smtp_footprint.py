"""
The memory an idle SMTP session holds: 10,000 idle clients are one of
issue 19's benchmarks (C{benchmarks/idle.py}), so the per-session parts
stay small.  Measured with C{tracemalloc} on sessions built with the test
doubles (their transports and settings count too), so the budget is
generous to the doubles and strict about regressions of the session.
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.smtp._framing import InputFramer
from mailfw.smtp._pipeline import ReplyPipeline
from tests._smtpdoubles import connect

# Octets per idle session, the test doubles included: about 3,280 under
# pytest, of which about 390 are the "connection.opened" log event that the
# test process's log beginner keeps (a running server observes and drops
# it); 3,600 when the transactions and AUTH were built with the session,
# 3,840 plus that when the reply queue was a deque, the pause reasons a set
# and the session time limit a second timer.
BUDGET = 3500


class IdleSessionFootprintTests(SynchronousTestCase):
    def test_partsHaveNoInstanceDict(self) -> None:
        """
        The input framer and the reply pipeline use C{__slots__}: a
        per-instance dictionary is a few hundred octets per session.
        """
        conn = connect()
        for part in (conn.proto._input, conn.proto.replies):
            self.assertIsInstance(part, (InputFramer, ReplyPipeline))
            self.assertFalse(hasattr(part, "__dict__"), type(part).__name__)

    def test_idleSessionsShareEmptyState(self) -> None:
        """
        An idle session's pause reasons are the one shared empty set and
        its reply queue an empty list, not a deque (about 700 octets).
        """
        first, second = connect(), connect()
        self.assertIs(first.proto._input.reasons, second.proto._input.reasons)
        self.assertEqual(type(first.proto.replies.pending), list)

    def test_idleSessionBuildsNoTransactionsOrLogin(self) -> None:
        """
        The transactions are built at their first use and AUTH's state at
        AUTH: an idle session has neither (about 300 octets).
        """
        conn = connect()
        self.assertNotIn("transactions", vars(conn.proto))
        self.assertIsNone(conn.proto._login)
        conn.proto.dataReceived(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertIn("transactions", vars(conn.proto))
        self.assertIsNone(conn.proto._login)

    def test_budget(self) -> None:
        """
        Two hundred idle sessions (greeted, waiting for a command) cost
        less than L{BUDGET} octets each.
        """
        clock = Clock()
        warm = [connect(clock=clock) for _ in range(20)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            sessions = [connect(clock=clock) for _ in range(200)]
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        perSession = (after - before) / len(sessions)
        self.assertLess(perSession, BUDGET, f"an idle session costs {perSession:.0f} octets")
        self.assertEqual(len(warm), 20)
