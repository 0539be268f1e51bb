"""
Worker processes: C{twistd mailfw --workers N} on several cores.

One Python process cannot accept more mail than its reactor thread can
parse, so with C{--workers N} (N > 1) the twistd process (the I{parent})
binds every listener as usual and then starts N - 1 I{workers} with
C{reactor.spawnProcess}.  Each worker inherits the listening sockets (as
file descriptors 3, 4, ...), builds the same components from the same
configuration (the queue is the same SQLite file: WAL, C{BEGIN
IMMEDIATE} and a busy timeout serialise the processes' commits), and
adopts the sockets with C{adoptStreamPort} instead of listening; the
kernel hands each new connection to one of the processes that wait on the
socket.  Each process runs its own scheduler over the shared queue.

Only the parent serves the control socket.  A worker's log lines carry its
number and end up in the parent's log.  When twistd writes that log to its
standard output (C{twistd -n} without C{--logfile}: a terminal, a pipe to
journald or a container's log), the worker inherits that descriptor and
writes its lines there itself, in twistd's format, one C{write} per line;
formatting every event once more in the parent would cost it about a
tenth of its CPU at full load.  Otherwise (a C{--logfile} that twistd
rotates, C{--syslog}, C{--logger}) the worker writes its events as JSON
lines to a pipe and the parent re-logs them.  Named events (those with an
C{event} field, see L{mailfw.ops}) carry their fields across, so that the
parent's metrics, status page and JSON log see the workers' events as
their own; with the log on standard output and C{[metrics]} configured, a
worker sends its named events' fields (no text: it wrote that line
itself) on its standard error, each line marked with an ASCII record
separator, and the parent re-emits them without a format, which text logs
skip.  A worker
whose standard input closes (the parent died, even by SIGKILL) stops.  The
parent stops its workers with SIGTERM when it stops, and SIGKILL after
L{WorkerPool.stopTimeout} seconds.  A worker that dies while the parent
runs is logged and not restarted: the remaining processes keep serving the
shared sockets, and the SQLite queue returns the leases it held to ready
within a minute (L{SQLiteQueue} reaps the leases of this host's ended
processes; so it does for a previous run's process that was still
stopping when a restarted server recovered).

Start-up lease recovery is safe with siblings: L{SQLiteQueue.recover}
leaves alone the leases of live processes on this host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProcessTransport,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, formatTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.ops._events import eventFields

__all__ = [
    "WORKER_TYPES",
    "AdoptedPortService",
    "InheritedSocket",
    "RecordingEndpoint",
    "WorkerPool",
    "logsToStandardOutput",
    "workerArguments",
]

# Endpoint types whose listening socket a worker can adopt.
WORKER_TYPES = ("tcp", "tcp6", "ssl")

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6}


@dataclass(frozen=True)
class InheritedSocket:
    """
    One listening socket a worker inherits.

    @ivar kind: the listener kind (C{smtp}, C{submission}, C{submissions}).
    @ivar index: which of that kind's descriptions it was bound for (an
        C{ssl:} one gives the worker its certificate).
    @ivar fd: the file descriptor number in the worker.
    @ivar family: C{"INET"} or C{"INET6"}.
    """

    kind: str
    index: int
    fd: int
    family: str

    def encode(self) -> str:
        return f"{self.kind}:{self.index}:{self.fd}:{self.family}"

    @classmethod
    def parse(cls, text: str) -> InheritedSocket:
        """
        @raise ValueError: if C{text} is not what L{encode} makes.
        """
        kind, index, fd, family = text.split(":")
        if family not in _FAMILIES:
            raise ValueError(f"unknown address family {family!r}")
        return cls(kind, int(index), int(fd), family)

    @property
    def addressFamily(self) -> socket.AddressFamily:
        return _FAMILIES[self.family]


def encodeSockets(sockets: Sequence[InheritedSocket]) -> str:
    return ",".join(s.encode() for s in sockets)


def parseSockets(text: str) -> list[InheritedSocket]:
    """
    @raise ValueError: for a malformed description.
    """
    return [InheritedSocket.parse(part) for part in text.split(",") if part]


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """
    Wraps the parent's server endpoint to remember the port it listens on,
    whose socket the workers inherit.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, kind: str, index: int) -> None:
        self.endpoint = endpoint
        self.kind = kind
        self.index = index
        self.port: IListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        return self.endpoint.listen(protocolFactory).addCallback(record)


