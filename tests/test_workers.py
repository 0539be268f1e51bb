"""
Tests for L{mailfw._workers} and C{twistd mailfw --workers}: the socket and
argument plumbing between the parent and its workers, their lifecycle, and
the SQLite queue's start-up recovery rule with sibling processes.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEventAsClassicLogText
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions  # type: ignore[attr-defined]
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw._workers import (
    AdoptedPortService,
    InheritedSocket,
    JSONLineObserver,
    LineObserver,
    RecordingEndpoint,
    WorkerPool,
    _WorkerProtocol,
    logsToStandardOutput,
    parseSockets,
    workerArguments,
)
from mailfw.config import loadConfig
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._sqlite import SQLiteQueue, SynchronousExecutor
from mailfw.tap import Options, buildService
from tests.test_tap import MEMORY_CONFIG, writeConfig


def options(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


class InheritedSocketTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        The command-line description of inherited sockets parses back to the
        same sockets.
        """
        sockets = [InheritedSocket("smtp", 0, 3, "INET"), InheritedSocket("submissions", 1, 4, "INET6")]
        arguments = workerArguments(2, sockets, ["--smtp=tcp:25"])
        self.assertEqual(arguments[:4], [sys.executable, "-m", "mailfw._worker", "2"])
        self.assertEqual(parseSockets(arguments[4]), sockets)
        self.assertEqual(arguments[5:], ["log=relay", "--smtp=tcp:25"])
        self.assertEqual(sockets[1].addressFamily, socket.AF_INET6)
        direct = workerArguments(2, sockets, ["--smtp=tcp:25"], logDirectly=True)
        self.assertEqual(direct[5:], ["log=stdout", "--smtp=tcp:25"])

    def test_badFamily(self) -> None:
        """
        An unknown address family is refused.
        """
        self.assertRaises(ValueError, parseSockets, "smtp:0:3:UNIX")


class OptionsTests(SynchronousTestCase):
    def test_default(self) -> None:
        """
        Without C{--workers} the server is one process.
        """
        self.assertEqual(options("--smtp", "tcp:2500")["workers"], 1)

    def test_refusesOtherEndpoints(self) -> None:
        """
        With workers, a listener whose socket cannot be shared (C{unix:},
        C{haproxy:}) is a usage error naming it.
        """
        for description in ("unix:/tmp/x.sock", "haproxy:tcp:2500"):
            e = self.assertRaises(usage.UsageError, options, "--workers", "2", "--smtp", description)
            self.assertIn(description, str(e))

    def test_refusesZero(self) -> None:
        """
        C{--workers 0} is a usage error.
        """
        self.assertRaises(usage.UsageError, options, "--workers", "0", "--smtp", "tcp:2500")

    def test_workerArguments(self) -> None:
        """
        The worker gets the same listeners, host name and absolute paths.
        """
        o = options("--workers", "2", "--smtp", "tcp:2500", "--data-dir", "rel", "--hostname", "mx.test")
        self.assertEqual(
            o.workerArguments,
            [
                "--hostname=mx.test",
                f"--data-dir={os.path.abspath('rel')}",
                "--smtp=tcp:2500",
            ],
        )


def twistdOptions(*args: str) -> ServerOptions:
    o = ServerOptions()
    o.parseOptions(list(args))
    return o


class LogDestinationTests(SynchronousTestCase):
    """
    Workers write their own log lines only when twistd's log is text on its
    standard output.
    """

    def test_standardOutput(self) -> None:
        """
        C{twistd -n mailfw} (and C{--logfile=-}) log to standard output.
        """
        for args in (("-n",), ("-n", "--logfile=-")):
            o = twistdOptions(*args, "--pidfile=", "mailfw", "--workers=2", "--smtp=tcp:2500")
            self.assertTrue(o.subOptions.workersLogDirectly, args)

    def test_otherDestinations(self) -> None:
        """
        A log file (which twistd rotates), a daemon, C{--syslog}, a custom
        C{--logger}, and being run by something other than twistd all make
        workers relay their events through the parent.
        """
        for args in (
            ("-n", "--logfile=x.log"),
            (),
            ("-n", "--syslog"),
            ("-n", "--logger=twisted.logger.jsonFileLogObserver"),
        ):
            o = twistdOptions(*args, "--pidfile=", "mailfw", "--workers=2", "--smtp=tcp:2500")
            self.assertFalse(o.subOptions.workersLogDirectly, args)
        self.assertFalse(options("--workers=2", "--smtp", "tcp:2500").workersLogDirectly)
        self.assertFalse(logsToStandardOutput({"logFile": sys.stdout}))


