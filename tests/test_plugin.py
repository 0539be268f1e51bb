"""
Tests for L{mailfw.plugin}: finding component plugins by name.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import twisted.plugins
from mailfw.interfaces import (
    IDeliveryAgentFactory,
    IMessageQueueFactory,
    IRouterFactory,
)
from mailfw.plugin import DuplicatePlugin, LazyComponent, MissingPlugin, findPlugin


class FindPluginTests(SynchronousTestCase):
    def test_bundledFound(self) -> None:
        """
        The bundled components are found through the real dropin, the same
        path third-party plugins take.
        """
        self.assertEqual(findPlugin(IDeliveryAgentFactory, "maildir").name, "maildir")
        self.assertEqual(findPlugin(IMessageQueueFactory, "sqlite").name, "sqlite")
        self.assertEqual(findPlugin(IRouterFactory, "static").name, "static")

    def test_missingNamesInstalled(self) -> None:
        """
        A missing name raises L{MissingPlugin} listing what is installed.
        """
        e = self.assertRaises(MissingPlugin, findPlugin, IDeliveryAgentFactory, "nosuch")
        self.assertIn("'nosuch'", str(e))
        self.assertIn("maildir", str(e))

    def test_missingWhenNoneInstalled(self) -> None:
        """
        With nothing installed, the message says so.
        """
        e = self.assertRaises(MissingPlugin, findPlugin, IDeliveryAgentFactory, "x", [])
        self.assertIn("(none)", str(e))

    def test_duplicate(self) -> None:
        """
        Two providers with one name are refused rather than picked at random.
        """
        a = LazyComponent(IDeliveryAgentFactory, "twin", "x:y")
        b = LazyComponent(IDeliveryAgentFactory, "twin", "x:z")
        e = self.assertRaises(DuplicatePlugin, findPlugin, IDeliveryAgentFactory, "twin", [a, b])
        self.assertIn("'twin'", str(e))

    def test_listFilteredByInterface(self) -> None:
        """
        Given a list, only plugins of the requested kind count: a router
        named like a delivery agent is not a delivery agent.
        """
        router = LazyComponent(IRouterFactory, "same", "m:router")
        agent = LazyComponent(IDeliveryAgentFactory, "same", "m:agent")
        self.assertIs(findPlugin(IDeliveryAgentFactory, "same", [router, agent]), agent)
        self.assertRaises(MissingPlugin, findPlugin, IMessageQueueFactory, "same", [router, agent])

    def test_lazyComponentProvides(self) -> None:
        """
        L{LazyComponent} provides the factory interface it was made for.
        """
        self.assertTrue(verifyObject(IRouterFactory, LazyComponent(IRouterFactory, "r", "m:f")))

    def test_lazyComponentImportsOnUse(self) -> None:
        """
        The target module is imported only when C{fromConfig} is called, and
        its C{fromConfig} receives the arguments.
        """
        component = LazyComponent(IDeliveryAgentFactory, "p", "tests._lazytarget:fromConfig")
        sys.modules.pop("tests._lazytarget", None)
        self.assertEqual(component.fromConfig(None, "inst", {"a": 1}), ("inst", {"a": 1}))  # type: ignore[arg-type]

    def test_everyBundledTargetImports(self) -> None:
        """
        Every bundled dropin entry points at a module and a C{fromConfig}
        that exist, so no bundled name fails on first use.
        """
        import importlib

        import mailfw.interfaces as interfaces

        kinds = [
            interfaces.IMessageQueueFactory,
            interfaces.IRouterFactory,
            interfaces.IDeliveryAgentFactory,
            interfaces.IPolicyFactory,
        ]
        seen = 0
        for kind in kinds:
            for plugin in getPlugins(kind):
                if isinstance(plugin, LazyComponent) and plugin.target.startswith("mailfw."):
                    module, _, name = plugin.target.partition(":")
                    self.assertTrue(callable(getattr(importlib.import_module(module), name)), plugin.target)
                    seen += 1
        self.assertGreater(seen, 3)


class DropinDirectory:
    """
    Adds a temporary directory to C{twisted.plugins.__path__}, as a
    third-party distribution's C{twisted/plugins/} would be.
    """

    def __init__(self, testCase: SynchronousTestCase, source: str, name: str) -> None:
        self.path = Path(testCase.mktemp())
        self.path.mkdir(parents=True)
        (self.path / f"{name}.py").write_text(textwrap.dedent(source))
        twisted.plugins.__path__.append(str(self.path))
        testCase.addCleanup(twisted.plugins.__path__.remove, str(self.path))
        testCase.addCleanup(sys.modules.pop, f"twisted.plugins.{name}", None)