def workerArguments(
    number: int,
    sockets: Sequence[InheritedSocket],
    mailfwArguments: Sequence[str],
    logDirectly: bool = False,
) -> list[str]:
    """
    The command line of worker C{number}.

    @param logDirectly: the worker writes log lines to its standard output
        (the parent's) instead of JSON for the parent to re-log.
    """
    return [
        sys.executable,
        "-m",
        "mailfw._worker",
        str(number),
        encodeSockets(sockets),
        LOG_DIRECT if logDirectly else _LOG_RELAY,
        *mailfwArguments,
    ]


LOG_DIRECT = "log=stdout"
# Marks a line of a worker's standard error that carries a named event.
EVENT_MARK = b"\x1e"
# Logger.emit's own parameters, which no forwarded field may shadow.
_EMIT = frozenset({"level", "format", "workerLine"})
_LOG_RELAY = "log=relay"


def logsToStandardOutput(runnerOptions: Mapping[str, Any] | None) -> bool:
    """
    Whether twistd, whose options are C{runnerOptions}, writes its log as
    text lines to its standard output: C{twistd -n} with no C{--logfile}
    (or C{--logfile=-}) and neither C{--logger} nor C{--syslog}.  Anything
    else (C{twist}, a log file twistd rotates, a custom observer) is not
    known to be that, so workers relay their events through the parent.
    """
    if runnerOptions is None or not {"nodaemon", "logfile"} <= set(runnerOptions):
        return False
    return bool(
        runnerOptions.get("nodaemon")
        and runnerOptions.get("logfile") in (None, "-")
        and not runnerOptions.get("logger")
        and not runnerOptions.get("syslog")
    )


