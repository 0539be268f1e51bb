"""
Tests for L{mailfw.sharedstate}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailfw.interfaces import ISharedState
from mailfw.queue import MemoryQueue
from mailfw.queue._contract import SharedStateContractTests
from mailfw.sharedstate import MemorySharedState, sharedStateFor


class MemorySharedStateTests(SharedStateContractTests, SynchronousTestCase):
    """
    L{MemorySharedState} keeps the shared-state contract, and its bound.
    """

    def makeState(self) -> ISharedState:
        return MemorySharedState(maxKeys=3)

    def test_readStoresNothing(self) -> None:
        """
        Counting 0 of an unknown key stores nothing.
        """
        state = MemorySharedState()
        self.successResultOf(state.count("k", 0, 60, 0))
        self.assertEqual(len(state), 0)

    def test_bounded(self) -> None:
        """
        Past C{maxKeys}, the least recently used key is forgotten.
        """
        assert isinstance(self.state, MemorySharedState)
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
