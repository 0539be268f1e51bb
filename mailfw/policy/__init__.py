"""
Policy verdicts and a base class for L{mailfw.interfaces.IPolicy}
implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from zope.interface import implementer

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IPolicy
from mailfw.reply import SMTPReply

__all__ = ["CONTINUE", "Policy", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    """
    A policy's answer at one stage.

    @ivar reply: C{None} to let the next policy decide; a 2xx reply to
        accept now and skip the rest of the chain; a 4xx or 5xx reply to
        refuse the command with it.
    @ivar disconnect: after sending C{reply}, close the connection (use a
        421 reply).
    @ivar headers: C{(name, value)} pairs prepended to the message
        (only at the message stage).
    """

    reply: SMTPReply | None = None
    disconnect: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def reject(cls, code: int, enhanced: str, text: str) -> Verdict:
        return cls(SMTPReply(code, enhanced, text))


CONTINUE = Verdict()


@implementer(IPolicy)
class Policy:
    """
    A policy that lets every stage continue; subclass it and override the
    stages you check.
    """

    name = "policy"

    def checkConnection(self, session: Session) -> Verdict:
        return CONTINUE

    def checkHelo(self, session: Session, name: str) -> Verdict:
        return CONTINUE

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict:
        return CONTINUE

    def checkRecipient(self, session: Session, envelope: Envelope, recipient: Recipient) -> Verdict:
        return CONTINUE

    def checkMessage(self, session: Session, envelope: Envelope, headers: bytes) -> Verdict:
        return CONTINUE
