"""
Routing: where each recipient goes (L{StaticRouter}) and which hosts
receive mail for a domain (L{MXResolver}).
"""

from mailfw.routing._mx import MailHost, MXResolver, Resolution
from mailfw.routing._nexthop import Nexthop, NexthopError, parseNexthop
from mailfw.routing._static import StaticRouter

__all__ = [
    "MXResolver",
    "MailHost",
    "Nexthop",
    "NexthopError",
    "Resolution",
    "StaticRouter",
    "parseNexthop",
]
