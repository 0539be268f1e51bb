"""
Tests for L{mailfw.tap}: C{twistd mailfw} options and the service tree.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ConfigError, loadConfig
from mailfw.tap import DEFAULT_BACKLOG, Options, buildService
from tests.test_plugin import DropinDirectory


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


class OptionsTests(SynchronousTestCase):
    def test_repeatedListeners(self) -> None:
        """
        C{--smtp} may be given several times; each replaces the default.
        """
        o = options("--smtp", "tcp:2500", "--smtp", "tcp6:2500", "--hostname", "mx.test")
        self.assertEqual(o.serverConfig.listen["smtp"], ["tcp:2500", "tcp6:2500"])
        self.assertEqual(o.serverConfig.hostname, "mx.test")

    def test_badEndpointNamesOption(self) -> None:
        """
        A bad endpoint description is a usage error naming the option.
        """
        e = self.assertRaises(usage.UsageError, options, "--smtp", "tcpp:25")
        self.assertIn("--smtp=tcpp:25", str(e))

    def test_badSSLFiles(self) -> None:
        """
        An C{ssl:} endpoint whose key file is missing is a usage error.
        """
        e = self.assertRaises(
            usage.UsageError,
            options,
            "--submissions",
            "ssl:465:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem",
        )
        self.assertIn("--submissions=ssl:465", str(e))

    def test_badConfigFile(self) -> None:
        """
        A configuration error is a usage error with the loader's message.
        """
        e = self.assertRaises(usage.UsageError, options, "--config", "/nonexistent.toml")
        self.assertIn("cannot read configuration /nonexistent.toml", str(e))


def writeConfig(testCase: SynchronousTestCase, text: str) -> str:
    path = Path(testCase.mktemp())
    path.mkdir(parents=True)
    (path / "mailfw.toml").write_text(text)
    return str(path / "mailfw.toml")


MEMORY_CONFIG = """
[listen]
smtp = ["tcp:2525:interface=127.0.0.1", "tcp:2526:backlog=7"]
submission = ["tcp:2587"]
[queue]
plugin = "memory"
[routing]
plugin = "static"
local_domains = ["example.org"]
[delivery.local]
plugin = "{agent}"
"""


class BuildServiceTests(SynchronousTestCase):
    def build(self, text: str) -> tuple[MemoryReactorClock, object]:
        reactor = MemoryReactorClock()
        config = loadConfig(writeConfig(self, text), hostname="mx.test")
        service = buildService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return reactor, service

    def test_listens(self) -> None:
        """
        Each listener becomes a port with a large default backlog, unless
        the description sets its own; the control socket listens too.
        """
        reactor, service = self.build(MEMORY_CONFIG.format(agent="discard"))
        ports = sorted((port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers)
        self.assertEqual(
            ports,
            [(2525, DEFAULT_BACKLOG, "127.0.0.1"), (2526, 7, ""), (2587, DEFAULT_BACKLOG, "")],
        )
        [unix] = reactor.unixServers
        self.assertTrue(unix[0].endswith("control.sock"))
        self.assertEqual(unix[3], 0o600)

    def test_missingPluginNamesSection(self) -> None:
        """
        A delivery instance naming an unknown plugin fails with the section
        and the installed names.
        """
        e = self.assertRaises(ConfigError, self.build, MEMORY_CONFIG.format(agent="nosuch"))
        self.assertIn("[delivery.local]", str(e))
        self.assertIn("maildir", str(e))

    def test_thirdPartyDropin(self) -> None:
        """
        A third-party dropin is found and selected by name from the
        configuration, exactly like a bundled plugin.
        """
        DropinDirectory(
            self,
            """
            from zope.interface import implementer
            from twisted.internet.defer import succeed
            from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory
            from mailfw.envelope import RecipientOutcome
            from mailfw.reply import SMTPReply

            @implementer(IDeliveryAgent)
            class Agent:
                def __init__(self, name, options):
                    self.name = name
                    self.options = options
                def deliver(self, envelope, body, nexthop):
                    return succeed([RecipientOutcome(r, SMTPReply(250, "2.0.0", "ok"))
                                    for r in envelope.recipients])

            @implementer(IDeliveryAgentFactory)
            class Factory:
                name = "test-thirdparty"
                def fromConfig(self, context, instanceName, options):
                    return Agent(instanceName, dict(options))

            factory = Factory()
            """,
            "mailfw_test_thirdparty",
        )
        reactor, service = self.build(MEMORY_CONFIG.format(agent="test-thirdparty"))
        scheduler = service.getServiceNamed("scheduler")  # type: ignore[attr-defined]
        agent = scheduler.agents["local"]
        self.assertEqual(type(agent).__module__, "twisted.plugins.mailfw_test_thirdparty")
        self.assertEqual(agent.options, {"plugin": "test-thirdparty"})
