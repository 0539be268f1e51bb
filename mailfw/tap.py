"""
C{twistd mailfw}: command-line options and the service tree.

L{Options} only records and checks what the user typed; L{makeService} is
the only place that touches the global reactor, and hands it to
L{buildService}, which tests call with a
L{twisted.internet.testing.MemoryReactorClock}.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from mailfw._workers import (
    AdoptedPortService,
    InheritedSocket,
    RecordingEndpoint,
    WorkerPool,
    autoWorkers,
    endpointType,
    logsToStandardOutput,
)
from mailfw.admin._control import CONTROL_SOCKET, ControlFactory
from mailfw.config import (
    AUTO_WORKERS,
    LISTENER_KINDS,
    ComponentContext,
    ConfigError,
    Section,
    ServerConfig,
    loadConfig,
)
from mailfw.interfaces import (
    IDeliveryAgent,
    IDeliveryAgentFactory,
    IDescribed,
    IMessageQueue,
    IMessageQueueFactory,
    INamedPlugin,
    IPolicyFactory,
    IRouter,
    IRouterFactory,
)
from mailfw.plugin import DuplicatePlugin, MissingPlugin, findPlugin

if TYPE_CHECKING:
    from mailfw.policy._chain import ChainLink

__all__ = ["Options", "buildService", "makeService"]

log = Logger()

# Twisted listens with a backlog of 50, which makes a burst of 100 clients
# wait for SYN retransmits (ARCHITECTURE.md measured 301 instead of 3,297
# messages/s); endpoints that take a backlog get this one unless told.
DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


class Options(usage.Options):
    """
    Options for C{twistd mailfw}.  Listening options take Twisted endpoint
    descriptions and may be repeated: C{--smtp=tcp:25 --smtp=tcp6:25}.
    Given on the command line, they replace the configuration's
    C{[listen]} entries of the same kind.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the mailfw mail server.  With no --config, runs the embedded "
        "default: SMTP on 127.0.0.1:2525 and submission on 127.0.0.1:2587, "
        "delivering mail for localhost into ./mailfw-data/mail."
    )

    optParameters = [  # noqa: RUF012 (usage.Options reads class attributes)
        ["config", "c", None, "Path to the TOML configuration file."],
        ["hostname", None, None, "Name announced in the greeting and Received: headers."],
        ["data-dir", "d", None, "Directory for the queue, mailboxes and TLS files."],
        [
            "workers",
            None,
            None,
            "Processes serving the listeners and the queue, or 'auto' (one "
            "per core; default: [server] workers, which defaults to auto with a "
            "configuration file and to 1 without).  More than one needs tcp:, "
            "tcp6: or ssl: listeners.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for kind in LISTENER_KINDS:
            self[kind] = []

    def opt_smtp(self, description: str) -> None:
        """
        Listen for SMTP (the MX, port 25) on this endpoint, e.g. tcp:25.
        """
        self["smtp"].append(description)

    def opt_submission(self, description: str) -> None:
        """
        Listen for message submission (STARTTLS, then AUTH; port 587).
        """
        self["submission"].append(description)

    def opt_submissions(self, description: str) -> None:
        """
        Listen for submission over implicit TLS (port 465), an ssl: endpoint.
        """
        self["submissions"].append(description)

    def opt_odmr(self, description: str) -> None:
        """
        Listen for On-Demand Mail Relay (RFC 2645: STARTTLS, AUTH, ATRN;
        port 366).
        """
        self["odmr"].append(description)

    def postOptions(self) -> None:
        try:
            self.serverConfig = loadConfig(
                self["config"],
                hostname=self["hostname"],
                dataDir=self["data-dir"],
                listen={kind: self[kind] for kind in LISTENER_KINDS},
            )
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for kind, descriptions in self.serverConfig.listen.items():
            for description in descriptions:
                _checkEndpoint(kind, description)
        if not any(self.serverConfig.listen.values()):
            raise usage.UsageError("nothing to listen on: give --smtp or [listen]")
        self["workers"] = self._workerCount(
            self.serverConfig.workers if self["workers"] is None else self["workers"]
        )
        if self["workers"] > 1:
            from mailfw._workers import WORKER_TYPES

            for kind, descriptions in self.serverConfig.listen.items():
                for description in descriptions:
                    if endpointType(description) not in WORKER_TYPES or description.startswith("haproxy:"):
                        raise usage.UsageError(
                            f"--workers={self['workers']} needs tcp:, tcp6: or ssl: listeners,"
                            f" not {kind} {description!r}"
                        )
        self.workerArguments = self._workerArguments()
        # twistd's options, when twistd runs us.
        self.workersLogDirectly = logsToStandardOutput(getattr(self, "parent", None))

    def _workerCount(self, given: object) -> int:
        """
        The number of processes: C{given} (from C{--workers} or the file) as
        an integer, or C{"auto"} resolved by L{autoWorkers}.
        """
        if given == AUTO_WORKERS:
            return autoWorkers(
                self.serverConfig.listen, self.serverConfig.queue.get("plugin"), os.cpu_count()
            )
        try:
            count = int(str(given))
        except (TypeError, ValueError):
            raise usage.UsageError(
                f'--workers must be an integer or "{AUTO_WORKERS}", not {given!r}'
            ) from None
        if count < 1:
            raise usage.UsageError("--workers must be at least 1")
        return count

    def _workerArguments(self) -> list[str]:
        """
        The options that give a worker process the same configuration:
        paths made absolute now, before twistd changes directory.
        """
        arguments: list[str] = []
        if self["config"] is not None:
            arguments.append(f"--config={os.path.abspath(self['config'])}")
        if self["hostname"] is not None:
            arguments.append(f"--hostname={self['hostname']}")
        if self["data-dir"] is not None:
            arguments.append(f"--data-dir={os.path.abspath(self['data-dir'])}")
        for kind in LISTENER_KINDS:
            arguments.extend(f"--{kind}={description}" for description in self[kind])
        return arguments


# What serverFromString raises for a bad description: a missing argument
# (TypeError), an unknown address family in systemd:domain= (AttributeError).
_ENDPOINT_ERRORS = (ValueError, OSError, IndexError, KeyError, TypeError, AttributeError)


def _checkEndpoint(kind: str, description: str) -> None:
    """
    Parse an endpoint description once without a reactor, so that a typo is
    a usage error naming the option.  (An C{ssl:} endpoint also reads its
    key and certificate here.)
    """
    try:
        _serverEndpoint(None, description)
    except _ENDPOINT_ERRORS as e:
        raise usage.UsageError(f"--{kind}={description}: {e}") from None


def _serverEndpoint(reactor: Any, description: str) -> Any:
    """
    L{serverFromString} with L{DEFAULT_BACKLOG}, and a clear reason when a
    C{systemd:} endpoint names a socket this process did not inherit
    (Twisted says only "list index out of range").

    @raise ValueError: and the other L{_ENDPOINT_ERRORS}.
    """
    try:
        return serverFromString(reactor, _withBacklog(description))
    except (IndexError, KeyError):
        if endpointType(description) != "systemd":
            raise
        raise ValueError(
            "needs systemd socket activation (no such socket was passed to this process)"
        ) from None


def _checkListener(kind: str, description: str) -> None:
    """
    Check one C{[listen]} entry without listening, for
    L{checkComponents}.  A C{systemd:} entry is checked only as far as
    possible outside systemd: the address family and C{index}/C{name}
    parameters, not whether systemd passes that socket.

    @raise ConfigError: naming the entry.
    """
    try:
        _serverEndpoint(None, description)
    except ValueError as e:
        if endpointType(description) != "systemd" or "socket activation" not in str(e):
            raise ConfigError(f"[listen] {kind} = {description!r}: {e}") from None
        for part in description.split(":"):
            key, _, value = part.partition("=")
            if key == "domain" and not hasattr(socket, f"AF_{value}"):
                raise ConfigError(
                    f"[listen] {kind} = {description!r}: unknown address family {value!r}"
                ) from None
    except _ENDPOINT_ERRORS as e:
        raise ConfigError(f"[listen] {kind} = {description!r}: {e}") from None


def _withBacklog(description: str) -> str:
    """
    Add L{DEFAULT_BACKLOG} to descriptions whose endpoint type takes one and
    that do not set it.
    """
    if endpointType(description) in _BACKLOG_TYPES and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def _answerCache(reactor: Any) -> Callable[[Any], Any]:
    """
    What puts the shared resolver behind the server's answer cache
    (L{mailfw._dnscache}), imported only when a component asks for DNS.
    """

    def wrap(resolver: Any) -> Any:
        from mailfw._dnscache import CachingResolver

        return CachingResolver(resolver, reactor)

    return wrap


def makeService(options: Options) -> IService:
    """
    twistd calls this after installing the reactor the user chose.  A
    configuration error ends the process with one line naming the section.
    """
    from twisted.internet import reactor

    try:
        return buildService(
            options.serverConfig,
            reactor,
            owner=_targetOwner(options),
            workers=options["workers"],
            workerArguments=options.workerArguments,
            workersLogDirectly=options.workersLogDirectly,
            reloadArguments=options.workerArguments,
        )
    except ConfigError as e:
        sys.stderr.write(f"mailfw: configuration error: {e}\n")
        raise SystemExit(1) from None


def _build(
    interface: type[INamedPlugin],
    title: str,
    context: ComponentContext,
    instanceName: str,
    options: Mapping[str, object],
    plugins: Any = None,
) -> Any:
    """
    Find the plugin a section names and let it build its component.
    """
    pluginName = options.get("plugin")
    if not isinstance(pluginName, str):
        raise ConfigError(f"{title} needs a 'plugin' name")
    try:
        factory = findPlugin(interface, pluginName, plugins)
    except (MissingPlugin, DuplicatePlugin) as e:
        raise ConfigError(f"{title}: {e}") from None
    return factory.fromConfig(context, instanceName, options)


class MailfwService(MultiService):
    """
    The whole server: every service that uses the queue is a child, and the
    queue is closed only after all of them have stopped (the scheduler
    waits for deliveries in flight to be recorded, listeners for commits).

    @ivar afterClose: called, in order, once the queue is closed (the last
        spans are exported then, when every span has ended).
    """

    def __init__(self, queue: IMessageQueue) -> None:
        super().__init__()
        self.queue = queue
        self.afterClose: list[Callable[[], object]] = []

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = maybeDeferred(super().stopService)

        def close(result: object) -> Deferred[None]:
            return self.queue.close()

        d.addBoth(close)

        def then(result: object, call: Callable[[], object]) -> Deferred[object]:
            # A failure to close stays the result.
            return maybeDeferred(call).addBoth(lambda _: result)

        for call in self.afterClose:
            d.addBoth(then, call)
        return d


def _targetOwner(options: usage.Options) -> tuple[int, int] | None:
    """
    The user and group C{twistd --uid/--gid} will switch to after
    L{makeService}, or C{None} when it keeps the current ones.

    twistd builds the service, and calls C{privilegedStartService} (the
    control socket), as the user that started it; only then does it
    switch.  Its options are the parent of ours.

    @return: C{(uid, gid)}, -1 for one that does not change.  As twistd
        does, C{--uid} without C{--gid} means that user's primary group.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None and gid is None:
        return None
    if gid is None:
        import pwd

        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
    return (-1 if uid is None else int(uid), int(gid))


def _chown(path: Path, uid: int, gid: int, follow: bool) -> None:
    """
    Give C{path} to C{uid}/C{gid} unless it already belongs to them.

    @param follow: whether a symbolic link is followed (only for the data
        directory, which the operator names; inside it, a link is changed
        itself, never what it points to).
    @raise FileNotFoundError: if C{path} does not exist.
    """
    status = os.stat(path, follow_symlinks=follow)
    if (uid == -1 or status.st_uid == uid) and (gid == -1 or status.st_gid == gid):
        return
    os.chown(path, uid, gid, follow_symlinks=follow)


class _Ownership(Service):
    """
    Hands what start-up created to the user C{twistd --uid/--gid} switches
    to: the data directory, the SQLite queue's files and the control
    socket, all created while twistd still runs as root.  It must be the
    last child of the service tree, so that it runs after the control
    socket is bound in C{privilegedStartService}.

    @ivar paths: C{(path, follow)} pairs; see L{_chown}.
    """

    log = Logger()

    def __init__(
        self,
        owner: tuple[int, int],
        paths: list[tuple[Path, bool]],
        chown: Callable[[Path, int, int, bool], None] = _chown,
    ) -> None:
        self.owner = owner
        self.paths = paths
        self._chown = chown

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        uid, gid = self.owner
        for path, follow in self.paths:
            try:
                self._chown(path, uid, gid, follow)
            except FileNotFoundError:
                continue
            except OSError as e:
                self.log.warn(
                    "cannot give {path} to uid {uid} gid {gid}: {reason}",
                    path=str(path),
                    uid=uid,
                    gid=gid,
                    reason=e.strerror,
                )


class ListeningService(Service):
    """
    Listens on an endpoint while running.  A port that cannot be bound
    stops twistd at start-up (as C{twisted.application.strports} does),
    rather than leaving a server running that receives no mail; a listen
    that fails later is logged.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self._listening: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failedNow: list[Failure] = []
        starting = True

        def failed(f: Failure) -> None:
            if starting:
                failedNow.append(f)
            elif not f.check(CancelledError):
                self.log.failure("listening on {name} failed", f, name=self.name)

        self._listening = self.endpoint.listen(self.factory)
        self._listening.addErrback(failed)
        starting = False
        if failedNow:
            failedNow[0].raiseException()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return succeed(None)
        listening.cancel()

        def stop(port: Any) -> Any:
            return port.stopListening() if port is not None else None

        return listening.addCallback(stop)


def _ownedPaths(dataDir: Path, components: Iterable[object], controlPath: Path) -> list[tuple[Path, bool]]:
    """
    What L{_Ownership} hands over: the data directory, the paths each
    component names (L{IDescribed.ownedPaths}) with the directories above
    them inside the data directory, and the control socket with its lock.
    """
    dataDir = Path(os.path.normpath(dataDir))
    paths: list[tuple[Path, bool]] = [(dataDir, True)]
    for component in components:
        if not IDescribed.providedBy(component):
            continue
        for owned in IDescribed(component).ownedPaths():
            path = Path(os.path.normpath(owned))
            # Directories only inside the data directory: one elsewhere is
            # the operator's to prepare.
            inside = [d for d in path.parents if d != dataDir and dataDir in d.parents]
            for directory in reversed(inside):
                if (directory, False) not in paths:
                    paths.append((directory, False))
            paths.append((path, False))
    paths.append((controlPath, False))
    paths.append((controlPath.with_name(controlPath.name + ".lock"), False))
    return paths


def _describe(component: object, plugin: object) -> str:
    """
    A component for the start-up log: its own description, or its plugin's
    name.
    """
    if IDescribed.providedBy(component):
        return IDescribed(component).describe()
    return f"plugin {plugin}"


@dataclass
class _Components:
    """
    What L{buildService} builds from the configuration around the queue,
    the scheduler and the listeners: what a reload builds anew and swaps in
    (L{Lifecycle.reload}).
    """

    agents: dict[str, IDeliveryAgent]
    router: IRouter
    policies: list[ChainLink]
    limits: Any
    tlsOptions: Any
    authSetup: Any
    etrnSettings: Any
    odmrSettings: Any

    def holdForETRN(self, address: Any) -> bool:
        return bool(self.etrnSettings.holds(address) or self.odmrSettings.holds(address))


def _buildComponents(config: ServerConfig, context: ComponentContext, plugins: Any = None) -> _Components:
    """
    Build the delivery instances, the router, the policies, the SMTP
    limits, the TLS options, AUTH and the ETRN and ODMR settings of
    C{config}, in C{context} (whose queue is set).  At start-up and on
    every reload alike.

    @raise ConfigError: naming the section that is wrong.
    """
    from mailfw.etrn import settingsFromConfig
    from mailfw.policy._chain import linkFromSection
    from mailfw.smtp import SMTPLimits
    from mailfw.smtp._odmr import settingsFromConfig as odmrFromConfig
    from mailfw.tls import serverTLSOptions

    agents: dict[str, IDeliveryAgent] = {
        name: _build(IDeliveryAgentFactory, f"[delivery.{name}]", context, name, section, plugins)
        for name, section in config.delivery.items()
    }
    router: IRouter = _build(IRouterFactory, "[routing]", context, "routing", config.routing, plugins)
    policies = [
        linkFromSection(
            f"[policy.{name}]",
            section,
            lambda options, name=name: _build(  # type: ignore[misc]
                IPolicyFactory, f"[policy.{name}]", context, name, options, plugins
            ),
        )
        for name, section in config.policy.items()
    ]
    limits = SMTPLimits.fromSection(Section("[smtp]", config.smtp))
    tlsOptions = serverTLSOptions(config)
    authSetup = None
    if config.auth:
        # Only with [auth]: the password file, SCRAM and Dovecot code is
        # not imported otherwise (an empty section builds no AUTH either).
        from mailfw.auth._config import authFromConfig
        from mailfw.auth._quota import useHostedQuotas
        from mailfw.auth._realm import useHostedSenders

        authSetup = authFromConfig(Section("[auth]", config.auth), context)
        if authSetup is not None:
            useHostedSenders(authSetup.auth.portal, router)
            if authSetup.quotas is not None:
                useHostedQuotas(authSetup.quotas, router)
    etrnSettings = settingsFromConfig(config.raw.get("etrn", {}))
    odmrSettings = odmrFromConfig(config.raw.get("odmr", {}))
    return _Components(agents, router, policies, limits, tlsOptions, authSetup, etrnSettings, odmrSettings)


def _restartOnly(running: ServerConfig, new: ServerConfig) -> list[str]:
    """
    The sections whose changes a reload does not apply: they are bound when
    the server starts (listening sockets, the queue's store, the data
    directory, the worker processes, the scheduler's own timers).
    """
    changed = []
    if running.listen != new.listen:
        changed.append("[listen]")
    if running.queue != new.queue:
        changed.append("[queue]")
    server = ("hostname", "dataDir", "workers", "shutdownGrace")
    if any(getattr(running, key) != getattr(new, key) for key in server):
        changed.append("[server]")
    if running.scheduler != new.scheduler:
        changed.append("[scheduler]")
    return changed


class Lifecycle(Service):
    """
    Reload (C{SIGHUP}) and graceful stop (C{SIGTERM}) of the server; see
    C{docs/operations.rst}.

    B{Reload}: L{reload} reads the configuration again, builds every
    component a reload applies with the same code as start-up
    (L{_buildComponents}), and only when all of them built, swaps them in:
    each listener's factory gets new L{SessionSettings} (sessions already
    connected keep theirs, so none is dropped), the scheduler the new
    router and delivery instances.  A bad file changes nothing.

    B{Stop}: L{stopService} runs beside the listeners' (which stop
    accepting at once) and the scheduler's: it asks every open session to
    close with 421 once its transaction is over
    (L{SMTPServerProtocol.stopWhenIdle}), and cuts off those still open
    after C{[server] shutdown_grace} seconds.  The queue is closed only
    after that (L{MailfwService}).

    @ivar factories: the listeners' protocol factories by kind.
    @ivar workers: the L{WorkerPool}, in a parent with workers.
    @ivar control: the control socket's factory (its sending quotas).
    """

    log = Logger()
    name = "lifecycle"
    pollInterval = 0.1

    def __init__(
        self,
        reactor: Any,
        config: ServerConfig,
        queue: IMessageQueue,
        scheduler: Any,
        components: _Components,
        reloadArguments: Sequence[str] | None = None,
        plugins: Any = None,
    ) -> None:
        self._reactor = reactor
        self.config = config
        self.queue = queue
        self.scheduler = scheduler
        self.components = components
        self._reloadArguments = None if reloadArguments is None else list(reloadArguments)
        self._plugins = plugins
        self.factories: dict[str, Any] = {}
        self.workers: WorkerPool | None = None
        self.control: Any = None
        self._retired: list[tuple[IService, list[Any]]] = []
        self._retireLater: Any = None
        self._previousHandler: Any = None
        self._handling = False

    # --- the listeners' factories ---------------------------------------------

    def listenerFactory(self, kind: str, components: _Components) -> Any:
        """
        A new protocol factory for listeners of C{kind} with C{components};
        a reload keeps the old factory and takes its C{settings}.
        """
        from mailfw.etrn import ETRNHandler
        from mailfw.smtp import SMTPFactory
        from mailfw.smtp._odmr import ODMRHandler

        config, queue, reactor, scheduler = self.config, self.queue, self._reactor, self.scheduler
        authSetup = components.authSetup
        etrn = (
            ETRNHandler(components.etrnSettings, queue, reactor) if components.etrnSettings.enabled else None
        )
        odmr = (
            ODMRHandler(
                components.odmrSettings,
                queue,
                scheduler.settle,
                reactor,
                config.hostname,
                scheduler.leaseSeconds,
            )
            if components.odmrSettings.enabled
            else None
        )
        return SMTPFactory(
            kind,
            config.hostname,
            queue,
            components.router,
            reactor,
            policies=[
                link for link in components.policies if link.listeners is None or kind in link.listeners
            ],
            limits=components.limits,
            tlsOptions=components.tlsOptions,
            auth=(
                authSetup.auth
                if authSetup is not None and (kind != "smtp" or authSetup.offerOnSMTP)
                else None
            ),
            etrn=etrn,
            quotas=authSetup.quotas if authSetup is not None else None,
            odmr=odmr,
        )

    # --- reload -----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._reloadArguments is not None and hasattr(signal, "SIGHUP"):
            self._previousHandler = signal.signal(signal.SIGHUP, self._hangUpReceived)
            self._handling = True

    def _hangUpReceived(self, number: int, frame: Any) -> None:
        # A signal handler runs between two bytecodes of whatever the
        # reactor was doing: do the work in the reactor's own time.
        self._reactor.callFromThread(self.reloadFromFile)

    def reloadFromFile(self) -> None:
        """
        C{SIGHUP}: read the configuration as at start-up (the same file and
        command-line options) and L{reload} it; pass the signal on to the
        workers, which reload themselves.
        """
        from twisted.python import usage

        path = self._configPath()
        try:
            options = Options()
            options.parseOptions(self._reloadArguments or [])
            config = options.serverConfig
        except Exception as e:
            reason = str(e) if isinstance(e, usage.UsageError) else f"{type(e).__name__}: {e}"
            self.log.error(
                "configuration reload from {path} failed, keeping the running configuration: {reason}",
                path=path,
                reason=reason,
            )
        else:
            self.reload(config, path)
        if self.workers is not None:
            self.workers.signalWorkers("HUP")

    def _configPath(self) -> str:
        for argument in self._reloadArguments or []:
            if argument.startswith("--config="):
                return argument.partition("=")[2]
        return "(no file)"

    def reload(self, config: ServerConfig, path: str = "(no file)") -> bool:
        """
        Apply C{config}: build its components and swap them in, or, if any
        of them cannot be built, log one line saying why and change
        nothing.

        @return: whether C{config} was applied.
        """
        restart = _restartOnly(self.config, config)
        # What needs a restart stays as it runs.
        config = replace(
            config,
            hostname=self.config.hostname,
            dataDir=self.config.dataDir,
            listen=self.config.listen,
            queue=self.config.queue,
            workers=self.config.workers,
            shutdownGrace=self.config.shutdownGrace,
            scheduler=self.config.scheduler,
        )
        context = config.context(self._reactor, _answerCache(self._reactor))
        context.queue = self.queue
        try:
            components = _buildComponents(config, context, self._plugins)
        except Exception as e:
            reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            self.log.error(
                "configuration reload from {path} failed, keeping the running configuration: {reason}",
                path=path,
                reason=reason,
            )
            return False
        self._swap(config, components)
        self.log.info(
            "configuration reloaded from {path}{restart}",
            path=path,
            restart=f"; not applied until a restart: {', '.join(restart)}" if restart else "",
        )
        return True

    def _swap(self, config: ServerConfig, components: _Components) -> None:
        """
        Put C{components} in service; see the class docstring.
        """
        old = self.components
        self.config, self.components = config, components
        openSessions: list[Any] = []
        for kind, factory in self.factories.items():
            openSessions.extend(getattr(factory, "sessions", ()))
            fresh = self.listenerFactory(kind, components)
            factory.settings = fresh.settings
            factory.odmr = fresh.odmr
        self.scheduler.useRouting(components.router, components.agents, components.holdForETRN)
        if self.control is not None:
            self.control.quotas = components.authSetup.quotas if components.authSetup is not None else None
        parent = self.parent
        if old.authSetup is not None:
            # Sessions connected before the reload may still ask the old
            # password checker: its threads stop once they are all gone.
            self._retired.append((old.authSetup.service, openSessions))
        if components.authSetup is not None and parent is not None:
            components.authSetup.service.setServiceParent(parent)
        self._retire()

    def _retire(self) -> None:
        """
        Stop the replaced services that no session uses any more; look
        again in a minute for the others.
        """
        still = []
        for service, sessions in self._retired:
            if any(not session.state.closed for session in sessions):
                still.append((service, sessions))
            elif service.parent is not None:
                service.disownServiceParent()
        self._retired = still
        if still and self.running and self._retireLater is None:
            self._retireLater = self._reactor.callLater(60, self._retireAgain)

    def _retireAgain(self) -> None:
        self._retireLater = None
        self._retire()

    # --- stop ---------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """
        Let the open sessions finish their transactions, for at most
        C{[server] shutdown_grace} seconds.
        """
        super().stopService()
        if self._retireLater is not None and self._retireLater.active():
            self._retireLater.cancel()
        self._retireLater = None
        if self._handling:
            signal.signal(signal.SIGHUP, self._previousHandler or signal.SIG_DFL)
            self._handling = False
        sessions = [s for factory in self.factories.values() for s in getattr(factory, "sessions", ())]
        if not sessions:
            return succeed(None)
        grace = self.config.shutdownGrace
        self.log.info(
            "stopping: waiting up to {grace:g}s for {count} sessions to finish their transactions",
            grace=grace,
            count=len(sessions),
        )
        for session in sessions:
            session.stopWhenIdle()
        done: Deferred[None] = Deferred()
        deadline = self._reactor.seconds() + grace

        def poll() -> None:
            left = [s for s in sessions if not s.state.closed]
            if not left:
                done.callback(None)
                return
            if self._reactor.seconds() < deadline:
                self._reactor.callLater(self.pollInterval, poll)
                return
            self.log.warn("{count} sessions still open after the grace period: closing them", count=len(left))
            for session in left:
                session.state.hangUp()
                if session.transport is not None:
                    session.transport.abortConnection()
            done.callback(None)

        poll()
        return done


def buildService(
    config: ServerConfig,
    reactor: Any,
    plugins: Any = None,
    owner: tuple[int, int] | None = None,
    workers: int = 1,
    workerArguments: Sequence[str] = (),
    worker: Sequence[InheritedSocket] | None = None,
    workersLogDirectly: bool = False,
    reloadArguments: Sequence[str] | None = None,
) -> MailfwService:
    """
    Build every configured component and the listeners around them.

    @param plugins: a list of plugin objects to use instead of the installed
        ones (tests).
    @param owner: C{(uid, gid)} that C{twistd --uid/--gid} will switch to
        (see L{_targetOwner}): what start-up creates is handed to them.
    @param workers: with more than 1, the service also starts C{workers - 1}
        worker processes sharing the listeners (see L{mailfw._workers}),
        with C{workerArguments} as their C{mailfw} options; with
        C{workersLogDirectly} they write their log lines to the standard
        output they share with this process.
    @param worker: in a worker process, the sockets it inherited: they are
        adopted instead of listening, and there is no control socket.
    @param reloadArguments: the C{mailfw} options to read the configuration
        again with on C{SIGHUP} (see L{Lifecycle}); without them (tests,
        embedding) no signal handler is installed.
    @raise ConfigError: naming the section that is wrong.
    """
    from mailfw.scheduling._scheduler import schedulerFromConfig

    config.dataDir.mkdir(parents=True, exist_ok=True)
    exportLastSpans = _startTracing(reactor)
    context = config.context(reactor, _answerCache(reactor))

    queue: IMessageQueue = _build(IMessageQueueFactory, "[queue]", context, "queue", config.queue, plugins)
    context.queue = queue
    try:
        components = _buildComponents(config, context, plugins)
        agents, router, authSetup = components.agents, components.router, components.authSetup
        scheduler = schedulerFromConfig(
            Section("[scheduler]", config.scheduler),
            reactor,
            queue,
            router,
            agents,
            config.hostname,
            holdForETRN=components.holdForETRN,
            resolver=context.resolver,
        )
        lease = queue.leaseSeconds
        if lease is not None and scheduler.leaseSeconds >= lease:
            # Otherwise a slow delivery's lease expires under it and the
            # recipients are claimed and delivered a second time.
            raise ConfigError(
                f"[scheduler] delivery_timeout ({scheduler.leaseSeconds:g}) must be shorter"
                f" than [queue] lease_seconds ({lease:g})"
            )
        # [metrics]: the operations endpoint, in the parent process only
        # (workers forward their events to it); see mailfw.ops.
        ops = None
        if worker is None and "metrics" in config.raw:
            from mailfw.ops import OpsService, OpsSettings

            ops = OpsService(OpsSettings.fromSection(config.raw["metrics"]), reactor, queue, scheduler)
    except BaseException as e:
        closing = queue.close()
        closing.addErrback(lambda f: log.failure("closing the queue failed", f))
        if isinstance(e, ConfigError):
            e.released = closing
        raise

    top = MailfwService(queue)
    if exportLastSpans is not None:
        top.afterClose.append(exportLastSpans)
    scheduler.setServiceParent(top)
    if ops is not None:
        ops.setServiceParent(top)
    if authSetup is not None:
        authSetup.service.setName("auth-threads")
        authSetup.service.setServiceParent(top)

    lifecycle = Lifecycle(reactor, config, queue, scheduler, components, reloadArguments, plugins)
    lifecycle.setServiceParent(top)
    recording: list[RecordingEndpoint] = []
    for kind in LISTENER_KINDS:
        if not config.listen[kind]:
            continue
        factory = lifecycle.factories[kind] = lifecycle.listenerFactory(kind, components)
        if worker is not None:
            for inherited in worker:
                if inherited.kind == kind:
                    _adopt(reactor, config, inherited, factory).setServiceParent(top)
            continue
        for index, description in enumerate(config.listen[kind]):
            try:
                endpoint = _serverEndpoint(reactor, description)
            except _ENDPOINT_ERRORS as e:
                raise ConfigError(f"[listen] {kind} = {description!r}: {e}") from None
            if workers > 1:
                endpoint = RecordingEndpoint(endpoint, kind, index)
                recording.append(endpoint)
            service = ListeningService(endpoint, factory)
            service.setName(f"{kind}:{description}")
            service.setServiceParent(top)
            log.info("mailfw {kind} listener on {endpoint}", kind=kind, endpoint=description)
    if worker is not None:
        return top
    if workers > 1:
        pool = WorkerPool(reactor, workers - 1, recording, workerArguments, logDirectly=workersLogDirectly)
        # Each worker has the grace period for its own sessions.
        pool.stopTimeout = config.shutdownGrace + WorkerPool.stopTimeout
        pool.setName("workers")
        pool.setServiceParent(top)
        lifecycle.workers = pool
    controlPath = config.dataDir / CONTROL_SOCKET
    # A second server on the same data directory must not start: the
    # control socket's lock file stops it.
    lifecycle.control = ControlFactory(
        queue, reactor, quotas=authSetup.quotas if authSetup is not None else None
    )
    control = ListeningService(
        serverFromString(reactor, f"unix:{quoteStringArgument(str(controlPath))}:mode=600:lockfile=1"),
        lifecycle.control,
    )
    control.setName("control")
    control.setServiceParent(top)
    if owner is not None:
        ownership = _Ownership(
            owner, _ownedPaths(config.dataDir, [queue, router, *agents.values()], controlPath)
        )
        ownership.setName("ownership")
        ownership.setServiceParent(top)
    for name, section in config.delivery.items():
        log.info(
            "delivery instance {agent}: {description}",
            agent=name,
            plugin=section.get("plugin"),
            description=_describe(agents[name], section.get("plugin")),
        )
    log.info("routing: {description}", description=_describe(router, config.routing.get("plugin")))
    log.info(
        "mailfw {hostname}: data in {dataDir}, queue {queue}",
        hostname=config.hostname,
        dataDir=str(config.dataDir.absolute()),
        queue=_describe(queue, config.queue.get("plugin")),
    )
    return top


def _startTracing(reactor: Any) -> Callable[[], Deferred[None]] | None:
    """
    Turn tracing on if the C{OTEL_*} environment asks for it (see
    L{mailfw.tracing}).

    @return: what exports the last spans when the server has stopped (the
        exporter may wait for its collector, so that runs in a thread), or
        C{None} when tracing is off.
    @raise ConfigError: if traces are asked for but cannot be made.
    """
    from twisted.internet.interfaces import IReactorThreads
    from twisted.internet.threads import deferToThreadPool

    from mailfw import tracing

    try:
        if not tracing.configureFromEnvironment():
            return None
    except tracing.TracingUnavailable as e:
        raise ConfigError(f"tracing: {e}") from None
    log.info("tracing: spans exported as OTEL_TRACES_EXPORTER says")

    def exportLastSpans() -> Deferred[None]:
        if IReactorThreads.providedBy(reactor):
            d: Deferred[None] = deferToThreadPool(reactor, reactor.getThreadPool(), tracing.shutdown)
        else:
            d = maybeDeferred(tracing.shutdown)
        return d.addErrback(lambda f: log.failure("exporting the last spans failed", f))

    return exportLastSpans


def _adopt(
    reactor: Any, config: ServerConfig, inherited: InheritedSocket, factory: Any
) -> AdoptedPortService:
    """
    A worker's service for one inherited socket: an C{ssl:} listener's
    connections are wrapped in TLS as C{listenSSL} wraps them, with the
    certificate its description names.

    @raise ConfigError: if the socket matches no configured listener.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    descriptions = config.listen.get(inherited.kind, [])
    if not 0 <= inherited.index < len(descriptions):
        raise ConfigError(f"inherited socket {inherited.encode()} matches no [listen] entry")
    description = descriptions[inherited.index]
    if endpointType(description) == "ssl":
        endpoint = _serverEndpoint(None, description)
        factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
    service = AdoptedPortService(reactor, inherited, factory)
    service.setName(f"{inherited.kind}:{description}")
    return service


def checkComponents(config: ServerConfig, reactor: Any, plugins: Any = None) -> Deferred[None]:
    """
    Build every component of C{config} once, without listening or
    delivering, so that each plugin validates its section
    (C{mailfw config check}).  The data directory is replaced by a
    temporary one, so that checking creates nothing beside the file.

    Listeners are not built: each C{[listen]} entry is parsed on its own
    instead.  A C{systemd:} entry names a socket that only systemd passes
    to the server, so outside systemd it is checked for syntax only.

    @raise ConfigError: for a bad C{[listen]} entry.
    @return: fires when the components are closed again, or fails with
        L{ConfigError} naming the component section that is wrong (once
        what was built before it is released).
    """
    import dataclasses
    import shutil
    import tempfile

    for kind, descriptions in config.listen.items():
        for description in descriptions:
            _checkListener(kind, description)
    scratch = Path(tempfile.mkdtemp(prefix="mailfw-check-"))
    try:
        service = buildService(
            dataclasses.replace(config, dataDir=scratch, listen={kind: [] for kind in config.listen}),
            reactor,
            plugins,
        )
    except ConfigError as e:
        # Remove the scratch directory only once what was built before the
        # error (the queue's threads and files) is released.
        error = e
        released = e.released if e.released is not None else succeed(None)

        def failed(_: object) -> Failure:
            shutil.rmtree(scratch, ignore_errors=True)
            return Failure(error)

        return released.addBoth(failed)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise

    def cleanUp(result: object) -> object:
        shutil.rmtree(scratch, ignore_errors=True)
        return result

    d: Deferred[None] = service.queue.close()
    d.addBoth(cleanUp)
    return d
