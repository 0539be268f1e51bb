"""
The message queue: values shared by every L{mailfw.interfaces.IMessageQueue}
backend, and the scheduler that delivers from it.
"""

from mailfw.queue._model import (
    Disposition,
    Lease,
    LeaseLost,
    Notice,
    QueueFull,
    QueuedMessage,
    QueuedRecipient,
    RecipientState,
    Selector,
)

__all__ = [
    "Disposition",
    "Lease",
    "LeaseLost",
    "Notice",
    "QueueFull",
    "QueuedMessage",
    "QueuedRecipient",
    "RecipientState",
    "Selector",
]

from mailfw.queue._memory import MemoryQueue  # noqa: E402
from mailfw.queue._retry import RetrySchedule  # noqa: E402
from mailfw.queue._scheduler import Scheduler  # noqa: E402

__all__ += ["MemoryQueue", "RetrySchedule", "Scheduler"]
