"""
The discarding delivery agent (plugin C{discard}): an explicit sink.

Every recipient is reported delivered with C{250 2.0.0 Discarded}, which
the scheduler logs with this agent's name, so mail routed here is
accounted for in the logs rather than silently lost.  Useful for test set-ups, benchmarks and black-hole routes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mailfw.config import Section
from mailfw.envelope import Envelope, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["DiscardDeliveryAgent", "fromConfig"]

DISCARDED = SMTPReply(250, "2.0.0", "Discarded")


@implementer(IDeliveryAgent)
class DiscardDeliveryAgent:
    """
    Reports every recipient delivered without storing anything.  The body is
    never opened.
    """

    def __init__(self, name: str = "discard") -> None:
        self.name = name

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        # No event of its own: the scheduler logs every outcome, naming this
        # agent, and a second line per message would double a sink's
        # logging cost.
        return succeed([RecipientOutcome(recipient, DISCARDED) for recipient in envelope.recipients])


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> DiscardDeliveryAgent:
    """
    Build a discarding agent; C{[delivery.NAME]} takes no options besides
    C{plugin}.
    """
    Section(f"[delivery.{instanceName}]", options).finish()
    return DiscardDeliveryAgent(instanceName)
