"""
How the bundled policies name a client: by address, by network, and
whether it is in a configured list of networks.  One place, so that
C{limits}, C{greylist} and C{dnsbl} count and exempt the same clients the
same way.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from mailfw.config import ConfigError, Section

__all__ = [
    "LOOPBACK",
    "ClientAddress",
    "Network",
    "clientAddress",
    "inNetworks",
    "networkOf",
    "networks",
    "prefixes",
]

ClientAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@functools.lru_cache(maxsize=4096)
def clientAddress(host: str) -> ClientAddress | None:
    """
    The client's address, an IPv4-mapped IPv6 address (a dual-stack
    listener's view of an IPv4 client) as its IPv4 address; C{None} for a
    peer that has none (a UNIX socket).  Cached: C{ipaddress} costs tens of
    microseconds and each stage of a session asks again.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def networkOf(host: str, prefixV4: int, prefixV6: int) -> str:
    """
    The network C{host} is counted in (C{"192.0.2.0/24"}), or C{host}
    itself when it is no IP address.
    """
    address = clientAddress(host)
    if address is None:
        return host
    prefix = prefixV4 if address.version == 4 else prefixV6
    return str(ipaddress.ip_network((address, prefix), strict=False))


def networks(section: Section, key: str, default: Sequence[str]) -> tuple[Network, ...]:
    """
    Read a list of CIDRs (or single addresses) from C{section}, naming a
    bad entry.
    """
    parsed: list[Network] = []
    for text in section.strings(key, list(default)):
        try:
            parsed.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{section.title} {key}: bad network {text!r}") from None
    return tuple(parsed)


def inNetworks(host: str, among: Sequence[Network]) -> bool:
    """
    Whether the client at C{host} is in one of C{among}.
    """
    address = clientAddress(host)
    return address is not None and any(address in network for network in among)


def prefixes(section: Section) -> tuple[int, int]:
    """
    Read C{ipv4_prefix} (default 24) and C{ipv6_prefix} (default 64): how
    wide a client network is.
    """
    prefixV4 = section.integer("ipv4_prefix", 24, minimum=0)
    prefixV6 = section.integer("ipv6_prefix", 64, minimum=0)
    if prefixV4 > 32:
        raise ConfigError(f"{section.title} ipv4_prefix: must be at most 32")
    if prefixV6 > 128:
        raise ConfigError(f"{section.title} ipv6_prefix: must be at most 128")
    return prefixV4, prefixV6