class _WorkerProtocol(ProcessProtocol):
    """
    One worker as the parent sees it: its log lines, and its end.
    """

    log = Logger()

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: Deferred[None] = Deferred()
        self._buffer = b""
        self._errors = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            self.relog(line)

    def errReceived(self, data: bytes) -> None:
        lines = (self._errors + data).split(b"\n")
        self._errors = lines.pop()
        for line in lines:
            self._errorLine(line)

    def _errorLine(self, line: bytes) -> None:
        if line.startswith(EVENT_MARK):
            # A named event's fields (see L{LineObserver}).
            self.relog(line[len(EVENT_MARK) :], withText=False)
            return
        # Only what escapes the logging system: interpreter errors.
        self.log.error(
            "worker {worker} stderr: {line}", worker=self.number, line=line.decode("utf-8", "replace")
        )

    def relog(self, line: bytes, withText: bool = True) -> None:
        """
        Log one event the worker wrote (see L{JSONLineObserver}), with the
        fields of a named event; without a format unless C{withText}.
        """
        fields: dict[str, Any] = {}
        try:
            level, namespace, text, *rest = json.loads(line)
            logLevel = LogLevel.levelWithName(level)
            if rest and isinstance(rest[0], dict):
                fields = {k: v for k, v in rest[0].items() if not k.startswith("log_") and k not in _EMIT}
        except (ValueError, TypeError, KeyError, LookupError):
            logLevel, namespace, text = LogLevel.info, "mailfw.worker", line.decode("utf-8", "replace")
        fields["worker"] = self.number
        self.log.emit(
            logLevel,
            "{workerLine}" if withText else None,
            workerLine=text,
            log_system=_system(namespace, logLevel, self.number),
            **fields,
        )

    def processEnded(self, reason: Failure) -> None:
        if self._buffer:
            self.relog(self._buffer)
            self._buffer = b""
        if self._errors:
            self._errorLine(self._errors)
            self._errors = b""
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Starts the workers once the parent listens, passes signals on to them
    (L{signalWorkers}), and stops them.

    @ivar stopTimeout: seconds between SIGTERM and SIGKILL on stop: more
        than the workers' own grace period for their sessions.
    """

    log = Logger()
    stopTimeout = 15.0

    def __init__(
        self,
        reactor: Any,
        count: int,
        endpoints: Sequence[RecordingEndpoint],
        mailfwArguments: Sequence[str],
        spawnProcess: Callable[..., IProcessTransport] | None = None,
        logDirectly: bool = False,
    ) -> None:
        """
        @param count: how many workers (the parent is not counted).
        @param endpoints: the parent's listeners, in the order of their
            services (started before this one).
        @param mailfwArguments: the C{twistd mailfw} options that rebuild
            the same configuration in a worker.
        @param spawnProcess: the reactor's by default; a seam for tests.
        @param logDirectly: the parent's log goes to its standard output
            (see L{logsToStandardOutput}): workers share that descriptor
            and write their own lines.
        """
        self._reactor = reactor
        self.count = count
        self.endpoints = list(endpoints)
        self.mailfwArguments = list(mailfwArguments)
        self._spawn = spawnProcess
        self.logDirectly = logDirectly
        self.workers: dict[int, tuple[_WorkerProtocol, IProcessTransport]] = {}

    def inherited(self) -> tuple[list[InheritedSocket], dict[int, int | str]]:
        """
        The sockets a worker inherits, and the C{childFDs} of
        C{spawnProcess}: standard input a pipe from the parent (its closing
        tells the worker the parent is gone), output the parent's own (when
        workers log directly) or a pipe to the parent, errors a pipe to the
        parent, then each listening socket.
        """
        sockets: list[InheritedSocket] = []
        childFDs: dict[int, int | str] = {0: "w", 1: 1 if self.logDirectly else "r", 2: "r"}
        for endpoint in self.endpoints:
            port = endpoint.port
            if port is None:
                continue
            family = "INET6" if ":" in str(getattr(port.getHost(), "host", "")) else "INET"
            childFD = 3 + len(sockets)
            childFDs[childFD] = port.fileno()  # type: ignore[attr-defined]
            sockets.append(InheritedSocket(endpoint.kind, endpoint.index, childFD, family))
        return sockets, childFDs

    def startService(self) -> None:
        super().startService()
        sockets, childFDs = self.inherited()
        if not sockets:
            self.log.error("no listening socket to share: not starting workers")
            return
        for number in range(1, self.count + 1):
            self.spawn(number, sockets, childFDs)

    def spawn(self, number: int, sockets: Sequence[InheritedSocket], childFDs: dict[int, int | str]) -> None:
        protocol = _WorkerProtocol(self, number)
        spawn = self._spawn or self._reactor.spawnProcess
        transport = spawn(
            protocol,
            sys.executable,
            workerArguments(number, sockets, self.mailfwArguments, self.logDirectly),
            env=dict(os.environ),
            path=os.getcwd(),
            childFDs=childFDs,
        )
        self.workers[number] = (protocol, transport)
        self.log.info("started worker {worker} (pid {pid})", worker=number, pid=transport.pid)

    def workerEnded(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        self.workers.pop(protocol.number, None)
        if self.running:
            self.log.error(
                "worker {worker} ended while the server runs: {reason}",
                worker=protocol.number,
                reason=reason.getErrorMessage(),
            )
        else:
            self.log.info("worker {worker} stopped", worker=protocol.number)

    def signalWorkers(self, name: str) -> None:
        """
        Send signal C{name} (C{"HUP"}: reload) to every worker.
        """
        for _, transport in list(self.workers.values()):
            with contextlib.suppress(Exception):  # already gone: processEnded follows
                transport.signalProcess(name)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self.workers:
            return succeed(None)
        ending: list[Deferred[None]] = []
        for protocol, transport in list(self.workers.values()):
            ending.append(protocol.ended)
            with contextlib.suppress(Exception):  # already gone: processEnded follows
                transport.signalProcess("TERM")
        from twisted.internet.defer import gatherResults

        done: Deferred[None] = Deferred()
        waiting = gatherResults(ending, consumeErrors=True)

        def kill() -> None:
            for _, transport in list(self.workers.values()):
                self.log.warn("worker did not stop: killing pid {pid}", pid=transport.pid)
                with contextlib.suppress(Exception):
                    transport.signalProcess("KILL")

        killer: IDelayedCall = self._reactor.callLater(self.stopTimeout, kill)

        def ended(_: object) -> None:
            if killer.active():
                killer.cancel()
            done.callback(None)

        waiting.addBoth(ended)
        return done


class AdoptedPortService(Service):
    """
    A worker's listener: adopts an inherited listening socket.
    """

    def __init__(self, reactor: Any, inherited: InheritedSocket, factory: Factory) -> None:
        self._reactor = reactor
        self.inherited = inherited
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.port = self._reactor.adoptStreamPort(
            self.inherited.fd, self.inherited.addressFamily, self.factory
        )
        # adoptStreamPort duplicated the descriptor.
        with contextlib.suppress(OSError):
            os.close(self.inherited.fd)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()


@implementer(ILogObserver)
class JSONLineObserver:
    """
    A worker's log: one JSON line C{[level, namespace, text, fields]} per
    event on standard output, for the parent to re-log; C{fields} are a
    named event's (L{eventFields}), else empty.
    """

    def __init__(self, write: Callable[[str], object], flush: Callable[[], object]) -> None:
        self._write = write
        self._flush = flush

    def __call__(self, event: dict[str, Any]) -> None:
        text = _eventText(event)
        level = event.get("log_level", LogLevel.info)
        fields = eventFields(event) if "event" in event else {}
        self._write(
            json.dumps(
                [str(getattr(level, "name", "info")), str(event.get("log_namespace", "-")), text, fields]
            )
            + "\n"
        )
        self._flush()


@implementer(ILogObserver)
class LineObserver:
    """
    A worker's log written straight to a descriptor it shares with the
    parent, as twistd's own observer would write it (C{"TIME [SYSTEM]
    TEXT"}, continuation lines indented), the system naming the worker.

    Formatting is the cost of a log event: most events are formatted with
    C{str.format_map} (the same result as Twisted's formatter for the
    plain fields mailfw uses; anything else falls back to it), and the
    time stamp, which has a resolution of seconds, is made once a second.
    """

    def __init__(self, fd: int, number: int, eventsFD: int | None = None) -> None:
        """
        @param eventsFD: where to send named events' fields for the
            parent's observers (see the module docstring), or C{None}.
        """
        self._fd = fd
        self._number = number
        self.eventsFD = eventsFD
        # One tuple, so that a thread logging at the same time never pairs
        # one second with another's stamp.
        self._stamp: tuple[int, str] = (-1, "")

    def __call__(self, event: dict[str, Any]) -> None:
        if self.eventsFD is not None and "event" in event:
            level = event.get("log_level", LogLevel.info)
            fields = [str(getattr(level, "name", "info")), str(event.get("log_namespace", "-")), ""]
            _write(
                self.eventsFD,
                EVENT_MARK + json.dumps([*fields, eventFields(event)]).encode("utf-8") + b"\n",
            )
        line = self.format(event)
        if line is None:
            return
        _write(self._fd, line.encode("utf-8", "replace"))

    def format(self, event: dict[str, Any]) -> str | None:
        """
        The line twistd would write for C{event}, or L{None} for no line.
        """
        text = _eventText(event)
        if not text:
            return None
        when = event.get("log_time")
        if when is None:
            stamp = formatTime(None)
        else:
            second, stamp = self._stamp
            if int(when) != second:
                stamp = formatTime(int(when))
                self._stamp = (int(when), stamp)
        system = _system(event.get("log_namespace", "-"), event.get("log_level"), self._number)
        return f"{stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"


def _write(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # nowhere left to say it


def _eventText(event: dict[str, Any]) -> str:
    """
    C{event} as text, with its failure's traceback, like
    L{twisted.logger.eventAsText} without time and system.
    """
    logFormat = event.get("log_format")
    try:
        if type(logFormat) is not str:
            raise TypeError(logFormat)
        text = logFormat.format_map(event)
    except Exception:
        text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        try:
            traceback = failure.getTraceback()
        except Exception as e:
            traceback = f"(unable to obtain traceback: {e})"
        text = f"{text}\n{traceback}"
    return text


def _system(namespace: object, level: object, number: int) -> str:
    """
    The system of a worker's log line: C{namespace#level worker N}.
    """
    return f"{namespace}#{getattr(level, 'name', '-')} worker {number}"
