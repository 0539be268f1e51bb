"""
Tests for L{mailfw.delivery._discard}.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._contract import DeliveryAgentContractTests, TrackingBody
from mailfw.delivery._discard import DiscardDeliveryAgent, fromConfig
from mailfw.envelope import Envelope, Recipient
from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory
from mailfw.plugin import findPlugin


class DiscardContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    The discarding agent satisfies the delivery agent contract.
    """

    def makeAgent(self) -> IDeliveryAgent:
        return DiscardDeliveryAgent("sink")


class DiscardTests(SynchronousTestCase):
    """
    Discarding reports success and logs each recipient.
    """

    def test_reportsDeliveredAndLogs(self) -> None:
        """
        Each recipient gets 250 2.0.0 and one info event naming it, the
        sender and the agent; the body is never opened.
        """
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        agent = DiscardDeliveryAgent("sink")
        body = TrackingBody()
        envelope = Envelope(
            sender=Address("s", "example.net"),
            recipients=(Recipient(Address("a", "example.org")), Recipient(Address("b", "example.org"))),
        )
        outcomes = self.successResultOf(agent.deliver(envelope, body, None))
        self.assertEqual([(o.reply.code, o.reply.enhanced) for o in outcomes], [(250, "2.0.0")] * 2)
        self.assertEqual(body.readers, [])
        mine = [e for e in events if e.get("agent") == "sink"]
        self.assertEqual([e["recipient"] for e in mine], ["a@example.org", "b@example.org"])
        for event in mine:
            self.assertEqual(event["log_level"].name, "info")
            self.assertEqual(event["sender"], "s@example.net")
            self.assertEqual((event["code"], event["enhanced"]), (250, "2.0.0"))


class FromConfigTests(SynchronousTestCase):
    """
    Building the agent from C{[delivery.NAME]}.
    """

    context = ComponentContext(reactor=None, hostname="mx.example", dataDir=None)  # type: ignore[arg-type]

    def test_plugin(self) -> None:
        """
        The bundled C{discard} plugin builds a discarding agent named after
        its section.
        """
        agent: Any = findPlugin(IDeliveryAgentFactory, "discard").fromConfig(
            self.context, "sink", {"plugin": "discard"}
        )
        self.assertIsInstance(agent, DiscardDeliveryAgent)
        self.assertEqual(agent.name, "sink")

    def test_noOptions(self) -> None:
        """
        Any option besides C{plugin} is refused.
        """
        with self.assertRaises(ConfigError):
            fromConfig(self.context, "sink", {"plugin": "discard", "path": "x"})
