"""
Queue stores: L{mailfw.interfaces.IMessageQueue} backends.

The values they exchange with the scheduler and the operator tools live in
L{mailfw.queued}; the scheduler that delivers from a queue lives in
L{mailfw.scheduling}.
"""

from typing import TYPE_CHECKING

from mailfw._lazy import lazyExports

if TYPE_CHECKING:
    from mailfw.queue._memory import MemoryQueue

__all__ = ["MemoryQueue"]

# Imported when first used, not with the package: a server imports only
# the store its configuration names (mailfw._lazy).
__getattr__ = lazyExports(globals(), {"MemoryQueue": "mailfw.queue._memory"})
