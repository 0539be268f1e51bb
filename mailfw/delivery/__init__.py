"""
Delivery agents: the last hop of a message inside mailfw.

The bundled agents are plugins chosen by name in C{[delivery.NAME]}
sections (C{maildir}, C{discard}, C{pipe}, C{lmtp}); this package
re-exports their classes, the in-memory test doubles and the conformance
mixin that plugin authors run against their own agents.
"""

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
