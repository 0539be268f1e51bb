"""
Mail addresses as RFC 5321 defines them on the wire.

L{Address.parse} accepts exactly the C{Mailbox} production of RFC 5321
section 4.1.2 (dot-string or quoted-string local part; domain or address
literal), with UTF-8 allowed when the client asked for SMTPUTF8 (RFC 6531).
Domains are normalised to lowercase A-labels (IDNA 2008, through the
C{idna} package that Twisted's C{hyperlink} already depends on), so two
spellings of one domain compare equal.  Local parts keep their case: only
the receiving domain may decide that they are case-insensitive.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

__all__ = ["Address", "AddressError"]

# RFC 5321 4.5.3.1: local part 64 octets, domain 255 octets.
MAX_LOCALPART = 64
MAX_DOMAIN = 255

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_UATEXT = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_UDOT_STRING = re.compile(rf"{_UATEXT}+(?:\.{_UATEXT}+)*\Z")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_UQUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class AddressError(ValueError):
    """
    The text is not a valid RFC 5321 mailbox.  The message says why, in
    words fit for a 501 or 553 reply.
    """


def normaliseDomain(domain: str, utf8: bool = True) -> str:
    """
    Return C{domain} as lowercase A-labels, or an address literal unchanged
    but for case.

    @raise AddressError: if it is not a valid domain.
    """
    if domain.startswith("[") and domain.endswith("]"):
        return _addressLiteral(domain)
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("bad domain length")
    if not domain.isascii():
        if not utf8:
            raise AddressError("non-ASCII domain needs SMTPUTF8")
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise AddressError("invalid internationalised domain") from None
    domain = domain.lower()
    labels = domain.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise AddressError("invalid domain")
    if all(label.isdigit() for label in labels):
        raise AddressError("numeric domain must be an address literal")
    if any(label.startswith("xn--") for label in labels):
        try:
            idna.decode(domain)
        except idna.IDNAError:
            raise AddressError("invalid A-label in domain") from None
    return domain


_IPV6_CHARACTERS = re.compile(r"[0-9A-Fa-f:.]+")


def _addressLiteral(text: str) -> str:
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            # RFC 5321 4.1.3: hex digits, colons and dots only; Python would
            # also take a scope ("%eth0"), which names no host on the Internet.
            if not _IPV6_CHARACTERS.fullmatch(inner[5:]):
                raise ValueError(inner)
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("invalid address literal") from None


@dataclass(frozen=True, order=True)
class Address:
    """
    A mailbox: C{localpart@domain}.

    C{localpart} is kept as written (quotes removed only for comparison by
    L{Address.unquotedLocalpart}); C{domain} is normalised (see L{normaliseDomain}).
    """

    localpart: str
    domain: str

    @classmethod
    def parse(cls, text: str, utf8: bool = False) -> Address:
        """
        Parse a mailbox (without angle brackets or source route).

        @param utf8: allow UTF-8 (the transaction used SMTPUTF8).
        @raise AddressError: with a reason.
        """
        at = text.rfind("@")
        if at <= 0:
            raise AddressError("address needs a local part and a domain")
        local, domain = text[:at], text[at + 1 :]
        if not utf8 and not local.isascii():
            raise AddressError("non-ASCII local part needs SMTPUTF8")
        if len(local.encode("utf-8")) > MAX_LOCALPART:
            raise AddressError("local part too long")
        dot, quoted = (_UDOT_STRING, _UQUOTED) if utf8 else (_DOT_STRING, _QUOTED)
        if not (dot.match(local) or quoted.match(local)):
            raise AddressError("invalid local part")
        return cls(local, normaliseDomain(domain, utf8))

    @property
    def unquotedLocalpart(self) -> str:
        """
        The local part with RFC 5321 quoting undone: C{"a b"} becomes C{a b}.
        """
        lp = self.localpart
        if lp.startswith('"'):
            return re.sub(r"\\(.)", r"\1", lp[1:-1])
        return lp

    @property
    def isASCII(self) -> bool:
        """
        Whether this address can be sent without SMTPUTF8.
        """
        return self.localpart.isascii() and self.domain.isascii()

    def __str__(self) -> str:
        return f"{self.localpart}@{self.domain}"
