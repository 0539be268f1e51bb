"""
The router and policy conformance kits of L{mailfw.testing}, run against
the bundled static router and the policy base class.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ComponentContext
from mailfw.interfaces import IPolicy, IRouter
from mailfw.policy import Policy
from mailfw.routing._static import fromConfig
from mailfw.testing import PolicyContractTests, RouterContractTests


class StaticRouterContractTests(RouterContractTests, SynchronousTestCase):
    def makeRouter(self) -> IRouter:
        context = ComponentContext(
            reactor=Clock(),
            hostname="mx.example.org",
            dataDir=Path("."),
            agentNames=frozenset({"local", "outbound"}),
        )
        return fromConfig(context, "routing", {"local_domains": [self.localDomain]})


class PolicyBaseContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> IPolicy:
        return Policy()
