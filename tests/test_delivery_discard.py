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
    Discarding reports success for each recipient.
    """

    def test_reportsDelivered(self) -> None:
        """
        Each recipient gets 250 2.0.0 "Discarded" (which the scheduler logs
        with the agent's name); the body is never opened and the agent adds
        no log event of its own.
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
        self.assertEqual(
            [(o.recipient.address.localpart, o.reply.code, o.reply.enhanced, o.reply.text) for o in outcomes],
            [("a", 250, "2.0.0", "Discarded"), ("b", 250, "2.0.0", "Discarded")],
        )
        self.assertEqual(body.readers, [])
        self.assertEqual(events, [])


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
