"""
Counters and marks shared by the processes of a server
(L{mailfw.interfaces.ISharedState}): the queue's when it keeps them, and a
bounded in-memory store per process otherwise.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailfw.interfaces import ISharedState

__all__ = ["MemorySharedState", "sharedStateFor"]


@implementer(ISharedState)
class MemorySharedState:
    """
    L{ISharedState} in this process's memory, for a queue that keeps no
    shared state (and for tests).

    It holds at most C{maxKeys} entries: past that, the least recently used
    one is forgotten, so a flood of distinct keys (one per client address)
    costs bounded memory and forgets the oldest instead of failing.
    """

    def __init__(self, maxKeys: int = 100_000) -> None:
        self.maxKeys = maxKeys
        # key -> (value, started, expires): a counter's value, or a mark's
        # first time in "started".
        self._entries: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def _live(self, key: str, now: float) -> tuple[int, float, float] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _store(self, key: str, entry: tuple[int, float, float]) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxKeys:
            self._entries.popitem(last=False)

    def count(self, key: str, amount: int, window: float, now: float) -> Deferred[int]:
        return succeed(self.countNow(key, amount, window, now))

    def countNow(self, key: str, amount: int, window: float, now: float) -> int:
        """
        L{count}, answered at once: for a caller on a hot path (a counter
        per message) that knows it holds this in-memory store.
        """
        entry = self._live(key, now)
        if entry is None:
            if amount == 0:
                return 0
            entry = (0, now, now + window)
        value = entry[0] + amount
        self._store(key, (value, entry[1], entry[2]))
        return value

    def mark(self, key: str, lifetime: float, now: float) -> Deferred[float]:
        entry = self._live(key, now)
        if entry is not None:
            return succeed(entry[1])
        self._store(key, (0, now, now + lifetime))
        return succeed(now)

    def forget(self, key: str) -> Deferred[None]:
        self._entries.pop(key, None)
        return succeed(None)

    def __len__(self) -> int:
        return len(self._entries)


def sharedStateFor(queue: object, maxKeys: int = 100_000) -> ISharedState:
    """
    The queue itself when it keeps shared state (its database is shared by
    every process and node), else a new in-memory store for this process.
    """
    if ISharedState.providedBy(queue):
        return queue
    return MemorySharedState(maxKeys)
