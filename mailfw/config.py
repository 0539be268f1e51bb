"""
The configuration file: TOML in, validated components out.

Each component section names its plugin (C{plugin = "maildir"}); the plugin
validates the rest of the section itself, with L{Section}, so that every
mistake is reported at start-up as one line naming the section and key.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ComponentContext",
    "ConfigError",
    "Section",
    "ServerConfig",
    "loadConfig",
]

LISTENER_KINDS = ("smtp", "submission", "submissions", "odmr")

# The embedded default: unprivileged loopback ports, nothing else needed.
DEFAULT_LISTEN = {
    "smtp": ["tcp:2525:interface=127.0.0.1"],
    "submission": ["tcp:2587:interface=127.0.0.1"],
    "submissions": [],
    "odmr": [],
}
DEFAULT_DATA_DIR = "mailfw-data"
# [server] workers = "auto": a process per core (see mailfw._workers.autoWorkers).
AUTO_WORKERS = "auto"


class ConfigError(Exception):
    """
    The configuration is invalid.  The message names the section and key
    and is shown to the operator as one line.

    @ivar released: when raised while building the server, fires once the
        components built before the error are closed again (else C{None}).
    """

    released: Any = None


_T = TypeVar("_T")
_MISSING: Any = object()


class Section:
    """
    Strict access to one configuration section: typed getters that name the
    section in their errors, and L{finish} to refuse unknown keys (a typo
    must not be silently ignored).

    @ivar title: how errors name the section, e.g. C{"[delivery.local]"}.
    """

    def __init__(self, title: str, options: Mapping[str, object]) -> None:
        self.title = title
        self._options = dict(options)
        self._used: set[str] = {"plugin"}

    def _get(self, key: str, default: object, kinds: tuple[type, ...], what: str) -> Any:
        self._used.add(key)
        if key not in self._options:
            if default is _MISSING:
                raise ConfigError(f"{self.title} needs {key!r}")
            return default
        value = self._options[key]
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.title} {key}: expected {what}, got {value!r}")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.title} {key}: expected {what}, got {value!r}")
        return value

    def has(self, key: str) -> bool:
        return key in self._options

    def text(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, (str,), "a string")

    def integer(self, key: str, default: Any = _MISSING, minimum: int | None = None) -> Any:
        value = self._get(key, default, (int,), "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise ConfigError(f"{self.title} {key}: must be at least {minimum}")
        return value

    def number(self, key: str, default: Any = _MISSING, minimum: float | None = None) -> Any:
        value = self._get(key, default, (int, float), "a number")
        if value is not None and minimum is not None and value < minimum:
            raise ConfigError(f"{self.title} {key}: must be at least {minimum}")
        return None if value is None else float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default, (list, tuple, str), "a list of strings")
        if isinstance(value, str):
            value = [value]
        if value is not None and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.title} {key}: expected a list of strings")
        return None if value is None else list(value)

    def table(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default, (dict,), "a table")
        return None if value is None else dict(value)

    def choice(self, key: str, choices: Sequence[str], default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is not None and value not in choices:
            raise ConfigError(f"{self.title} {key}: must be one of {', '.join(choices)}")
        return value

    def finish(self) -> None:
        """
        Refuse keys that no getter asked for.
        """
        unknown = sorted(set(self._options) - self._used)
        if unknown:
            raise ConfigError(f"{self.title}: unknown option {', '.join(map(repr, unknown))}")


@dataclass
class ComponentContext:
    """
    What every component factory may use besides its own section.

    @ivar reactor: the reactor (the only way components reach it).
    @ivar dataDir: relative paths in the configuration are relative to it.
    @ivar agentNames: the configured delivery instance names, so a router
        can check the names it refers to.
    @ivar nameservers: C{(host, port)} pairs from C{[dns]}, or empty for the
        system resolver.
    @ivar dnssec: C{[dns] dnssec}: C{"trust-ad"} to trust the AD bit of
        the C{nameservers} (a local validating resolver), for DANE; else
        C{"off"}.
    @ivar queue: the server's L{mailfw.interfaces.IMessageQueue}, for
        components that put new mail into it (alias expansion); set before
        delivery agents and routers are built, C{None} while the queue
        itself is being built.
    """

    reactor: Any
    hostname: str
    dataDir: Path
    agentNames: frozenset[str] = frozenset()
    nameservers: tuple[tuple[str, int], ...] = ()
    queue: Any = None
    dnssec: str = "off"
    cacheAnswers: Callable[[Any], Any] | None = field(default=None, repr=False)
    """Wraps the shared twisted.names client in an answer cache (the server
    passes L{mailfw._dnscache.CachingResolver}); without it every question
    goes to the name server."""
    _resolver: Any = field(default=None, repr=False)

    def path(self, value: str) -> Path:
        """
        Resolve a configured path against the data directory.
        """
        return self.dataDir / value

    def resolver(self) -> Any:
        """
        The shared L{twisted.names} resolver, built on first use.
        """
        if self._resolver is None:
            from twisted.names import client

            if self.nameservers:
                resolver = client.Resolver(servers=list(self.nameservers), reactor=self.reactor)
            else:
                resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=self.reactor)
            self._resolver = resolver if self.cacheAnswers is None else self.cacheAnswers(resolver)
        return self._resolver


@dataclass
class ServerConfig:
    """
    The whole configuration, read and checked but not yet built into
    components (that is L{mailfw.tap.buildService}'s job).

    @ivar components: C{{kind: {instanceName: options}}} for the plugin
        sections: C{queue}, C{routing}, C{delivery}, C{policy}.
    @ivar auth: the C{[auth]} section as written; L{mailfw.auth} checks it
        when the server is built.
    """

    hostname: str
    dataDir: Path
    listen: dict[str, list[str]]
    workers: int | str = 1
    certificate: Path | None = None
    privateKey: Path | None = None
    nameservers: tuple[tuple[str, int], ...] = ()
    dnssec: str = "off"
    queue: dict[str, object] = field(default_factory=dict)
    routing: dict[str, object] = field(default_factory=dict)
    delivery: dict[str, dict[str, object]] = field(default_factory=dict)
    policy: dict[str, dict[str, object]] = field(default_factory=dict)
    smtp: dict[str, object] = field(default_factory=dict)
    scheduler: dict[str, object] = field(default_factory=dict)
    auth: dict[str, object] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    shutdownGrace: float = 30.0

    def context(self, reactor: Any, cacheAnswers: Callable[[Any], Any] | None = None) -> ComponentContext:
        return ComponentContext(
            reactor=reactor,
            hostname=self.hostname,
            dataDir=self.dataDir,
            agentNames=frozenset(self.delivery),
            nameservers=self.nameservers,
            dnssec=self.dnssec,
            cacheAnswers=cacheAnswers,
        )


def _defaultComponents(dataDir: Path) -> dict[str, Any]:
    return {
        "queue": {"plugin": "sqlite", "path": "queue.sqlite"},
        "routing": {"plugin": "static", "local_domains": ["localhost"]},
        "delivery": {"local": {"plugin": "maildir", "path": "mail/{domain}/{localpart}"}},
    }


_KNOWN_SECTIONS = {
    "server",
    "listen",
    "tls",
    "dns",
    "smtp",
    "queue",
    "routing",
    "delivery",
    "policy",
    "scheduler",
    "auth",
    "etrn",
    "odmr",
    "metrics",
}


def _nameserver(text: str) -> tuple[str, int]:
    """
    Parse one C{[dns] nameservers} entry: an IP address with an optional
    port (C{"192.0.2.1"}, C{"192.0.2.1:5353"}, C{"::1"}, C{"[::1]:5353"}).
    A bare IPv6 address has no port: write C{"[fd00::1]:5353"} for one.
    Host names are refused because the resolver needs addresses, and
    resolving a name server's name would need a resolver.

    @return: C{(address, port)}, the address in its canonical form.
    @raise ConfigError: naming the entry.
    """
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"[dns] nameservers: bad entry {text!r}")
        if rest:
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"[dns] nameservers: {text!r} is not an IP address (host names are not accepted)"
        ) from None
    if text.startswith("[") and address.version != 6:
        raise ConfigError(f"[dns] nameservers: brackets are for IPv6 addresses in {text!r}")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"[dns] nameservers: bad port in {text!r}")
    return str(address), int(port)


def loadConfig(
    path: str | None,
    hostname: str | None = None,
    dataDir: str | None = None,
    listen: Mapping[str, Iterable[str]] | None = None,
) -> ServerConfig:
    """
    Read the configuration file (or none, for the embedded default) and
    apply command-line overrides.

    @param listen: endpoint descriptions from the command line; a kind
        given there replaces that kind's C{[listen]} entries.
    @raise ConfigError: with a one-line reason naming the file or section.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(raw) - _KNOWN_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]")
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")

    server = Section("[server]", raw.get("server", {}))
    baseDir = Path(path).parent if path else Path.cwd()
    configuredDir = dataDir or server.text("data_dir", DEFAULT_DATA_DIR)
    resolvedDir = (baseDir / configuredDir) if dataDir is None else Path(configuredDir)
    name = hostname or server.text("hostname", None) or socket.gethostname()
    # A file of one's own runs a process per core by default; the
    # embedded default (no file) stays a single process for a first try.
    workers: int | str
    if not server.has("workers"):
        workers = 1 if path is None else AUTO_WORKERS
    elif isinstance(raw["server"]["workers"], str):
        workers = server.text("workers")
        if workers != AUTO_WORKERS:
            raise ConfigError(f'[server] workers: expected an integer or "{AUTO_WORKERS}"')
    else:
        workers = server.integer("workers", minimum=1)
    shutdownGrace = server.number("shutdown_grace", 30.0, minimum=0)
    server.finish()

    listenSection = Section("[listen]", raw.get("listen", {}))
    listeners: dict[str, list[str]] = {}
    configured = any(k in raw.get("listen", {}) for k in LISTENER_KINDS)
    for kind in LISTENER_KINDS:
        listeners[kind] = listenSection.strings(kind, [] if configured or path else DEFAULT_LISTEN[kind])
    listenSection.finish()
    if listen:
        for kind, descriptions in listen.items():
            descriptions = list(descriptions)
            if descriptions:
                listeners[kind] = descriptions

    tls = Section("[tls]", raw.get("tls", {}))
    certificate = tls.text("certificate", None)
    key = tls.text("key", None)
    tls.finish()
    if (certificate is None) != (key is None):
        raise ConfigError("[tls] needs both 'certificate' and 'key'")

    dns = Section("[dns]", raw.get("dns", {}))
    nameservers = tuple(_nameserver(s) for s in dns.strings("nameservers", []))
    dnssec = dns.choice("dnssec", ("off", "trust-ad"), "off")
    dns.finish()
    if dnssec == "trust-ad" and not nameservers:
        raise ConfigError(
            '[dns] dnssec = "trust-ad" needs nameservers: the local validating resolver (e.g. ["127.0.0.1"])'
        )

    defaults = _defaultComponents(resolvedDir)
    hasComponents = any(k in raw for k in ("queue", "routing", "delivery"))
    queue = raw.get("queue", defaults["queue"] if not hasComponents else {"plugin": "sqlite"})
    routing = raw.get("routing", defaults["routing"] if not hasComponents else {"plugin": "static"})
    delivery = raw.get("delivery", defaults["delivery"] if not hasComponents else {})
    for instance, section in delivery.items():
        if not isinstance(section, dict):
            raise ConfigError(f"[delivery.{instance}] must be a table")
    policy = raw.get("policy", {})
    for instance, section in policy.items():
        if not isinstance(section, dict):
            raise ConfigError(f"[policy.{instance}] must be a table")

    def relative(p: str | None) -> Path | None:
        return None if p is None else resolvedDir / p

    return ServerConfig(
        hostname=name,
        dataDir=resolvedDir,
        listen=listeners,
        workers=workers,
        certificate=relative(certificate),
        privateKey=relative(key),
        nameservers=nameservers,
        dnssec=dnssec,
        queue=dict(queue),
        routing=dict(routing),
        delivery={k: dict(v) for k, v in delivery.items()},
        policy={k: dict(v) for k, v in policy.items()},
        smtp=dict(raw.get("smtp", {})),
        scheduler=dict(raw.get("scheduler", {})),
        auth=dict(raw.get("auth", {})),
        raw=raw,
        shutdownGrace=shutdownGrace,
    )
