"""
What a policy answers at each stage of a session: a value, below
L{mailfw.interfaces}, so that the contract and every policy can share it.

Besides accepting or refusing, a verdict may carry authentication results
(L{AuthResult}: the session writes them into one C{Authentication-Results:}
field) and message edits (L{MessageEdit}: applied to the queued copy
before the 250).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailfw.address import Address
from mailfw.reply import SMTPReply

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
    "Quarantine",
    "ReplaceBody",
    "Verdict",
]


@dataclass(frozen=True)
class AuthResult:
    """
    One method's result for C{Authentication-Results:} (RFC 8601 2.2).

    @ivar method: C{"spf"}, C{"dkim"}, C{"dmarc"}, C{"iprev"}, C{"arc"}...
    @ivar result: the method's result keyword (C{"pass"}, C{"fail"},
        C{"softfail"}, C{"neutral"}, C{"none"}, C{"temperror"},
        C{"permerror"}, C{"policy"}).
    @ivar reason: free text for C{reason=}, or C{None}.
    @ivar properties: C{(ptype.property, value)} pairs such as
        C{("smtp.mailfrom", "example.com")} or C{("header.d", "example.com")}.
    """

    method: str
    result: str
    reason: str | None = None
    properties: tuple[tuple[str, str], ...] = ()

    def property(self, name: str) -> str | None:
        """
        The value of property C{name} (C{"header.d"}), or C{None}.
        """
        for key, value in self.properties:
            if key == name:
                return value
        return None


# --- message edits: what a filter may change before the message is queued ---


@dataclass(frozen=True)
class AddHeader:
    """
    Add a header field: at the end of the header section (C{index} is
    C{None}, milter's "add header") or before the field at C{index}
    (0 is the top; milter's "insert header").
    """

    name: str
    value: str
    index: int | None = None


@dataclass(frozen=True)
class ChangeHeader:
    """
    Replace the value of the C{occurrence}th (from 1) field called
    C{name}, or delete it when C{value} is C{None}.  A field that does not
    exist is added when C{value} is given (as milter's "change header").
    """

    name: str
    value: str | None
    occurrence: int = 1


@dataclass(frozen=True)
class ChangeSender:
    """
    Replace the envelope sender (C{None} is the null path).
    """

    sender: Address | None


@dataclass(frozen=True)
class AddRecipient:
    """
    Add an envelope recipient (routed like the others when delivered).
    """

    address: Address


@dataclass(frozen=True)
class DeleteRecipient:
    """
    Remove an envelope recipient.  A message left without recipients is
    dropped, and logged as such.
    """

    address: Address


@dataclass(frozen=True)
class ReplaceBody:
    """
    Replace the body (everything after the header section), CRLF lines.
    """

    body: bytes


@dataclass(frozen=True)
class Quarantine:
    """
    Accept the message but hold it in the queue for an operator
    (C{mailfw queue release}); the reason is logged.
    """

    reason: str


@dataclass(frozen=True)
class Discard:
    """
    Accept the message and drop it: the client sees 250, nothing is
    delivered, and the drop is logged with C{reason}.  Never implicit.
    """

    reason: str


MessageEdit = (
    AddHeader
    | ChangeHeader
    | ChangeSender
    | AddRecipient
    | DeleteRecipient
    | ReplaceBody
    | Quarantine
    | Discard
)


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
    @ivar results: authentication results, collected for the transaction
        (results at the connection and HELO stages hold for the session);
        the session writes them all into one C{Authentication-Results:}
        field, and later policies see them (DMARC reads SPF's and DKIM's).
    @ivar edits: changes to the message, collected for the transaction
        and applied to the queued copy in order before the 250.
    """

    reply: SMTPReply | None = None
    disconnect: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    results: tuple[AuthResult, ...] = ()
    edits: tuple[MessageEdit, ...] = ()

    @classmethod
    def reject(cls, code: int, enhanced: str, text: str) -> Verdict:
        return cls(SMTPReply(code, enhanced, text))


CONTINUE = Verdict()
