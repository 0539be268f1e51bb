"""
Tests for reload and graceful stop (L{mailfw.tap.Lifecycle},
L{mailfw.smtp._server.SMTPServerProtocol.stopWhenIdle} and
L{mailfw._workers.WorkerPool.signalWorkers}), reactor-free; the real
signals against a real twistd are in C{tests/integration/test_lifecycle.py}.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailfw._workers import WorkerPool
from mailfw.config import loadConfig
from mailfw.smtp._server import SMTPServerProtocol
from mailfw.tap import Lifecycle, MailfwService, buildService
from tests.test_workers import _FakeTransport

CONFIG = """
[server]
shutdown_grace = {grace}
[listen]
smtp = ["tcp:{port}"]
[queue]
plugin = "memory"
[routing]
plugin = "static"
local_domains = [{domains}]
[delivery.local]
plugin = "discard"
{extra}
"""

BODY = b"Subject: hi\r\n\r\nhello\r\n"


class _Transport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


class _Server:
    """
    A server built from a configuration file by L{buildService} on a
    L{MemoryReactorClock}, with sessions connected to its C{smtp} factory.
    """

    def __init__(
        self, case: SynchronousTestCase, domains: str = '"one.test"', grace: float = 30.0, extra: str = ""
    ) -> None:
        self.case = case
        self.path = Path(case.mktemp())
        self.path.mkdir(parents=True)
        self.file = self.path / "mailfw.toml"
        self.write(domains, grace=grace, extra=extra)
        self.reactor = MemoryReactorClock()
        self.config = loadConfig(str(self.file), hostname="mx.test")
        self.service: MailfwService = buildService(self.config, self.reactor)
        self.service.startService()
        case.addCleanup(lambda: self.service.running and self.service.stopService())
        lifecycle = self.service.getServiceNamed("lifecycle")
        assert isinstance(lifecycle, Lifecycle)
        self.lifecycle = lifecycle

    def write(self, domains: str, port: int = 2525, extra: str = "", grace: float = 30.0) -> None:
        self.file.write_text(CONFIG.format(domains=domains, port=port, extra=extra, grace=grace))

    def load(self) -> Any:
        return loadConfig(str(self.file), hostname="mx.test")

    @property
    def factory(self) -> Any:
        return self.lifecycle.factories["smtp"]

    def connect(self) -> tuple[SMTPServerProtocol, _Transport]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        transport = _Transport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        protocol.makeConnection(transport)
        self.reactor.advance(0)
        return protocol, transport


def _codes(transport: StringTransport) -> list[bytes]:
    lines = transport.value().split(b"\r\n")[:-1]
    return [line[:3] for line in lines if line[3:4] != b"-"]


def _rcpt(protocol: SMTPServerProtocol, transport: StringTransport, address: str) -> bytes:
    transport.clear()
    protocol.dataReceived(b"RSET\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<" + address.encode() + b">\r\n")
    return _codes(transport)[-1]


def _messages(events: Sequence[dict[str, Any]]) -> list[str]:
    return [str(formatEvent(e)) for e in events]


class ReloadTests(SynchronousTestCase):
    def test_newTableForNewSessions(self) -> None:
        """
        After a reload, new sessions and the scheduler use the new
        components; a session connected before keeps the configuration it
        started with and is not dropped.
        """
        server = _Server(self)
        before, beforeTransport = server.connect()
        before.dataReceived(b"EHLO c.test\r\n")
        self.assertEqual(_rcpt(before, beforeTransport, "x@two.test"), b"554")
        oldAgents = server.lifecycle.scheduler.agents
        server.write('"one.test", "two.test"')
        with capturedLogs() as events:
            self.assertTrue(server.lifecycle.reload(server.load(), "mailfw.toml"))
        self.assertEqual(_messages(events)[-1], "configuration reloaded from mailfw.toml")
        after, afterTransport = server.connect()
        after.dataReceived(b"EHLO c.test\r\n")
        self.assertEqual(_rcpt(after, afterTransport, "x@two.test"), b"250")
        self.assertEqual(_rcpt(before, beforeTransport, "x@two.test"), b"554")
        self.assertFalse(beforeTransport.disconnecting)
        self.assertIsNot(server.lifecycle.scheduler.agents, oldAgents)
        self.assertIs(server.lifecycle.scheduler.agents, server.lifecycle.components.agents)

    def test_badFileKeepsRunning(self) -> None:
        """
        A configuration that cannot be built changes nothing, and one
        error line says why.
        """
        server = _Server(self)
        settings = server.factory.settings
        server.write('"one.test"', extra='[policy.x]\nplugin = "no-such-policy"\n')
        with capturedLogs() as events:
            self.assertFalse(server.lifecycle.reload(server.load(), "mailfw.toml"))
        [message] = _messages(events)
        self.assertTrue(
            message.startswith(
                "configuration reload from mailfw.toml failed, keeping the running configuration: [policy.x]"
            ),
            message,
        )
        self.assertIs(server.factory.settings, settings)

    def test_restartOnlyNamed(self) -> None:
        """
        A changed listener is not applied (it needs a restart); the reload
        line says so, and the rest is applied.
        """
        server = _Server(self)
        server.write('"one.test", "two.test"', port=2600)
        with capturedLogs() as events:
            self.assertTrue(server.lifecycle.reload(server.load(), "mailfw.toml"))
        self.assertEqual(
            _messages(events)[-1],
            "configuration reloaded from mailfw.toml; not applied until a restart: [listen]",
        )
        self.assertEqual(server.lifecycle.config.listen["smtp"], ["tcp:2525"])
        after, transport = server.connect()
        after.dataReceived(b"EHLO c.test\r\n")
        self.assertEqual(_rcpt(after, transport, "x@two.test"), b"250")

    def test_passwordCheckerReplaced(self) -> None:
        """
        AUTH is rebuilt too: new sessions get the new checker and its
        threads, while the old ones keep running until the sessions that
        may still use them (connected before the reload) are gone.
        """
        auth = '[auth]\npasswords = "passwd"\nsmtp = true\n'
        server = _Server(self, extra=auth)
        oldThreads = server.service.getServiceNamed("auth-threads")
        oldAuth = server.factory.settings.auth
        before, _ = server.connect()
        server.write('"one.test"', extra=auth)
        self.assertTrue(server.lifecycle.reload(server.load()))
        newThreads = server.lifecycle.components.authSetup.service
        self.assertIs(newThreads.parent, server.service)
        self.assertIsNot(newThreads, oldThreads)
        self.assertTrue(newThreads.running)
        self.assertIsNot(server.factory.settings.auth, oldAuth)
        self.assertIs(before.settings.auth, oldAuth)
        server.reactor.advance(60)
        self.assertTrue(oldThreads.running)
        self.assertIs(oldThreads.parent, server.service)
        before.connectionLost()
        server.reactor.advance(60)
        self.assertFalse(oldThreads.running)
        self.assertIsNone(oldThreads.parent)

    def test_reloadFromFile(self) -> None:
        """
        L{Lifecycle.reloadFromFile} reads the file the server started with
        (its command-line options); a file that is not TOML is refused in
        one line naming it.
        """
        server = _Server(self)
        server.lifecycle._reloadArguments = [f"--config={server.file}", "--hostname=mx.test"]
        server.file.write_text("[routing\n")
        with capturedLogs() as events:
            server.lifecycle.reloadFromFile()
        [message] = _messages(events)
        self.assertIn(f"configuration reload from {server.file} failed", message)
        server.write('"one.test", "two.test"')
        with capturedLogs() as events:
            server.lifecycle.reloadFromFile()
        self.assertEqual(_messages(events)[-1], f"configuration reloaded from {server.file}")

    def test_signalHandler(self) -> None:
        """
        With reload arguments, the running service handles SIGHUP by
        reloading in the reactor's time (not inside the signal handler),
        and gives the previous handler back when it stops.
        """
        calls: list[Any] = []

        class Reactor(MemoryReactorClock):
            def callFromThread(self, f: Any, *args: Any) -> None:
                calls.append(f)

        previous = signal.getsignal(signal.SIGHUP)
        server = _Server(self)
        lifecycle = Lifecycle(Reactor(), server.config, server.service.queue, None, None, ["--config=x"])  # type: ignore[arg-type]
        lifecycle.startService()
        handler = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(handler, previous)
        assert callable(handler)
        handler(signal.SIGHUP, None)
        self.assertEqual(calls, [lifecycle.reloadFromFile])
        lifecycle.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_noHandlerWithoutArguments(self) -> None:
        """
        Built without reload arguments (tests, embedding), the server
        leaves SIGHUP alone.
        """
        previous = signal.getsignal(signal.SIGHUP)
        _Server(self)
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_workersForwarded(self) -> None:
        """
        A parent with workers passes SIGHUP on to each of them.
        """
        server = _Server(self)
        pool = WorkerPool(server.reactor, 2, [], [])
        transports = [_FakeTransport(1), _FakeTransport(2)]
        pool.workers = {1: (None, transports[0]), 2: (None, transports[1])}  # type: ignore[dict-item]
        server.lifecycle.workers = pool
        server.lifecycle._reloadArguments = [f"--config={server.file}"]
        server.lifecycle.reloadFromFile()
        self.assertEqual([t.signals for t in transports], [["HUP"], ["HUP"]])


class StopTests(SynchronousTestCase):
    def test_idleClosedAtOnce(self) -> None:
        """
        Stopping closes an idle session with 421 4.3.2 at once and does not
        wait for anything else.
        """
        server = _Server(self)
        protocol, transport = server.connect()
        protocol.dataReceived(b"EHLO c.test\r\n")
        transport.clear()
        d = server.lifecycle.stopService()
        self.assertEqual(
            transport.value(), b"421 4.3.2 mx.test Service shutting down, closing transmission channel\r\n"
        )
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost()
        server.reactor.advance(Lifecycle.pollInterval)
        self.successResultOf(d)

    def test_transactionFinishes(self) -> None:
        """
        A session in the middle of its message may finish it: it gets its
        250, then 421; the stop waits for it.
        """
        server = _Server(self)
        protocol, transport = server.connect()
        protocol.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@one.test>\r\nDATA\r\n")
        protocol.dataReceived(BODY[:10])
        with capturedLogs() as events:
            d = server.lifecycle.stopService()
        self.assertEqual(
            _messages(events), ["stopping: waiting up to 30s for 1 sessions to finish their transactions"]
        )
        self.assertFalse(transport.disconnecting)
        server.reactor.advance(10)
        self.assertNoResult(d)
        transport.clear()
        protocol.dataReceived(BODY[10:] + b".\r\nMAIL FROM:<a@client.test>\r\n")
        self.assertEqual(_codes(transport), [b"250", b"421"])
        self.assertEqual(len(server.service.queue.queueIDs()), 1)  # type: ignore[attr-defined]
        protocol.connectionLost()
        server.reactor.advance(Lifecycle.pollInterval)
        self.successResultOf(d)

    def test_pendingReplyFirst(self) -> None:
        """
        A reply that is still pending (a slow check) goes out before the
        421.
        """
        server = _Server(self)
        protocol, transport = server.connect()
        protocol.dataReceived(b"EHLO c.test\r\n")
        transport.clear()
        protocol.replies.respondLater(_pending := _Deferred())
        server.lifecycle.stopService()
        self.assertEqual(transport.value(), b"")
        from mailfw.reply import SMTPReply
        from mailfw.smtp._replies import Answer

        _pending.callback(Answer(SMTPReply(250, "2.0.0", "Ok")))
        self.assertEqual(_codes(transport), [b"250", b"421"])

    def test_graceExpires(self) -> None:
        """
        A session still in its transaction when the grace period ends is cut
        off, and the stop finishes.
        """
        server = _Server(self, grace=5)
        protocol, transport = server.connect()
        protocol.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@client.test>\r\n")
        d = server.lifecycle.stopService()
        server.reactor.advance(4.9)
        self.assertNoResult(d)
        with capturedLogs() as events:
            server.reactor.advance(0.2)
        self.successResultOf(d)
        self.assertTrue(transport.aborted)
        self.assertEqual(_messages(events), ["1 sessions still open after the grace period: closing them"])

    def test_workersGetTheGrace(self) -> None:
        """
        The parent waits for its workers the grace period plus the time it
        gives them to exit.
        """
        path = Path(self.mktemp())
        path.mkdir()
        (path / "mailfw.toml").write_text(CONFIG.format(domains='"one.test"', port=2525, extra="", grace=40))
        config = loadConfig(str(path / "mailfw.toml"), hostname="mx.test")
        service = buildService(config, MemoryReactorClock(), workers=2)
        pool = service.getServiceNamed("workers")
        assert isinstance(pool, WorkerPool)
        self.assertEqual(pool.stopTimeout, 40 + WorkerPool.stopTimeout)
        self.successResultOf(service.queue.close())


def _Deferred() -> Any:
    from twisted.internet.defer import Deferred

    return Deferred()
