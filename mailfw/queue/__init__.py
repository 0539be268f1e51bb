"""
Queue stores: L{mailfw.interfaces.IMessageQueue} backends.

The values they exchange with the scheduler and the operator tools live in
L{mailfw.queued}; the scheduler that delivers from a queue lives in
L{mailfw.scheduling}.
"""

from mailfw.queue._memory import MemoryQueue

__all__ = ["MemoryQueue"]
