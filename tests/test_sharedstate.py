"""
Tests for L{mailfw.sharedstate}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.interfaces import ISharedState
from mailfw.queue import MemoryQueue
from mailfw.sharedstate import MemorySharedState, sharedStateFor


class MemorySharedStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = MemorySharedState(maxKeys=3)

    def test_interface(self) -> None:
        """
        It provides L{ISharedState}.
        """
        verifyObject(ISharedState, self.state)

    def test_countWithinWindow(self) -> None:
        """
        Counts add up within the window and start again from zero after it.
        """
        self.assertEqual(self.successResultOf(self.state.count("k", 1, 60, 1000)), 1)
        self.assertEqual(self.successResultOf(self.state.count("k", 2, 60, 1030)), 3)
        self.assertEqual(self.successResultOf(self.state.count("k", 0, 60, 1059)), 3)
        self.assertEqual(self.successResultOf(self.state.count("k", 1, 60, 1060)), 1)

    def test_readMissing(self) -> None:
        """
        Counting 0 of an unknown key reads 0 and stores nothing.
        """
        self.assertEqual(self.successResultOf(self.state.count("k", 0, 60, 0)), 0)
        self.assertEqual(len(self.state), 0)

    def test_mark(self) -> None:
        """
        A mark answers with its first time while it lives, and a new time
        after it expired.
        """
        self.assertEqual(self.successResultOf(self.state.mark("t", 100, 5)), 5)
        self.assertEqual(self.successResultOf(self.state.mark("t", 100, 50)), 5)
        self.assertEqual(self.successResultOf(self.state.mark("t", 100, 105)), 105)

    def test_forget(self) -> None:
        """
        A forgotten counter starts again from zero.
        """
        self.state.count("k", 5, 60, 0)
        self.successResultOf(self.state.forget("k"))
        self.assertEqual(self.successResultOf(self.state.count("k", 1, 60, 1)), 1)

    def test_bounded(self) -> None:
        """
        Past C{maxKeys}, the least recently used key is forgotten.
        """
        for key in ("a", "b", "c"):
            self.state.count(key, 1, 60, 0)
        self.state.count("a", 1, 60, 1)  # a is now the most recent
        self.state.count("d", 1, 60, 2)
        self.assertEqual(len(self.state), 3)
        self.assertEqual(self.successResultOf(self.state.count("b", 0, 60, 3)), 0)
        self.assertEqual(self.successResultOf(self.state.count("a", 0, 60, 3)), 2)


class SharedStateForTests(SynchronousTestCase):
    def test_queueWithout(self) -> None:
        """
        A queue that keeps no shared state gets a store in memory.
        """
        self.assertIsInstance(sharedStateFor(MemoryQueue()), MemorySharedState)

    def test_queueWith(self) -> None:
        """
        A queue that provides L{ISharedState} is used itself.
        """
        state = MemorySharedState()
        self.assertIs(sharedStateFor(state), state)
