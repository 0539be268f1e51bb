"""
Tests for L{mailfw.tap}: C{twistd mailfw} options and the service tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SynchronousTestCase

from mailfw import tap
from mailfw.config import ConfigError, loadConfig
from mailfw.interfaces import IMessageQueueFactory, IRouterFactory
from mailfw.queue._sqlite import SQLiteQueue, SynchronousExecutor
from mailfw.tap import DEFAULT_BACKLOG, Options, buildService, checkComponents
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

    def test_systemdOutsideSystemd(self) -> None:
        """
        A C{systemd:} endpoint in a process that systemd did not start is a
        usage error saying so, not Twisted's "list index out of range".
        """
        e = self.assertRaises(usage.UsageError, options, "--smtp", "systemd:domain=INET:index=0")
        self.assertEqual(
            str(e),
            "--smtp=systemd:domain=INET:index=0: needs systemd socket activation "
            "(no such socket was passed to this process)",
        )

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
        reactor, _service = self.build(MEMORY_CONFIG.format(agent="discard"))
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

    def test_deliveryTimeoutWithinLease(self) -> None:
        """
        A delivery timeout that is not shorter than the queue's lease is
        refused at start-up, naming both keys.
        """
        text = (
            MEMORY_CONFIG.format(agent="discard").replace(
                '[queue]\nplugin = "memory"', '[queue]\nplugin = "memory"\nlease_seconds = 60'
            )
            + "[scheduler]\ndelivery_timeout = 60\n"
        )
        e = self.assertRaises(ConfigError, self.build, text)
        self.assertIn(
            "[scheduler] delivery_timeout (60) must be shorter than [queue] lease_seconds (60)", str(e)
        )

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
        _reactor, service = self.build(MEMORY_CONFIG.format(agent="test-thirdparty"))
        scheduler = service.getServiceNamed("scheduler")  # type: ignore[attr-defined]
        agent = scheduler.agents["local"]
        self.assertEqual(type(agent).__module__, "twisted.plugins.mailfw_test_thirdparty")
        self.assertEqual(agent.options, {"plugin": "test-thirdparty"})


class StartupLogTests(SynchronousTestCase):
    def messages(self, text: str) -> list[str]:
        reactor = MemoryReactorClock()
        config = loadConfig(writeConfig(self, text), hostname="mx.test")
        with capturedLogs() as events:
            service = buildService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.dataDir = config.dataDir.absolute()
        return [str(formatEvent(e)) for e in events]

    def test_whereMailGoes(self) -> None:
        """
        The start-up log names each delivery instance's plugin and, for
        Maildir, where mailboxes are; the local domains, host name
        included; and the queue's plugin, never an object's repr.
        """
        text = MEMORY_CONFIG.format(agent="maildir") + (
            '[delivery.archive]\nplugin = "maildir"\npath = "/srv/archive/{domain}"\n'
            '[delivery.drop]\nplugin = "discard"\n'
        )
        messages = self.messages(text)
        self.assertIn(
            f"delivery instance local: plugin maildir, mailboxes "
            f"{self.dataDir}/mail/{{domain}}/{{localpart}}",
            messages,
        )
        self.assertIn(
            "delivery instance archive: plugin maildir, mailboxes /srv/archive/{domain}",
            messages,
        )
        self.assertIn("delivery instance drop: plugin discard", messages)
        self.assertIn("routing: static, mail for example.org, mx.test is delivered locally", messages)
        self.assertIn(
            f"mailfw mx.test: data in {self.dataDir}, queue memory (messages are lost when the process ends)",
            messages,
        )
        self.assertIn("mailfw smtp listener on tcp:2526:backlog=7", messages)
        self.assertEqual([m for m in messages if " object at 0x" in m], [])

    def test_sqliteQueueAndDefaultDomains(self) -> None:
        """
        An C{sqlite} queue describes itself with its file, resolved against
        the data directory; a component that does not describe itself is
        named by its plugin.
        """
        config = loadConfig(
            writeConfig(self, '[queue]\nplugin = "sqlite"\npath = "q/mail.db"\n'),
            hostname="MX.test",
        )
        self.assertEqual(
            tap._describe(_queueOf(self, config), "sqlite"), f"sqlite {config.dataDir.absolute()}/q/mail.db"
        )
        self.assertEqual(tap._describe(object(), "custom"), "plugin custom")


def _queueOf(case: SynchronousTestCase, config: Any) -> Any:
    """
    The queue that C{config} configures, closed when C{case} ends.
    """
    path = config.dataDir / config.queue["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    run = SynchronousExecutor()
    queue = SQLiteQueue(path, Clock(), writer=run, reader=run, spool=run, deliver=lambda f: f())
    case.addCleanup(queue.close)
    return queue


class CheckComponentsTests(SynchronousTestCase):
    def check(self, listen: str) -> Any:
        text = MEMORY_CONFIG.format(agent="discard").replace(
            'smtp = ["tcp:2525:interface=127.0.0.1", "tcp:2526:backlog=7"]', listen
        )
        config = loadConfig(writeConfig(self, text), hostname="mx.test")
        return checkComponents(config, MemoryReactorClock())

    def test_systemdListenerChecked(self) -> None:
        """
        A configuration listening on C{systemd:} sockets passes the check
        outside systemd; no port is opened.
        """
        d = self.check('smtp = ["systemd:domain=INET:index=0", "systemd:domain=INET6:name=mx"]')
        self.assertIsNone(self.successResultOf(d))

    def test_badSystemdListener(self) -> None:
        """
        A C{systemd:} entry with an unknown address family, or with both or
        neither of C{index} and C{name}, is refused, naming the entry.
        """
        for entry, reason in [
            ("systemd:domain=INETT:index=0", "unknown address family 'INETT'"),
            ("systemd:domain=INET:index=0:name=mx", "exactly one of descriptor index or name"),
            ("systemd:domain=INET", "exactly one of descriptor index or name"),
            ("systemd:domain=INET:index=x", "invalid literal"),
        ]:
            e = self.assertRaises(ConfigError, self.check, f'smtp = ["{entry}"]')
            self.assertIn(f"[listen] smtp = {entry!r}: ", str(e))
            self.assertIn(reason, str(e))

    def test_badComponent(self) -> None:
        """
        A bad component section makes the check fail with the error, after
        the components built before it were released.
        """
        text = MEMORY_CONFIG.format(agent="nosuch")
        config = loadConfig(writeConfig(self, text), hostname="mx.test")
        failure = self.failureResultOf(checkComponents(config, MemoryReactorClock()), ConfigError)
        self.assertIn("[delivery.local]", str(failure.value))

    def test_badListener(self) -> None:
        """
        Other listener entries are still parsed, and a bad one is refused.
        """
        e = self.assertRaises(ConfigError, self.check, 'smtp = ["tcpp:25"]')
        self.assertIn("[listen] smtp = 'tcpp:25'", str(e))

    def test_buildNeedsSystemd(self) -> None:
        """
        Building the server (not checking it) outside systemd fails with a
        clear reason.
        """
        text = MEMORY_CONFIG.format(agent="discard").replace(
            '"tcp:2525:interface=127.0.0.1", "tcp:2526:backlog=7"', '"systemd:domain=INET:name=mx"'
        )
        config = loadConfig(writeConfig(self, text), hostname="mx.test")
        e = self.assertRaises(ConfigError, buildService, config, MemoryReactorClock())
        self.assertIn("needs systemd socket activation", str(e))


class OwnershipTests(SynchronousTestCase):
    def test_twistdUidGid(self) -> None:
        """
        The owner comes from twistd's C{--uid} and C{--gid}, the parent of
        our options; C{--uid} alone means that user's primary group, and
        without either nothing changes hands.
        """
        import pwd

        nobody = pwd.getpwnam("nobody")

        def owner(*args: str) -> object:
            o = ServerOptions()
            o.parseOptions(["--pidfile=", *args, "mailfw", "--smtp", "tcp:0"])
            return tap._targetOwner(o.subOptions)

        self.assertEqual(owner("--uid", "nobody"), (nobody.pw_uid, nobody.pw_gid))
        self.assertEqual(owner("--uid", "nobody", "--gid", "0"), (nobody.pw_uid, 0))
        self.assertEqual(owner("--gid", "0"), (-1, 0))
        self.assertIsNone(owner())
        self.assertIsNone(tap._targetOwner(options("--smtp", "tcp:0")))

    def test_startupFilesHandedOver(self) -> None:
        """
        With an owner, the last service hands the data directory and the
        control socket with its lock over in C{privilegedStartService},
        after the control socket is bound; symbolic links are followed only
        for the data directory.
        """
        config = loadConfig(writeConfig(self, MEMORY_CONFIG.format(agent="discard")))
        service = buildService(config, MemoryReactorClock(), owner=(1234, 5678))
        self.assertEqual([child.name for child in service][-2:], ["control", "ownership"])
        calls: list[tuple[Path, int, int, bool]] = []
        ownership = service.getServiceNamed("ownership")
        ownership._chown = lambda *call: calls.append(call)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        d = config.dataDir
        self.assertEqual(
            calls,
            [
                (d, 1234, 5678, True),
                (d / "control.sock", 1234, 5678, False),
                (d / "control.sock.lock", 1234, 5678, False),
            ],
        )

    def test_sqliteQueueFiles(self) -> None:
        """
        The SQLite queue's database, its journal files and the directories
        made for it inside the data directory are handed over too.
        """
        config = loadConfig(writeConfig(self, '[queue]\nplugin = "sqlite"\npath = "spool/q/queue.db"\n'))
        d = config.dataDir
        self.assertEqual(
            tap._ownedPaths(d, [_queueOf(self, config)], d / "control.sock"),
            [
                (d, True),
                (d / "spool", False),
                (d / "spool" / "q", False),
                (d / "spool/q/queue.db", False),
                (d / "spool/q/queue.db-wal", False),
                (d / "spool/q/queue.db-shm", False),
                (d / "spool/q/queue.db-journal", False),
                (d / "spool/q/queue.db.writer-lock", False),
                (d / "control.sock", False),
                (d / "control.sock.lock", False),
            ],
        )

    def test_noOwnerNoService(self) -> None:
        """
        Without an owner nothing is handed over.
        """
        config = loadConfig(writeConfig(self, MEMORY_CONFIG.format(agent="discard")))
        service = buildService(config, MemoryReactorClock())
        self.assertNotIn("ownership", [child.name for child in service])

    def test_queueOutsideDataDir(self) -> None:
        """
        Directories outside the data directory are never handed over, even
        through C{..}; only the queue's files are.
        """
        config = loadConfig(writeConfig(self, '[queue]\nplugin = "sqlite"\npath = "../q.db"\n'))
        paths = tap._ownedPaths(config.dataDir, [_queueOf(self, config)], config.dataDir / "control.sock")
        self.assertEqual(
            [p for p, _ in paths if not p.name.startswith(("q.db", "control.sock"))],
            [config.dataDir],
        )

    def test_missingAndRefused(self) -> None:
        """
        A path that does not exist is skipped; one that cannot be changed
        is logged and the others are still handed over.
        """
        done: list[Path] = []

        def chown(path: Path, uid: int, gid: int, follow: bool) -> None:
            if path.name == "missing":
                raise FileNotFoundError(path)
            if path.name == "refused":
                raise PermissionError(1, "Operation not permitted")
            done.append(path)

        service = tap._Ownership(
            (1, 2),
            [(Path("missing"), False), (Path("refused"), False), (Path("ok"), False)],
            chown,
        )
        with capturedLogs() as events:
            service.privilegedStartService()
        self.assertEqual(done, [Path("ok")])
        self.assertEqual(
            [str(formatEvent(e)) for e in events],
            ["cannot give refused to uid 1 gid 2: Operation not permitted"],
        )

    def test_chownOnlyWhenNeeded(self) -> None:
        """
        L{tap._chown} leaves a path that already has the owner alone, and
        never follows a symbolic link unless told to.
        """
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        (base / "file").write_text("")
        os.symlink(base / "file", base / "link")
        self.addCleanup(os.unlink, base / "link")
        calls: list[tuple[object, ...]] = []
        self.patch(os, "chown", lambda *a, **kw: calls.append((*a, kw)))
        tap._chown(base / "file", os.getuid(), os.getgid(), False)
        tap._chown(base / "file", -1, -1, False)
        self.assertEqual(calls, [])
        stranger = os.getuid() + 1
        tap._chown(base / "link", stranger, -1, False)
        self.assertEqual(calls, [(base / "link", stranger, -1, {"follow_symlinks": False})])


class ShutdownTests(SynchronousTestCase):
    def test_queueClosedAfterDeliveriesRecorded(self) -> None:
        """
        Stopping the server waits for the delivery in flight to be recorded
        before the queue is closed, so a stop does not leave a delivered
        message leased (and delivered again at the next start).
        """
        from twisted.internet.defer import Deferred
        from zope.interface import implementer

        from mailfw.envelope import RecipientOutcome
        from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory
        from mailfw.plugin import LazyComponent
        from mailfw.reply import SMTPReply
        from mailfw.testing import makeEnvelope

        pending: list[tuple[Any, Deferred[object]]] = []

        @implementer(IDeliveryAgent)
        class SlowAgent:
            name = "slow"

            def deliver(self, envelope, body, nexthop):  # type: ignore[no-untyped-def]
                d: Deferred[object] = Deferred()
                pending.append((envelope, d))
                return d

        @implementer(IDeliveryAgentFactory)
        class SlowFactory:
            name = "slow"

            def fromConfig(self, context, instanceName, options):  # type: ignore[no-untyped-def]
                return SlowAgent()

        plugins = [
            LazyComponent(IMessageQueueFactory, "memory", "mailfw.queue._memory:fromConfig"),
            LazyComponent(IRouterFactory, "static", "mailfw.routing._static:fromConfig"),
            SlowFactory(),
        ]
        reactor = MemoryReactorClock()
        config = loadConfig(writeConfig(self, MEMORY_CONFIG.format(agent="slow")), hostname="mx.test")
        service = buildService(config, reactor, plugins)
        service.startService()
        incoming = service.queue.receive(makeEnvelope("a@example.org"))
        incoming.write(b"Subject: x\r\n\r\nx\r\n")
        incoming.commit()
        reactor.advance(0)
        [(envelope, answer)] = pending
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertFalse(service.queue.closed)  # type: ignore[attr-defined]
        answer.callback([RecipientOutcome(r, SMTPReply(250, "2.0.0", "ok")) for r in envelope.recipients])
        self.successResultOf(stopped)
        self.assertTrue(service.queue.closed)  # type: ignore[attr-defined]
        self.assertEqual(service.queue.queueIDs(), [])  # type: ignore[attr-defined]
