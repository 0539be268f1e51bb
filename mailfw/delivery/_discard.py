"""
The discarding delivery agent (plugin C{discard}): an explicit sink.

Every recipient is reported delivered (C{250 2.0.0}) and logged as
discarded, so mail routed here is accounted for in the logs rather than
silently lost.  Useful for test set-ups, benchmarks and black-hole routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
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

    log = Logger()

    def __init__(self, name: str = "discard") -> None:
        self.name = name

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        outcomes = []
        for recipient in envelope.recipients:
            self.log.info(
                "{agent}: discarded message for {recipient} from {sender} ({size} octets)",
                agent=self.name,
                sender=envelope.senderText,
                recipient=str(recipient.address),
                nexthop=nexthop,
                size=body.size,
                code=DISCARDED.code,
                enhanced=DISCARDED.enhanced,
            )
            outcomes.append(RecipientOutcome(recipient, DISCARDED))
        return succeed(outcomes)


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> DiscardDeliveryAgent:
    """
    Build a discarding agent; C{[delivery.NAME]} takes no options besides
    C{plugin}.
    """
    Section(f"[delivery.{instanceName}]", options).finish()
    return DiscardDeliveryAgent(instanceName)
