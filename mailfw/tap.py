"""
C{twistd mailfw}: command-line options and the service tree.

L{Options} only records and checks what the user typed; L{makeService} is
the only place that touches the global reactor, and hands it to
L{buildService}, which tests call with a L{MemoryReactorClock}.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from mailfw.admin._control import CONTROL_SOCKET, ControlFactory
from mailfw.config import (
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
    IMessageQueue,
    IMessageQueueFactory,
    INamedPlugin,
    IPolicy,
    IPolicyFactory,
    IRouter,
    IRouterFactory,
)
from mailfw.plugin import DuplicatePlugin, MissingPlugin, findPlugin

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

    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
        ["hostname", None, None, "Name announced in the greeting and Received: headers."],
        ["data-dir", "d", None, "Directory for the queue, mailboxes and TLS files."],
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


def _checkEndpoint(kind: str, description: str) -> None:
    """
    Parse an endpoint description once without a reactor, so that a typo is
    a usage error naming the option.  (An C{ssl:} endpoint also reads its
    key and certificate here.)
    """
    try:
        serverFromString(None, _withBacklog(description))
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise usage.UsageError(f"--{kind}={description}: {e}") from None


def _withBacklog(description: str) -> str:
    """
    Add L{DEFAULT_BACKLOG} to descriptions whose endpoint type takes one and
    that do not set it.
    """
    parts = description.split(":")
    kind = parts[1] if parts[0] == "haproxy" and len(parts) > 1 else parts[0]
    if kind in _BACKLOG_TYPES and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def makeService(options: Options) -> IService:
    """
    twistd calls this after installing the reactor the user chose.  A
    configuration error ends the process with one line naming the section.
    """
    from twisted.internet import reactor

    try:
        return buildService(options.serverConfig, reactor)
    except ConfigError as e:
        sys.stderr.write(f"mailfw: configuration error: {e}\n")
        raise SystemExit(1)


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


class _QueueCloser(Service):
    """
    Closes the queue after everything that uses it has stopped.
    """

    def __init__(self, queue: IMessageQueue) -> None:
        self.queue = queue

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.queue.close()


def buildService(config: ServerConfig, reactor: Any, plugins: Any = None) -> MultiService:
    """
    Build every configured component and the listeners around them.

    @param plugins: a list of plugin objects to use instead of the installed
        ones (tests).
    @raise ConfigError: naming the section that is wrong.
    """
    from mailfw.auth._config import authFromConfig
    from mailfw.etrn import ETRNHandler, settingsFromConfig
    from mailfw.queue._scheduler import schedulerFromConfig
    from mailfw.smtp import SMTPFactory, SMTPLimits
    from mailfw.tls import serverTLSOptions

    config.dataDir.mkdir(parents=True, exist_ok=True)
    context = config.context(reactor)

    queue: IMessageQueue = _build(
        IMessageQueueFactory, "[queue]", context, "queue", config.queue, plugins
    )
    try:
        agents: dict[str, IDeliveryAgent] = {
            name: _build(IDeliveryAgentFactory, f"[delivery.{name}]", context, name, section, plugins)
            for name, section in config.delivery.items()
        }
        router: IRouter = _build(IRouterFactory, "[routing]", context, "routing", config.routing, plugins)
        policies: list[IPolicy] = [
            _build(IPolicyFactory, f"[policy.{name}]", context, name, section, plugins)
            for name, section in config.policy.items()
        ]
        limits = SMTPLimits.fromSection(Section("[smtp]", config.smtp))
        tlsOptions = serverTLSOptions(config)
        authSetup = authFromConfig(Section("[auth]", config.auth), context)
        etrnSettings = settingsFromConfig(config.raw.get("etrn", {}))
        scheduler = schedulerFromConfig(
            Section("[scheduler]", config.scheduler),
            reactor,
            queue,
            router,
            agents,
            config.hostname,
            holdForETRN=etrnSettings.holds,
        )
    except BaseException:
        queue.close()
        raise

    etrn = ETRNHandler(etrnSettings, queue, reactor) if etrnSettings.enabled else None
    top = MultiService()
    closer = _QueueCloser(queue)
    closer.setName("queue-closer")
    closer.setServiceParent(top)
    scheduler.setServiceParent(top)
    if authSetup is not None:
        authSetup.service.setName("auth-threads")
        authSetup.service.setServiceParent(top)

    for kind in LISTENER_KINDS:
        if not config.listen[kind]:
            continue
        factory = SMTPFactory(
            kind,
            config.hostname,
            queue,
            router,
            reactor,
            policies=policies,
            limits=limits,
            tlsOptions=tlsOptions,
            auth=(
                authSetup.auth
                if authSetup is not None and (kind != "smtp" or authSetup.offerOnSMTP)
                else None
            ),
            etrn=etrn,
        )
        for description in config.listen[kind]:
            try:
                endpoint = serverFromString(reactor, _withBacklog(description))
            except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
                raise ConfigError(f"[listen] {kind} = {description!r}: {e}") from None
            service = StreamServerEndpointService(endpoint, factory)
            service.setName(f"{kind}:{description}")
            service.setServiceParent(top)
            log.info(
                "mailfw {kind} listener on {endpoint}", kind=kind, endpoint=description
            )
    controlPath = config.dataDir / CONTROL_SOCKET
    control = StreamServerEndpointService(
        serverFromString(
            reactor, f"unix:{quoteStringArgument(str(controlPath))}:mode=600:lockfile=1"
        ),
        ControlFactory(queue, reactor),
    )
    control.setName("control")
    control.setServiceParent(top)
    for name, agent in agents.items():
        log.info("delivery instance {agent}: {description}", agent=name, description=repr(agent))
    log.info(
        "mailfw {hostname}: data in {dataDir}, queue {queue}",
        hostname=config.hostname,
        dataDir=str(config.dataDir),
        queue=repr(queue),
    )
    return top


def checkComponents(config: ServerConfig, reactor: Any, plugins: Any = None) -> Deferred[None]:
    """
    Build every component of C{config} once, without listening or
    delivering, so that each plugin validates its section
    (C{mailfw config check}).  The data directory is replaced by a
    temporary one, so that checking creates nothing beside the file.

    @raise ConfigError: naming the section that is wrong.
    @return: fires when the components are closed again.
    """
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    scratch = Path(tempfile.mkdtemp(prefix="mailfw-check-"))
    try:
        service = buildService(dataclasses.replace(config, dataDir=scratch), reactor, plugins)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    closer = service.getServiceNamed("queue-closer")
    def cleanUp(result: object) -> object:
        shutil.rmtree(scratch, ignore_errors=True)
        return result

    d: Deferred[None] = closer.queue.close()
    d.addBoth(cleanUp)
    return d
