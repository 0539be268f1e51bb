"""
Delivery agents: the last hop of a message inside mailfw.

The bundled agents are plugins chosen by name in C{[delivery.NAME]}
sections (C{maildir}, C{discard}, C{pipe}, C{lmtp}); this package
re-exports their classes, the in-memory test doubles and the conformance
mixin that plugin authors run against their own agents.
"""

from typing import TYPE_CHECKING

from mailfw._lazy import lazyExports

if TYPE_CHECKING:
    from mailfw.delivery._contract import DeliveryAgentContractTests, TrackingBody, UnreadableBody
    from mailfw.delivery._discard import DiscardDeliveryAgent
    from mailfw.delivery._lmtp import LMTPDeliveryAgent
    from mailfw.delivery._maildir import MaildirDeliveryAgent, ThreadPoolRunner, ThreadRunner, safeName
    from mailfw.delivery._memory import BytesBody, MemoryDelivery, MemoryDeliveryAgent
    from mailfw.delivery._pipe import PipeDeliveryAgent

__all__ = [
    "BytesBody",
    "DeliveryAgentContractTests",
    "DiscardDeliveryAgent",
    "LMTPDeliveryAgent",
    "MaildirDeliveryAgent",
    "MemoryDelivery",
    "MemoryDeliveryAgent",
    "PipeDeliveryAgent",
    "ThreadPoolRunner",
    "ThreadRunner",
    "TrackingBody",
    "UnreadableBody",
    "safeName",
]

# Imported when first used, not with the package: the SMTP client imports
# mailfw.delivery._stream, and a server uses only the agents its
# configuration names (mailfw._lazy).
__getattr__ = lazyExports(
    globals(),
    {
        "DeliveryAgentContractTests": "mailfw.delivery._contract",
        "TrackingBody": "mailfw.delivery._contract",
        "UnreadableBody": "mailfw.delivery._contract",
        "DiscardDeliveryAgent": "mailfw.delivery._discard",
        "LMTPDeliveryAgent": "mailfw.delivery._lmtp",
        "MaildirDeliveryAgent": "mailfw.delivery._maildir",
        "ThreadPoolRunner": "mailfw.delivery._maildir",
        "ThreadRunner": "mailfw.delivery._maildir",
        "safeName": "mailfw.delivery._maildir",
        "BytesBody": "mailfw.delivery._memory",
        "MemoryDelivery": "mailfw.delivery._memory",
        "MemoryDeliveryAgent": "mailfw.delivery._memory",
        "PipeDeliveryAgent": "mailfw.delivery._pipe",
    },
)
