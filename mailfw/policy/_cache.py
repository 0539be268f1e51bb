"""
A bounded cache whose entries expire, for the policies' DNS answers: at
most C{size} entries (the least recently used forgotten first), so that a
flood of distinct clients or domains costs bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from twisted.internet.interfaces import IReactorTime

__all__ = ["TTLCache"]

_V = TypeVar("_V")


class TTLCache(Generic[_V]):
    """
    Values by name, each until its time to live ends.
    """

    def __init__(self, clock: IReactorTime, size: int) -> None:
        self._clock = clock
        self.size = size
        self._entries: OrderedDict[str, tuple[float, _V]] = OrderedDict()

    def get(self, name: str) -> _V | None:
        """
        The live value for C{name}, or C{None}.
        """
        entry = self._entries.get(name)
        if entry is None:
            return None
        if entry[0] <= self._clock.seconds():
            del self._entries[name]
            return None
        self._entries.move_to_end(name)
        return entry[1]

    def put(self, name: str, value: _V, ttl: float) -> None:
        """
        Keep C{value} for C{ttl} seconds (not at all when C{ttl} is not
        positive).
        """
        if ttl <= 0:
            return
        self._entries[name] = (self._clock.seconds() + ttl, value)
        self._entries.move_to_end(name)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