class _FakeHost:
    def __init__(self, host: str) -> None:
        self.host = host


class _FakePort:
    def __init__(self, fd: int, host: str) -> None:
        self.fd = fd
        self.host = host

    def fileno(self) -> int:
        return self.fd

    def getHost(self) -> _FakeHost:
        return _FakeHost(self.host)


class _FakeEndpoint:
    def __init__(self, port: Any) -> None:
        self.port = port

    def listen(self, factory: Any) -> Deferred[Any]:
        return succeed(self.port)


class _FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spawned: list[tuple[Any, ...]] = []
        self.endpoints = [
            RecordingEndpoint(_FakeEndpoint(_FakePort(17, "127.0.0.1")), "smtp", 0),  # type: ignore[arg-type]
            RecordingEndpoint(_FakeEndpoint(_FakePort(19, "::1")), "submission", 1),  # type: ignore[arg-type]
        ]
        for endpoint in self.endpoints:
            endpoint.listen(Factory())
        self.pool = WorkerPool(self.clock, 2, self.endpoints, ["--smtp=tcp:25"], self.spawn)  # type: ignore[arg-type]

    def spawn(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> _FakeTransport:
        transport = _FakeTransport(1000 + len(self.spawned))
        self.spawned.append((protocol, executable, args, kw, transport))
        return transport

    def test_recordingEndpoint(self) -> None:
        """
        L{RecordingEndpoint} provides the endpoint interface and remembers
        the port it listened on.
        """
        verifyObject(IStreamServerEndpoint, self.endpoints[0])
        self.assertEqual(self.endpoints[0].port.fileno(), 17)  # type: ignore[union-attr]

    def test_spawnsWithSockets(self) -> None:
        """
        Starting the pool spawns each worker with the listening sockets as
        descriptors 3, 4... and pipes for standard input, output and errors.
        """
        self.pool.startService()
        self.assertEqual(len(self.spawned), 2)
        for number, (protocol, executable, args, kw, _) in enumerate(self.spawned, 1):
            self.assertEqual(executable, sys.executable)
            self.assertEqual(args[3], str(number))
            self.assertEqual(
                parseSockets(args[4]),
                [InheritedSocket("smtp", 0, 3, "INET"), InheritedSocket("submission", 1, 4, "INET6")],
            )
            self.assertEqual(kw["childFDs"], {0: "w", 1: "r", 2: "r", 3: 17, 4: 19})
            self.assertEqual(args[5], "log=relay")
            self.assertEqual(protocol.number, number)

    def test_directLogSharesStandardOutput(self) -> None:
        """
        With C{logDirectly}, a worker's standard output is the parent's own.
        """
        self.pool.logDirectly = True
        self.pool.startService()
        for _, _, args, kw, _ in self.spawned:
            self.assertEqual(kw["childFDs"][1], 1)
            self.assertEqual(args[5], "log=stdout")

    def test_stopTerminatesThenKills(self) -> None:
        """
        Stopping sends SIGTERM to every worker, SIGKILL after the timeout to
        the ones still running, and finishes when all have ended.
        """
        self.pool.startService()
        d = self.pool.stopService()
        transports = [s[4] for s in self.spawned]
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM"]])
        self.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.clock.advance(WorkerPool.stopTimeout)
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM", "KILL"]])
        self.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.assertEqual(self.pool.workers, {})

    def test_deathLogged(self) -> None:
        """
        A worker that ends while the server runs is logged as an error.
        """
        self.pool.startService()
        with capturedLogs() as events:
            self.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertEqual([e["log_level"] for e in events], [LogLevel.error])
        self.assertEqual(list(self.pool.workers), [2])


class RelogTests(SynchronousTestCase):
    def test_relogs(self) -> None:
        """
        The parent re-logs each JSON line a worker writes at its level, with
        the worker's number, even when a line arrives in pieces.
        """
        protocol = _WorkerProtocol(None, 3)  # type: ignore[arg-type]
        written: list[str] = []
        observer = JSONLineObserver(written.append, lambda: None)
        observer({"log_format": "hello {x}", "x": 1, "log_level": LogLevel.warn, "log_namespace": "n"})
        line = written[0].encode()
        with capturedLogs() as events:
            protocol.outReceived(line[:5])
            protocol.outReceived(line[5:] + b"not json\n")
        self.assertEqual(len(events), 2)
        self.assertEqual(events[0]["workerLine"], "hello 1")
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(events[0]["worker"], 3)
        self.assertIn("worker 3", events[0]["log_system"])
        self.assertEqual(events[1]["workerLine"], "not json")
        self.assertEqual(json.loads(written[0])[1], "n")


class LineObserverTests(SynchronousTestCase):
    """
    L{LineObserver} writes what twistd's own observer would write.
    """

    def twistdLine(self, event: dict[str, Any]) -> str | None:
        """
        The line twistd's observer writes for C{event} as the parent would
        re-log it: with the worker's system.
        """
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')} worker 3"
        return formatEventAsClassicLogText(dict(event, log_system=system))

    def test_sameAsTwistd(self) -> None:
        """
        Plain fields, format specs, conversions, attribute and item access,
        several lines, non-ASCII text, Twisted's call syntax, a failure's
        traceback, a field that is missing and events without text give the
        same line (or none) as twistd's observer.
        """
        try:
            _ = 1 / 0
        except ZeroDivisionError:
            failure = Failure()
        base = {"log_time": 1_790_000_000.25, "log_level": LogLevel.info, "log_namespace": "ns"}
        events: list[dict[str, Any]] = [
            {
                "log_format": "accepted {queueID} ({size} octets) in {t:.1f}s",
                "queueID": "Q",
                "size": 7,
                "t": 0.25,
            },
            {"log_format": "{a!r} {b.real} {c[k]}", "a": "x", "b": 3, "c": {"k": "v"}},
            {"log_format": "two\nlines and {u}", "u": "d\u00e9j\u00e0 \u2709"},
            {"log_format": "called {f()}", "f": lambda: "yes"},
            {"log_format": "failed {x}", "x": 1, "log_failure": failure, "log_level": LogLevel.critical},
            {"log_format": None},
            {},
            {"log_format": "no time", "log_time": None},
        ]
        observer = LineObserver(-1, 3)
        for event in events:
            event = dict(base, **event)
            self.assertEqual(observer.format(event), self.twistdLine(event), event)
        # Twisted's message for an event it cannot format shows the event,
        # which here lacks the system twistd's copy has.
        missing = dict(base, log_format="missing {nothere}")
        line = observer.format(missing)
        assert line is not None
        self.assertEqual(
            line.split(" Unable to format event")[0],
            self.twistdLine(missing).split(" Unable to format event")[0],  # type: ignore[union-attr]
        )
        self.assertIn("'nothere'", line)

    def test_timeStampPerSecond(self) -> None:
        """
        The time stamp follows the event's second, also backwards.
        """
        observer = LineObserver(-1, 3)
        for when in (1_790_000_000.1, 1_790_000_000.9, 1_790_000_001.0, 1_790_000_000.5):
            event = {"log_format": "x", "log_time": when, "log_namespace": "n", "log_level": LogLevel.info}
            self.assertEqual(observer.format(event), self.twistdLine(event))

    def test_writesWholeLines(self) -> None:
        """
        Each event is one line written to the descriptor; a closed
        descriptor is not an error.
        """
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        observer = LineObserver(write, 3)
        observer(
            {
                "log_format": "hello {x}",
                "x": 1,
                "log_time": 1.0,
                "log_namespace": "n",
                "log_level": LogLevel.warn,
            }
        )
        observer({"log_format": "second", "log_time": 1.0, "log_namespace": "n", "log_level": LogLevel.info})
        lines = os.read(read, 4096).decode().splitlines()
        self.assertEqual(
            [line.split(" ", 1)[1] for line in lines],
            ["[n#warn worker 3] hello 1", "[n#info worker 3] second"],
        )
        os.close(write)
        observer({"log_format": "nowhere", "log_time": 1.0})


class WorkerBuildTests(SynchronousTestCase):
    def test_adoptsInsteadOfListening(self) -> None:
        """
        A worker adopts its inherited sockets (closing its copy of the
        descriptor), listens on nothing and serves no control socket.
        """
        reactor = MemoryReactorClock()
        config = loadConfig(writeConfig(self, MEMORY_CONFIG.format(agent="discard")), hostname="mx.test")
        fd = os.open(os.devnull, os.O_RDONLY)
        service = buildService(config, reactor, worker=[InheritedSocket("submission", 0, fd, "INET")])
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.unixServers, [])
        [(adopted, family, factory)] = reactor.adoptedPorts
        self.assertEqual((adopted, family), (fd, socket.AF_INET))
        self.assertEqual(factory.kind, "submission")
        self.assertRaises(OSError, os.fstat, fd)

    def test_parentStartsPool(self) -> None:
        """
        With C{workers=2} the parent listens as usual and has a pool of one
        worker; with the default it has none.
        """
        config = loadConfig(writeConfig(self, MEMORY_CONFIG.format(agent="discard")), hostname="mx.test")
        service = buildService(config, MemoryReactorClock(), workers=2, workerArguments=["--x"])
        pool = service.getServiceNamed("workers")
        assert isinstance(pool, WorkerPool)
        self.assertEqual(pool.count, 1)
        self.assertEqual(len(pool.endpoints), 3)
        single = buildService(config, MemoryReactorClock())
        self.assertRaises(KeyError, single.getServiceNamed, "workers")

    def test_adoptedPortStops(self) -> None:
        """
        Stopping an adopted port's service stops listening on it.
        """
        reactor = MemoryReactorClock()
        fd = os.open(os.devnull, os.O_RDONLY)
        service = AdoptedPortService(reactor, InheritedSocket("smtp", 0, fd, "INET6"), Factory())
        service.startService()
        port = service.port
        self.assertIsNotNone(port)
        self.assertEqual(reactor.adoptedPorts[0][:2], (fd, socket.AF_INET6))
        service.stopService()
        self.assertIsNone(service.port)
        self.assertIsNone(service.stopService())


