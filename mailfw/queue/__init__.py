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
