"""
C{docs/configuration.rst} documents exactly the keys that the bundled
policy plugins C{limits}, C{dnsbl}, C{greylist} and C{basic-checks} read.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ComponentContext
from mailfw.interfaces import IPolicyFactory
from mailfw.plugin import findPlugin
from mailfw.queue import MemoryQueue
from mailfw.testing import FakeResolver
from tests.test_docs import ROOT, documentedKeys, recordingKeys

# What each plugin needs before it reads the rest.
REQUIRED: dict[str, dict[str, object]] = {"dnsbl": {"zones": ["bl.example"]}}


class PolicyReferenceTests(SynchronousTestCase):
    documented = documentedKeys(ROOT / "docs" / "configuration.rst")

    def test_keysDocumented(self) -> None:
        """
        Each plugin's key list names exactly the keys its C{fromConfig}
        reads.
        """
        for name in ("limits", "dnsbl", "greylist", "basic-checks"):
            label = f"[policy] {name}"
            context = ComponentContext(
                reactor=Clock(),
                hostname="mx.example.org",
                dataDir=Path(self.mktemp()),
                queue=MemoryQueue(Clock()),
                _resolver=FakeResolver({}),
            )
            with recordingKeys() as asked:
                findPlugin(IPolicyFactory, name).fromConfig(context, "p", REQUIRED.get(name, {}))
            self.assertIn(label, self.documented, f"no '.. docs-test: keys {label}' list")
            self.assertEqual(
                sorted(self.documented[label]),
                sorted(asked["[policy.p]"]),
                f"the keys documented for {label} differ from those the code reads",
            )
