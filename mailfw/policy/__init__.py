"""
A base class for L{mailfw.interfaces.IPolicy} implementations, with the
verdict values they return (defined in L{mailfw.verdict}).
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IMessageCheck, IPolicy
from mailfw.verdict import (
    CONTINUE,
    AddHeader,
    AddRecipient,
    AuthResult,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    Discard,
    MessageEdit,
    Quarantine,
    ReplaceBody,
    Verdict,
)

__all__ = [
    "CONTINUE",
    "AddHeader",
    "AddRecipient",
    "AuthResult",
    "ChangeHeader",
    "ChangeSender",
    "DeleteRecipient",
    "Discard",
    "MessageEdit",
    "Policy",
    "Quarantine",
    "ReplaceBody",
    "Verdict",
]


@implementer(IPolicy)
class Policy:
    """
    A policy that lets every stage continue; subclass it and override the
    stages you check.
    """

    name = "policy"

    def checkConnection(self, session: Session) -> Verdict | Deferred[Verdict]:
        return CONTINUE

    def checkHelo(self, session: Session, name: str) -> Verdict | Deferred[Verdict]:
        return CONTINUE

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        return CONTINUE

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        return CONTINUE

    def checkMessage(
        self, session: Session, envelope: Envelope, headers: bytes
    ) -> Verdict | Deferred[Verdict]:
        return CONTINUE

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        return None

    def sessionEnded(self, session: Session) -> None:
        pass
