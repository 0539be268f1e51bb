"""
Client sockets named the way Postfix, Dovecot and milters name them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = ["socketEndpoint"]


def socketEndpoint(clock: Any, text: str, resolve: Callable[[str], Path]) -> IStreamClientEndpoint:
    """
    A client endpoint from the socket notation of Postfix and Dovecot: a
    unix socket path (C{"unix:PATH"} or just C{"PATH"}, relative paths
    through C{resolve}) or C{"inet:HOST:PORT"} (an IPv6 address in
    brackets).  Used by C{[auth] socket} and the filter policies.

    @raise ValueError: for a malformed value.
    """
    if text.startswith("inet:"):
        host, sep, portText = text[len("inet:") :].rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not portText.isdigit() or not 0 < int(portText) < 65536:
            raise ValueError(f"expected inet:HOST:PORT, got {text!r}")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(clock, host, int(portText))
        # An address needs no lookup (HostnameEndpoint's getaddrinfo runs
        # in a thread, once per connection: a milter connects per session).
        if address.version == 6:
            return TCP6ClientEndpoint(clock, host, int(portText))
        return TCP4ClientEndpoint(clock, host, int(portText))
    path = text[len("unix:") :] if text.startswith("unix:") else text
    if not path:
        raise ValueError("empty socket path")
    return UNIXClientEndpoint(clock, str(resolve(path)))
