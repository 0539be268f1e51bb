"""
The operations endpoint: C{[metrics] listen = "tcp:9125:interface=127.0.0.1"}
serves C{/metrics} (Prometheus), C{/healthz} and the status page
(C{/status}, C{/status.json}, C{/status.js}) with twisted.web.  It is off
unless configured, and only the parent process of C{--workers N} serves it
(the workers forward their events to it).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mailfw.config import ConfigError, Section
from mailfw.interfaces import IMessageQueue, ISharedState
from mailfw.ops._metrics import Metrics, QueueSnapshot, summarise
from mailfw.ops._status import StatusBoard, StatusJSON, StatusPage, StatusScript
from mailfw.queued import Selector

__all__ = ["HealthCheck", "OpsService", "OpsSettings", "QueueWatch"]

#: A scheduler that has not claimed for this long while mail is overdue
#: (by as long) fails C{/healthz}.
SCHEDULER_STALL = 60.0
#: Seconds a health probe of the queue may take.
PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class OpsSettings:
    """
    The C{[metrics]} section.

    @ivar listen: the endpoint description, or C{None}: no endpoint.
    @ivar user: with C{password}, HTTP basic auth for everything but
        C{/healthz}.
    @ivar allowRemote: whether the status page answers clients that are
        not on a loopback address (it says who talks to the server).
    @ivar queueInterval: the queue figures are at most this old (each
        refresh reads the whole queue through C{IQueueAdmin.list}).
    @ivar topDomains: how many destination domains get their own label.
    @ivar refresh: how often the status page polls, in seconds.
    """

    listen: str | None = None
    user: str | None = None
    password: str | None = None
    allowRemote: bool = False
    queueInterval: float = 10.0
    topDomains: int = 10
    refresh: float = 2.0

    @classmethod
    def fromSection(cls, options: Mapping[str, object]) -> OpsSettings:
        """
        @raise ConfigError: naming the key.
        """
        section = Section("[metrics]", options)
        settings = cls(
            listen=section.text("listen", None),
            user=section.text("user", None),
            password=section.text("password", None),
            allowRemote=section.flag("allow_remote", False),
            queueInterval=section.number("queue_interval", 10.0, minimum=0.0),
            topDomains=section.integer("top_domains", 10, minimum=1),
            refresh=section.number("refresh", 2.0, minimum=0.1),
        )
        section.finish()
        if (settings.user is None) != (settings.password is None):
            raise ConfigError("[metrics] needs both 'user' and 'password' for basic auth")
        return settings


class QueueWatch:
    """
    Keeps a L{QueueSnapshot} no older than C{interval} seconds, read with
    C{IQueueAdmin.list} and shared by the metrics and the status page.

    The listing reads every queued recipient and envelope, so its cost
    grows with the queue (about 0.4 ms a message with SQLite on a loaded
    2-core machine): after a read that took M{t} seconds the next waits at
    least C{SLOWDOWN * t}, which keeps the watch under 1/C{SLOWDOWN} of
    the time of the thread doing the reading, however large the queue.
    """

    SLOWDOWN = 20

    log = Logger()

    def __init__(
        self,
        queue: IMessageQueue,
        clock: IReactorTime,
        interval: float,
        topDomains: int,
        consumers: list[Callable[[QueueSnapshot], None]],
    ) -> None:
        self._queue = queue
        self._clock = clock
        self._interval = interval
        self._topDomains = topDomains
        self._consumers = consumers
        self.snapshot: QueueSnapshot | None = None
        self._waiting: list[Deferred[QueueSnapshot | None]] = []
        self._readTime = 0.0

    def current(self) -> Deferred[QueueSnapshot | None]:
        """
        The snapshot, read again first if it is older than the interval.
        Never fails: a queue that cannot be read keeps the last snapshot
        (its age is a metric of its own).
        """
        now = self._clock.seconds()
        wait = max(self._interval, self.SLOWDOWN * self._readTime)
        if self.snapshot is not None and now - self.snapshot.taken < wait:
            return succeed(self.snapshot)
        waiting: Deferred[QueueSnapshot | None] = Deferred()
        self._waiting.append(waiting)
        if len(self._waiting) == 1:
            self._read(now)
        return waiting

    def _read(self, now: float) -> None:
        def read(messages: Any) -> None:
            snapshot = summarise(messages, now, self._topDomains)
            self._readTime = self._clock.seconds() - now
            self.snapshot = snapshot
            for consumer in self._consumers:
                consumer(snapshot)

        def failed(f: Failure) -> None:
            self.log.failure("reading the queue for the metrics failed", f)

        def done(_: object) -> None:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(self.snapshot)

        d: Deferred[Any] = self._queue.list(Selector())
        d.addCallback(read).addErrback(failed).addBoth(done)


class HealthCheck(Resource):
    """
    C{/healthz}: 200 C{ok} when the queue can commit and the scheduler is
    not stalled, else 503 naming what is wrong.

    The queue commits a counter through L{ISharedState} when it provides
    it (a real write transaction); a queue without it is asked when mail
    is next due (a read).  The scheduler is stalled when mail has been due
    for over L{SCHEDULER_STALL} seconds and it has neither claimed within
    that time nor any delivery running.
    """

    isLeaf = True

    def __init__(self, queue: IMessageQueue, scheduler: Any, clock: IReactorTime) -> None:
        super().__init__()
        self._queue = queue
        self._scheduler = scheduler
        self._clock = clock

    def check(self) -> Deferred[list[str]]:
        """
        @return: what is wrong; empty when healthy.
        """
        return Deferred.fromCoroutine(self._check())

    async def _check(self) -> list[str]:
        problems: list[str] = []
        now = self._clock.seconds()
        try:
            if ISharedState.providedBy(self._queue):
                probe: Deferred[Any] = ISharedState(self._queue).count("mailfw:healthz", 1, 60.0, now)
            else:
                probe = self._queue.nextDue()
            await probe.addTimeout(PROBE_TIMEOUT, self._clock)
            due = await self._queue.nextDue().addTimeout(PROBE_TIMEOUT, self._clock)
        except Exception as e:
            return [f"queue: {type(e).__name__}: {e}"]
        scheduler = self._scheduler
        if scheduler is None or not scheduler.running:
            problems.append("scheduler: not running")
        elif due is not None and due < now - SCHEDULER_STALL and not scheduler.deliveries:
            last = scheduler.lastClaimed
            if last is None or last < now - SCHEDULER_STALL:
                problems.append(f"scheduler: mail due for {now - due:.0f}s and no claim for a minute")
        return problems

    def render_GET(self, request: Request) -> Any:
        def answer(problems: list[str]) -> None:
            request.setResponseCode(503 if problems else 200)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.write(("\n".join(problems) if problems else "ok").encode("utf-8") + b"\n")
            request.finish()

        self.check().addCallback(answer).addErrback(lambda f: request.processingFailed(f))
        return NOT_DONE_YET


class MetricsPage(Resource):
    """
    C{/metrics}: Prometheus' text format, with the queue figures refreshed
    (at most every C{queue_interval} seconds) before the answer.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, watch: QueueWatch) -> None:
        super().__init__()
        self._metrics = metrics
        self._watch = watch

    def render_GET(self, request: Request) -> Any:
        def answer(_: object) -> None:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(generate_latest(self._metrics.registry))
            request.finish()

        self._watch.current().addCallback(answer).addErrback(lambda f: request.processingFailed(f))
        return NOT_DONE_YET


