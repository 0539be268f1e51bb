"""
The next-hop syntax shared by the router and the SMTP relay agent.

A next hop is written as in Postfix's transport table:

  - C{[mail.example.net]:2525}: that host (name or IP address) and port,
    with no MX lookup;
  - C{[mail.example.net]}: that host on the agent's default port;
  - C{example.net}: the mail exchangers of that domain (MX lookup).

Parsing happens once, when the configuration is read (so mistakes are
reported at start-up) and again in the agent (whose input is a route
computed from the same text).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mailfw.address import AddressError, normaliseDomain

__all__ = ["Nexthop", "NexthopError", "parseNexthop"]


class NexthopError(ValueError):
    """
    The text is not a valid next hop; the message says why.
    """


@dataclass(frozen=True)
class Nexthop:
    """
    A parsed next hop.

    @ivar host: a domain (for MX lookup), a host name, or an IP address
        (without brackets).
    @ivar port: the port for a fixed host, or C{None} for the agent's
        default.
    @ivar mx: C{True} if C{host} is a domain whose MX records are looked up,
        C{False} for a fixed host.
    """

    host: str
    port: int | None = None
    mx: bool = True

    @property
    def isAddress(self) -> bool:
        """
        Whether C{host} is an IP address literal (no DNS lookup at all).
        """
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        if self.mx:
            return self.host
        text = f"[{self.host}]"
        return text if self.port is None else f"{text}:{self.port}"


def parseNexthop(text: str) -> Nexthop:
    """
    Parse C{text} (see the module docstring).

    Address literals as they appear in addresses (C{[127.0.0.1]},
    C{[IPv6:::1]}) are accepted as fixed hosts, so a relayed recipient at
    an address literal can use its own domain as the next hop.

    @raise NexthopError: naming what is wrong.
    """
    if not text:
        raise NexthopError("empty next hop")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise NexthopError(f"unbalanced bracket in next hop {text!r}")
        inner, rest = text[1:close], text[close + 1 :]
        port: int | None = None
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise NexthopError(f"bad port in next hop {text!r}")
            port = int(rest[1:])
            if not 0 < port < 65536:
                raise NexthopError(f"port out of range in next hop {text!r}")
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        try:
            return Nexthop(ipaddress.ip_address(inner).compressed, port, mx=False)
        except ValueError:
            pass
        try:
            return Nexthop(normaliseDomain(inner), port, mx=False)
        except AddressError as e:
            raise NexthopError(f"bad host in next hop {text!r}: {e}") from None
    if ":" in text:
        raise NexthopError(f"next hop {text!r}: a port needs a bracketed host, as in [host]:port")
    try:
        return Nexthop(normaliseDomain(text), None, mx=True)
    except AddressError as e:
        raise NexthopError(f"bad domain in next hop {text!r}: {e}") from None
