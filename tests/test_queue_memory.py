"""
Tests for L{mailfw.queue._memory}.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.config import ComponentContext, ConfigError
from mailfw.interfaces import IDescribed, IMessageQueue, IMessageQueueFactory
from mailfw.plugin import findPlugin
from mailfw.queue._contract import QueueContractTests, makeEnvelope
from mailfw.queue._memory import MemoryQueue, fromConfig
from mailfw.queued import QueueFull, Selector


class MemoryQueueContractTests(QueueContractTests, SynchronousTestCase):
    """
    L{MemoryQueue} keeps the queue contract.
    """

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        return MemoryQueue(clock)

    def test_described(self) -> None:
        """
        It describes itself for the start-up log, saying that it keeps
        nothing, and owns no files.
        """
        self.assertTrue(verifyObject(IDescribed, self.queue))
        assert isinstance(self.queue, MemoryQueue)
        self.assertIn("lost when the process ends", self.queue.describe())
        self.assertEqual(self.queue.ownedPaths(), [])


class MemoryQueueHelperTests(SynchronousTestCase):
    """
    The test helpers L{MemoryQueue} offers beyond the interface.
    """

    def test_defaultIDs(self) -> None:
        """
        Queue IDs count up from C{Q1} unless a generator is given.
        """
        queue = MemoryQueue()
        self.assertEqual(
            [queue.receive(makeEnvelope("a@example.com")).queueID for _ in range(2)], ["Q1", "Q2"]
        )
        self.assertEqual(MemoryQueue(idGenerator=lambda: "X").receive(makeEnvelope()).queueID, "X")

    def test_full(self) -> None:
        """
        With C{full} set, commits fail with L{QueueFull} and store nothing.
        """
        queue = MemoryQueue()
        queue.full = True
        incoming = queue.receive(makeEnvelope("a@example.com"))
        self.failureResultOf(incoming.commit(), QueueFull)
        self.assertEqual(queue.queueIDs(), [])

    def test_failure(self) -> None:
        """
        With C{failure} set, commits fail with it.
        """
        queue = MemoryQueue()
        queue.failure = RuntimeError("boom")
        self.failureResultOf(queue.receive(makeEnvelope("a@example.com")).commit(), RuntimeError)

    def test_holdCommits(self) -> None:
        """
        With C{holdCommits} set, a commit waits until L{MemoryQueue.releaseCommits}.
        """
        queue = MemoryQueue()
        queue.holdCommits = True
        incoming = queue.receive(makeEnvelope("a@example.com"))
        incoming.write(b"x\r\n")
        d = incoming.commit()
        self.assertNoResult(d)
        self.assertEqual(queue.queueIDs(), [])
        queue.releaseCommits()
        self.assertEqual(self.successResultOf(d), "Q1")
        self.assertEqual(queue.body("Q1"), b"x\r\n")
        self.assertEqual(str(queue.envelope("Q1").recipients[0].address), "a@example.com")
        self.assertEqual(len(queue.recipients("Q1")), 1)

    def test_noRecipients(self) -> None:
        """
        A message without recipients is accepted but nothing is queued.
        """
        queue = MemoryQueue()
        self.assertEqual(self.successResultOf(queue.receive(makeEnvelope()).commit()), "Q1")
        self.assertEqual(self.successResultOf(queue.list(Selector())), [])


class MemoryFromConfigTests(SynchronousTestCase):
    """
    L{fromConfig} builds a memory queue from C{[queue]}.
    """

    def context(self) -> ComponentContext:
        return ComponentContext(reactor=Clock(), hostname="mx.example", dataDir=Path("."))

    def test_plugin(self) -> None:
        """
        The bundled C{memory} plugin builds a L{MemoryQueue} with the lease
        length configured.
        """
        plugin = findPlugin(IMessageQueueFactory, "memory")
        queue = plugin.fromConfig(self.context(), "queue", {"plugin": "memory", "lease_seconds": 30})
        self.assertIsInstance(queue, MemoryQueue)
        self.assertEqual(queue.leaseSeconds, 30)
        self.flushLoggedErrors()

    def test_unknownOption(self) -> None:
        """
        An unknown option is a configuration error.
        """
        self.assertRaises(ConfigError, fromConfig, self.context(), "queue", {"plugin": "memory", "pth": "x"})