class _QuietSite(Site):
    """
    A site that writes no access log line: a scrape every few seconds
    would fill the mail log.
    """

    def log(self, request: http.Request) -> None:
        pass


class _Guard(Resource):
    """
    Basic auth (when configured) and the loopback rule in front of the
    endpoint's resources; C{/healthz} is open, for load balancers and
    orchestrators.
    """

    def __init__(self, settings: OpsSettings, children: dict[bytes, Resource], private: set[bytes]) -> None:
        super().__init__()
        self._settings = settings
        self._children = children
        self._private = private
        self._forbidden = _Text(403, "only loopback clients may see the status page\n")
        self._unauthorised = _Text(401, "authentication required\n")

    def getChild(self, path: bytes, request: Request) -> Resource:
        child = self._children.get(path)
        if child is None:
            return _Text(404, "not found: try /metrics, /healthz or /status\n")
        if path == b"healthz":
            return child
        settings = self._settings
        if settings.user is not None and not _authorised(request, settings.user, settings.password or ""):
            return self._unauthorised
        if path in self._private and not settings.allowRemote and not _loopback(request):
            return self._forbidden
        return child

    def render_GET(self, request: Request) -> bytes:
        request.redirect(b"/status")
        return b""


class _Text(Resource):
    isLeaf = True

    def __init__(self, code: int, text: str) -> None:
        super().__init__()
        self._code = code
        self._text = text.encode("utf-8")

    def render(self, request: Request) -> bytes:
        request.setResponseCode(self._code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self._code == 401:
            request.setHeader(b"www-authenticate", b'Basic realm="mailfw"')
        return self._text


def _authorised(request: Request, user: str, password: str) -> bool:
    header = request.getHeader(b"authorization") or b""
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        given = base64.b64decode(token, validate=True)
    except ValueError:
        return False
    expected = f"{user}:{password}".encode()
    return hmac.compare_digest(given, expected)


def _loopback(request: Request) -> bool:
    host = getattr(request.getClientAddress(), "host", "")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpsService(Service):
    """
    Observes the event stream (metrics, status board) while running and
    serves the endpoint.

    @ivar metrics: the counters.
    @ivar board: the status page's state.
    """

    log = Logger()
    name = "metrics"

    def __init__(
        self,
        settings: OpsSettings,
        reactor: Any,
        queue: IMessageQueue,
        scheduler: Any,
        publisher: LogPublisher = globalLogPublisher,
    ) -> None:
        self.settings = settings
        self._reactor = reactor
        self._publisher = publisher
        self.metrics = Metrics()
        self.board = StatusBoard(reactor.seconds)
        self.watch = QueueWatch(
            queue,
            reactor,
            settings.queueInterval,
            settings.topDomains,
            [self._setQueue],
        )
        children: dict[bytes, Resource] = {
            b"metrics": MetricsPage(self.metrics, self.watch),
            b"healthz": HealthCheck(queue, scheduler, reactor),
            b"status": StatusPage(self.board, self.watch.current),
            b"status.json": StatusJSON(self.board, self.watch.current),
            b"status.js": StatusScript(int(settings.refresh * 1000)),
        }
        self.site = _QuietSite(_Guard(settings, children, {b"status", b"status.json", b"status.js"}))
        self.site.displayTracebacks = False
        self.site.noisy = False
        self._observers: tuple[ILogObserver, ...] = (self.metrics, self.board)
        self._port: IListeningPort | None = None
        self._endpoint = None
        if settings.listen is not None:
            try:
                self._endpoint = serverFromString(reactor, settings.listen)
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"[metrics] listen = {settings.listen!r}: {e}") from None

    def _setQueue(self, snapshot: QueueSnapshot) -> None:
        self.metrics.queue = snapshot
        self.board.queue = snapshot

    def startService(self) -> None:
        Service.startService(self)
        # Started before the listeners: observes from the first connection.
        for observer in self._observers:
            self._publisher.addObserver(observer)
        endpoint = self._endpoint
        if endpoint is None:
            return

        def listening(port: IListeningPort) -> None:
            self._port = port
            self.log.info("mailfw metrics and status on {endpoint}", endpoint=self.settings.listen)

        def failed(f: Failure) -> None:
            self.log.failure("cannot serve the metrics on {endpoint}", f, endpoint=self.settings.listen)

        endpoint.listen(self.site).addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        for observer in self._observers:
            self._publisher.removeObserver(observer)
        port, self._port = self._port, None
        if port is None:
            return None
        return port.stopListening()
