"""
SMTP replies as values.

Plugins return an L{SMTPReply} for every expected outcome (accept, defer,
refuse) instead of raising; L{SMTPReplyError} exists for code that must
unwind through a stack, and carries the reply with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SMTPReply", "SMTPReplyError", "replyFromPeer"]

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.  Text
# that echoes what a client sent is cut to fit.
MAX_LINE = 510


@dataclass(frozen=True)
class SMTPReply:
    """
    One SMTP reply: a three-digit code, an RFC 3463 enhanced status code
    and the text sent to the peer.

    The text is generic: configuration details and internal errors go to the
    log, never to the peer.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if "\r" in self.text or "\n" in self.text:
            # Multi-line replies are built from lines, never by embedding CRLF.
            raise ValueError("reply text must not contain CR or LF")

    @property
    def isPositive(self) -> bool:
        """
        2xx or 3xx: the command was accepted.
        """
        return self.code < 400

    @property
    def isTransient(self) -> bool:
        """
        4xx: the sender should try again later.
        """
        return 400 <= self.code < 500

    @property
    def isPermanent(self) -> bool:
        """
        5xx: the sender must not try again unchanged.
        """
        return self.code >= 500

    def lines(self, enhanced: bool = True, more: tuple[str, ...] = ()) -> list[bytes]:
        """
        The reply as wire lines without CRLF.

        @param enhanced: prefix the enhanced status code (sent only after
            EHLO, RFC 2034).
        @param more: further lines of text after C{text}, giving a
            multi-line reply (EHLO keywords, HELP).
        """
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        texts = (self.text, *more)
        last = len(texts) - 1
        return [
            f"{self.code}{' ' if i == last else '-'}{prefix}{text}".encode()[:MAX_LINE]
            for i, text in enumerate(texts)
        ]

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class SMTPReplyError(Exception):
    """
    Raised by a plugin to refuse something with a specific reply.
    """

    def __init__(self, reply: SMTPReply) -> None:
        super().__init__(str(reply))
        self.reply = reply


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|\Z)")

# How much of a peer's reply text is kept (for logs, outcomes and DSNs).
MAX_PEER_TEXT = 200


def replyFromPeer(code: int, text: str) -> SMTPReply:
    """
    The L{SMTPReply} for what another server answered (SMTP or LMTP): its
    enhanced status code taken from the text when it gave one of the right
    class (else C{X.0.0}), and at most L{MAX_PEER_TEXT} printable
    characters of the rest.  A peer's reply may hold anything, bare CR or
    LF included; what it becomes ends up in our logs and bounces.
    """
    enhanced = f"{code // 100}.0.0"
    match = _ENHANCED.match(text)
    if match and int(match.group(1)) == code // 100:
        enhanced = "{}.{}.{}".format(*match.groups())
        text = text[match.end() :]
    text = "".join(c if c.isprintable() else "?" for c in text.strip())[:MAX_PEER_TEXT]
    return SMTPReply(code, enhanced, text or "(no text)")
