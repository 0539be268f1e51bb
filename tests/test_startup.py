"""
What start-up imports: packages re-export their names lazily
(L{mailfw._lazy}), and a server imports an optional feature's libraries
only when its configuration uses that feature (issue 19: start-up under a
second; C{benchmarks/startup.py} measures it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import import_module
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailfw._lazy import lazyExports

ROOT = Path(__file__).resolve().parent.parent

# The accept benchmark's configuration (benchmarks/accept.py MAILFW_CONFIG).
BENCH_CONFIG = """\
[queue]
plugin = "sqlite"

[routing]
plugin = "static"
local_domains = ["bench.test"]
local_agent = "local"

[delivery.local]
plugin = "discard"
"""

METRICS_CONFIG = """
[metrics]
listen = "tcp:0:interface=127.0.0.1"
"""

AUTH_CONFIG = """
[auth]
passwords = "passwords"
"""

# Imported only by the features named: [metrics], [auth], other agents,
# the contract tests for plugin authors.
OPTIONAL = {
    "metrics": ["prometheus_client", "twisted.web.server", "mailfw.ops._metrics", "mailfw.ops._service"],
    "auth": ["mailfw.auth._config", "mailfw.auth._dovecot"],
    "other agents": ["mailfw.delivery._maildir", "mailfw.delivery._lmtp", "mailfw.delivery._pipe"],
    "contract tests": ["mailfw.delivery._contract"],
    "the memory queue": ["mailfw.queue._memory"],
}

_BUILD = textwrap.dedent(
    """
    import json, os, sys
    from twisted.internet import reactor
    from mailfw.config import loadConfig
    from mailfw.tap import buildService

    config = loadConfig(sys.argv[1], hostname="bench.test", dataDir=sys.argv[2])
    buildService(config, reactor)
    print(json.dumps(sorted(sys.modules)), flush=True)
    # Without waiting for the queue's writer thread: the reactor never ran.
    os._exit(0)
    """
)


def modulesAfterBuild(testCase: SynchronousTestCase, text: str) -> set[str]:
    """
    The modules a fresh Python process has imported once it built (not
    started: the reactor never runs) the service of configuration
    C{text}.
    """
    directory = Path(testCase.mktemp())
    directory.mkdir(parents=True)
    (directory / "mailfw.toml").write_text(text)
    (directory / "passwords").write_text("")
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, str(directory / "mailfw.toml"), str(directory / "data")],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"building the service failed (exit {result.returncode}):\n{result.stderr}")
    return set(json.loads(result.stdout.splitlines()[-1]))


class LazyExportsTests(SynchronousTestCase):
    """
    L{lazyExports} imports a name from its home on first use.
    """

    def setUp(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "example.package"}
        self.getattr = lazyExports(self.namespace, {"fromConfig": "tests._lazytarget"})

    def test_importsFromHome(self) -> None:
        """
        A listed name is the attribute of the module named for it, and is
        kept in the package so the next lookup does not ask again.
        """
        from tests._lazytarget import fromConfig

        self.assertIs(self.getattr("fromConfig"), fromConfig)
        self.assertIs(self.namespace["fromConfig"], fromConfig)

    def test_unknownName(self) -> None:
        """
        A name that is not listed is an L{AttributeError} naming the
        package, as for any module.
        """
        e = self.assertRaises(AttributeError, self.getattr, "other")
        self.assertEqual(str(e), "module 'example.package' has no attribute 'other'")
        self.assertNotIn("other", self.namespace)


class LazyPackagesTests(SynchronousTestCase):
    """
    The packages that re-export lazily still export every name of their
    C{__all__}, each the object its module defines.
    """

    def assertExportsAll(self, packageName: str) -> None:
        """
        Every name of the package's C{__all__} resolves (a name missing
        from its table of homes, or a wrong home, is an L{AttributeError}).
        """
        package = import_module(packageName)
        for name in package.__all__:
            try:
                getattr(package, name)
            except AttributeError as e:
                self.fail(f"{packageName}.{name} in __all__ does not resolve: {e}")

    def test_ops(self) -> None:
        """
        L{mailfw.ops} exports its event, metrics, service and status names.
        """
        from mailfw.ops._metrics import Metrics
        from mailfw.ops._service import OpsService

        self.assertExportsAll("mailfw.ops")
        from mailfw.ops import Metrics as exported
        from mailfw.ops import OpsService as service

        self.assertIs(exported, Metrics)
        self.assertIs(service, OpsService)

    def test_auth(self) -> None:
        """
        L{mailfw.auth} exports the password file, checker, lockout and realm.
        """
        from mailfw.auth._passwd import hashPassword

        self.assertExportsAll("mailfw.auth")
        from mailfw.auth import hashPassword as exported

        self.assertIs(exported, hashPassword)

    def test_delivery(self) -> None:
        """
        L{mailfw.delivery} exports the bundled agents and the contract tests.
        """
        from mailfw.delivery._contract import DeliveryAgentContractTests

        self.assertExportsAll("mailfw.delivery")
        from mailfw.delivery import DeliveryAgentContractTests as exported

        self.assertIs(exported, DeliveryAgentContractTests)

    def test_queue(self) -> None:
        """
        L{mailfw.queue} exports the memory queue.
        """
        from mailfw.queue._memory import MemoryQueue

        self.assertExportsAll("mailfw.queue")
        from mailfw.queue import MemoryQueue as exported

        self.assertIs(exported, MemoryQueue)


class StartupImportsTests(SynchronousTestCase):
    """
    Building the server imports an optional feature only when it is
    configured.
    """

    def test_benchmarkConfiguration(self) -> None:
        """
        The accept benchmark's configuration (SQLite queue, static routing,
        discard delivery) imports neither metrics, AUTH, other agents, the
        contract tests nor the memory queue.
        """
        modules = modulesAfterBuild(self, BENCH_CONFIG)
        self.assertIn("mailfw.delivery._discard", modules)
        for feature, names in OPTIONAL.items():
            self.assertEqual([n for n in names if n in modules], [], f"imported without {feature}")

    def test_configuredFeatures(self) -> None:
        """
        With C{[metrics]} and C{[auth]} configured, their modules are
        imported (so that the test above can fail).
        """
        modules = modulesAfterBuild(self, BENCH_CONFIG + METRICS_CONFIG + AUTH_CONFIG)
        for feature in ("metrics", "auth"):
            self.assertEqual(
                [n for n in OPTIONAL[feature] if n not in modules], [], f"{feature} not imported"
            )
