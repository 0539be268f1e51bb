"""
Expansion of the hosting table's aliases (plugin C{virtual-aliases}).

The router sends a recipient of a virtual domain that is an alias (or
falls under the domain's catch-all) to this agent::

    [delivery.virtual-aliases]
    plugin = "virtual-aliases"
    virtual = "sqlite:hosting.sqlite"     # the same table as [routing] virtual
    # max_depth = 20                      # Delivered-To headers before a loop is assumed

The expansion itself is the C{aliases} agent's (L{AliasDeliveryAgent}):
the targets become one new queued message with the same sender, a
C{Delivered-To:} header, the recipient's DSN parameters, and loop
detection; only where the table comes from differs.  Each delivery reads
the current aliases of its recipients from the hosting table (in its
thread pool) and hands them to an expander that holds exactly those, so
an alias changed since RCPT time is expanded as it is now, and two
deliveries running at once never see each other's snapshot.  A recipient
whose alias was deleted meanwhile gets C{550 5.1.1}; a table that cannot
be read defers the delivery (C{451 4.3.0}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailfw.address import Address
from mailfw.config import ConfigError, Section
from mailfw.delivery._aliases import TABLE_ERROR, Alias, AliasDeliveryAgent, AliasTable
from mailfw.delivery._maildir import ThreadPoolRunner, ThreadRunner
from mailfw.envelope import Envelope, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IDescribed, IHostingTable, IMessageBody, IMessageQueue
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["VirtualAliasAgent", "fromConfig"]

NO_COMMANDS = SMTPReply(554, "5.3.5", "Virtual aliases cannot run commands")


class _SnapshotExpander(AliasDeliveryAgent):
    """
    An L{AliasDeliveryAgent} over a table given to it, never re-read from
    a file.
    """

    def _reload(self, known: object) -> None:
        return None


def _noCommands(argv: Sequence[str]) -> IDeliveryAgent:
    # Targets in the hosting table are addresses (HostingError refuses
    # anything else), so no alias of ours ever names a command.
    raise AssertionError(f"a virtual alias named a command: {argv!r}")


@implementer(IDeliveryAgent, IDescribed)
class VirtualAliasAgent:
    """
    Expands recipients by the aliases of an L{IHostingTable} (see the
    module docstring).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        table: IHostingTable,
        queue: IMessageQueue,
        runInThread: ThreadRunner,
        maxDepth: int = 20,
    ) -> None:
        self.name = name
        self.table = table
        self.queue = queue
        self.maxDepth = maxDepth
        self._runInThread = runInThread

    def describe(self) -> str:
        described = IDescribed(self.table, None)
        return "plugin virtual-aliases, aliases of " + (
            described.describe() if described is not None else "a hosting table"
        )

    def ownedPaths(self) -> list[str]:
        described = IDescribed(self.table, None)
        return list(described.ownedPaths()) if described is not None else []

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        if not envelope.recipients:
            return succeed([])
        return Deferred.fromCoroutine(self._deliver(envelope, body))

    async def _deliver(self, envelope: Envelope, body: IMessageBody) -> Sequence[RecipientOutcome]:
        entries: dict[tuple[str, str | None], Alias] = {}
        try:
            for recipient in envelope.recipients:
                address = recipient.address
                targets = await self.table.aliases(address)
                if targets:
                    entries[(address.unquotedLocalpart.lower(), address.domain)] = Alias(
                        str(address), addresses=tuple(Address.parse(t, utf8=True) for t in targets)
                    )
        except Exception:
            self.log.failure("{agent}: cannot read the virtual aliases", agent=self.name)
            return [RecipientOutcome(r, TABLE_ERROR) for r in envelope.recipients]
        expander = _SnapshotExpander(
            name=self.name,
            path=Path(self.describe()),
            queue=self.queue,
            runInThread=self._runInThread,
            pipeFactory=_noCommands,
            table=AliasTable(entries),
            maxDepth=self.maxDepth,
        )
        return await expander.deliver(envelope, body, None)


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> VirtualAliasAgent:
    """
    Build the agent from C{[delivery.NAME]}: C{virtual} (required, as in
    C{[routing]}), C{max_depth} (default 20), C{threads} (default 2).
    """
    from mailfw.hosting._sql import tableFromText

    section = Section(f"[delivery.{instanceName}]", options)
    virtual = section.text("virtual", None)
    maxDepth = section.integer("max_depth", 20, minimum=1)
    threads = section.integer("threads", 2, minimum=1)
    section.finish()
    if virtual is None:
        raise ConfigError(f"{section.title} needs 'virtual' (the same table as [routing] virtual)")
    if context.queue is None:
        raise ConfigError(
            f"{section.title}: the virtual-aliases agent puts its expansions into the queue, "
            "but none was given to it (ComponentContext.queue is not set)"
        )
    runner = ThreadPoolRunner(context.reactor, f"mailfw-virtual-aliases-{instanceName}", threads)
    table = tableFromText(virtual, context.dataDir, runner, f"{section.title} virtual")
    return VirtualAliasAgent(instanceName, table, context.queue, runner, maxDepth)
