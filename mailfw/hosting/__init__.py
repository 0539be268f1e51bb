"""
Hosting data for virtual domains: which domains are hosted, their mailboxes,
aliases and sender rights, in SQLite or PostgreSQL.  The static router reads
it (C{[routing] virtual}), the AUTH realm asks it who may send as whom, and
the C{mailfw domain|user|alias|sender} commands edit it.
"""

from mailfw.hosting._sql import SQLHostingTable, tableFromText
from mailfw.hosting._values import (
    AliasEntry,
    HostingError,
    Mailbox,
    SenderRight,
    addressKey,
    aliasKey,
    domainKey,
)

__all__ = [
    "AliasEntry",
    "HostingError",
    "Mailbox",
    "SQLHostingTable",
    "SenderRight",
    "addressKey",
    "aliasKey",
    "domainKey",
    "tableFromText",
]