def _call(f: Any) -> None:
    f()


class RecoveryTests(SynchronousTestCase):
    """
    L{SQLiteQueue.recover} with several processes on one database.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()

    def queue(self, owner: str | None = None) -> SQLiteQueue:
        q = SQLiteQueue(
            self.path,
            self.clock,
            writer=SynchronousExecutor(),
            reader=SynchronousExecutor(),
            spool=SynchronousExecutor(),
            deliver=_call,
            owner=owner,
        )
        self.addCleanup(lambda: None if q._closed else q.close())
        return q

    def leaseAs(self, owner: str) -> None:
        q = self.queue(owner)
        incoming = q.receive(makeEnvelope("a@example.com"))
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        self.successResultOf(incoming.commit())
        self.assertEqual(len(self.successResultOf(q.claim(self.clock.seconds(), 10))), 1)

    def test_sparesLiveSibling(self) -> None:
        """
        Start-up recovery (an infinite time) leaves the unexpired lease of
        another live process on this host alone.
        """
        self.leaseAs(f"{self.host}:{os.getppid()}")
        self.assertEqual(self.successResultOf(self.queue().recover(float("inf"))), 0)

    def test_recoversExpiredSibling(self) -> None:
        """
        A live sibling's lease is recovered once it has expired by the clock.
        """
        self.leaseAs(f"{self.host}:{os.getppid()}")
        self.clock.advance(10_000)
        self.assertEqual(self.successResultOf(self.queue().recover(float("inf"))), 1)

    def test_reapsEndedSiblingsWhileRunning(self) -> None:
        """
        Once a queue has recovered at start-up, it returns the leases of
        this host's processes that have since ended to ready every
        C{reapSeconds} (a worker that died, or a process of the previous
        run that was still stopping), long before they expire; its own,
        a live sibling's and another host's leases stay.
        """
        q = self.queue()
        self.successResultOf(q.recover(float("inf")))
        dead = f"{self.host}:{2**22 + 7}"
        for owner in (dead, f"{self.host}:{os.getppid()}", f"elsewhere:{2**22 + 9}"):
            self.leaseAs(owner)
        incoming = q.receive(makeEnvelope("own@example.com"))
        incoming.write(b"x\r\n")
        self.successResultOf(incoming.commit())
        self.assertEqual(len(self.successResultOf(q.claim(self.clock.seconds(), 10))), 1)
        woken: list[None] = []
        q.notifyDue(lambda: woken.append(None))
        self.clock.advance(q.reapSeconds)
        owners = sorted(
            (str(row[0]), row[1])
            for row in sqlite3.connect(str(self.path)).execute("SELECT lease_owner, state FROM recipients")
        )
        self.assertEqual(
            owners,
            sorted(
                [
                    ("None", "ready"),
                    (f"{self.host}:{os.getppid()}", "leased"),
                    (f"elsewhere:{2**22 + 9}", "leased"),
                    (f"{self.host}:{os.getpid()}", "leased"),
                ]
            ),
        )
        self.assertEqual(woken, [None])
        self.successResultOf(q.close())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_recoversDeadOwnAndForeign(self) -> None:
        """
        Leases of a process that no longer runs, of this process's own ID
        (an earlier process with the same PID) and of another host are
        recovered at start-up as in a single process.
        """
        for owner in (f"{self.host}:{2**22 + 7}", f"{self.host}:{os.getpid()}", f"elsewhere:{os.getppid()}"):
            self.leaseAs(owner)
        self.assertEqual(self.successResultOf(self.queue().recover(float("inf"))), 3)
