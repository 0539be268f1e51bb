"""
What a policy answers at each stage of a session: a value, below
L{mailfw.interfaces}, so that the contract and every policy can share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailfw.reply import SMTPReply

__all__ = ["CONTINUE", "Verdict"]


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
