"""
The C{mailfw} command: operator tools for a mailfw server.

C{mailfw queue ...} talks to the running server over its control socket
(C{DATA_DIR/control.sock}); C{mailfw config check} reads a configuration
without starting anything; C{mailfw passwd} manages the AUTH password file;
C{mailfw domain|user|alias|sender} edit the virtual domains' hosting table;
C{mailfw user quota USER} shows a user's sending-quota counters (from the
running server); C{mailfw route DOMAIN} shows where relayed mail for a
domain goes and with which TLS, and why; C{mailfw log QUEUEID} prints one
message's history from the JSON log; C{mailfw dkim keygen|check} makes
DKIM keys and checks their DNS records.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailfw.admin._control import CONTROL_SOCKET
from mailfw.config import ConfigError, loadConfig

__all__ = ["main"]


class CommandError(Exception):
    """
    A failure to report as one line on stderr (exit status 1).
    """


def request(socketPath: Path, document: dict[str, Any], timeout: float = 30.0) -> Any:
    """
    Send one request to the server's control socket and return its result.

    @raise CommandError: if the server is not running or refuses.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(socketPath))
        except (FileNotFoundError, ConnectionRefusedError):
            raise CommandError(
                f"the mailfw server is not running (no control socket at {socketPath})"
            ) from None
        except PermissionError:
            raise CommandError(f"permission denied on {socketPath}") from None
        s.sendall(json.dumps(document).encode("utf-8") + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise CommandError("the server closed the control connection without answering") from None
    if not answer.get("ok"):
        raise CommandError(answer.get("error", "request refused"))
    return answer["result"]


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    selector: dict[str, Any] = {}
    if getattr(args, "ids", None):
        selector["queueIDs"] = list(args.ids)
    for key in ("domain", "sender", "state"):
        value = getattr(args, key, None)
        if value:
            selector[key] = value
    return selector


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def formatList(messages: Sequence[dict[str, Any]]) -> str:
    """
    The C{mailq}-like text form of C{queue list}.
    """
    if not messages:
        return "Mail queue is empty"
    lines = []
    for m in messages:
        lines.append(f"{m['queueID']:<20} {m['size']:>9} {_when(m['arrival'])}  <{m['sender']}>")
        for r in m["recipients"]:
            state = r["state"]
            if r.get("bounceRequested"):
                state = "bounce requested"
            elif state == "ready" and r["attempts"]:
                state = f"deferred, next {_when(r['nextAttempt'])}"
            lines.append(f"{'':20} <{r['address']}> ({state}, {r['attempts']} attempts)")
            if r["lastReply"]:
                lines.append(f"{'':24}{r['lastReply']}")
        lines.append("")
    count = sum(len(m["recipients"]) for m in messages)
    lines.append(f"-- {len(messages)} messages, {count} recipients")
    return "\n".join(lines)


def _socketPath(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        config = loadConfig(args.config, dataDir=args.data_dir)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    return config.dataDir / CONTROL_SOCKET


def queueCommand(args: argparse.Namespace) -> int:
    path = _socketPath(args)
    document: dict[str, Any] = {"command": args.action, "selector": _selector(args)}
    if args.action == "show":
        document["selector"] = {"queueIDs": [args.id]}
    result = request(path, document)
    if args.action == "list":
        print(json.dumps(result, indent=2) if args.json else formatList(result))
    elif args.action == "show":
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(formatList([result]))
            print()
            print(result.get("headers", "").rstrip("\r\n").replace("\r\n", "\n"))
    elif args.json:
        print(json.dumps({"action": args.action, "recipients": result}))
    else:
        print(f"{args.action}: {result} recipients")
    return 0


def formatQuota(user: str, usage: dict[str, dict[str, Any]]) -> str:
    """
    One line per limit with what was used and the limit, for example
    C{messages_per_hour 3/5}; a dash stands for no limit.
    """
    lines = [f"sending quota of {user}:"]
    for key, entry in usage.items():
        limit = "-" if entry["limit"] is None else str(entry["limit"])
        lines.append(f"  {key:<20} {entry['used']}/{limit}")
    return "\n".join(lines)


def quotaCommand(args: argparse.Namespace) -> int:
    """
    C{mailfw user quota USER}: used/limit per window, from the running
    server.
    """
    result = request(_socketPath(args), {"command": "quota", "user": args.user})
    print(json.dumps(result, indent=2) if args.json else formatQuota(args.user, result))
    return 0


def configCommand(args: argparse.Namespace) -> int:
    try:
        config = loadConfig(args.config)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    from twisted.internet.defer import succeed
    from twisted.internet.task import react

    from mailfw.tap import checkComponents

    problems: list[str] = []

    def check(reactor: Any) -> Any:
        def refused(failure: Any) -> None:
            failure.trap(ConfigError)
            problems.append(str(failure.value))

        try:
            return checkComponents(config, reactor).addErrback(refused)
        except ConfigError as e:
            problems.append(str(e))
            return succeed(None)

    try:
        react(check)
    except SystemExit as e:
        if e.code:
            raise CommandError("checking the components failed; see the messages above") from None
    if problems:
        raise CommandError(problems[0])
    print(f"{args.config or '(embedded default)'}: ok")
    return 0


def routeFor(config: Any, domain: str, agentName: str | None) -> tuple[str, str]:
    """
    The C{smtp-relay} instance and next hop for relayed mail to C{domain}:
    C{agentName}, else the static router's C{transport} entry or smart
    host, else the C{outbound} (or only) C{smtp-relay} instance and the
    domain itself.

    @raise CommandError: if no C{smtp-relay} instance fits.
    """
    from mailfw.routing._static import Transport, _lookupTransport

    relays = [name for name, section in config.delivery.items() if section.get("plugin") == "smtp-relay"]
    transport: Transport | None = None
    routing = config.routing
    if routing.get("plugin", "static") == "static":
        table = {str(k).lower(): str(v) for k, v in dict(routing.get("transport", {})).items()}
        entries = {}
        for key, value in table.items():
            agent, sep, hop = value.partition(":")
            entries[key] = Transport(agent, hop if sep else None)
        transport = _lookupTransport(entries, domain)
        smarthost = routing.get("smarthost")
        if transport is None and isinstance(smarthost, str):
            if not smarthost.startswith("[") and ":" in smarthost:
                agent, _, hop = smarthost.partition(":")
                transport = Transport(agent, hop)
            else:
                transport = Transport(str(routing.get("relay_agent", "outbound")), smarthost)
    name = agentName or (transport.agent if transport else None)
    if name is None:
        name = "outbound" if "outbound" in relays else (relays[0] if len(relays) == 1 else None)
    if name is None or name not in relays:
        known = ", ".join(relays) or "none"
        raise CommandError(
            f"no smtp-relay instance {name or ''} for {domain} (smtp-relay instances: {known})"
        )
    nexthop = transport.nexthop if transport and transport.agent == name and transport.nexthop else domain
    return name, nexthop


async def describeRoute(agent: Any, nexthop: str) -> dict[str, Any]:
    """
    Resolve C{nexthop} as the agent would and ask its TLS policy: the hosts
    in order with their addresses and TLS requirement, and why.
    """
    from mailfw.routing._nexthop import parseNexthop

    port = parseNexthop(nexthop).port or agent.port
    resolution = await agent.resolver.resolve(nexthop)
    result: dict[str, Any] = {"agent": agent.name, "nexthop": nexthop, "port": port, "hosts": []}
    if resolution.failure is not None:
        failure = resolution.failure
        result["failure"] = f"{failure.code} {failure.enhanced} {failure.text}"
        return result
    if agent.tlsPolicy is None:
        from mailfw.outbound._policy import TLSPolicy

        policy = TLSPolicy("table", f"{agent.options.tls} (the agent's tls setting)", agent.options.tls)
    else:
        policy = await agent.tlsPolicy.policyFor(nexthop, resolution.hosts, port)
    result["tls"] = {"source": policy.source, "why": policy.why}
    if policy.failure is not None:
        result["tls"]["failure"] = f"{policy.failure.code} {policy.failure.enhanced} {policy.failure.text}"
    for host in resolution.hosts:
        tls = policy.forHost(host.name)
        entry: dict[str, Any] = {
            "name": host.name,
            "address": host.address,
            "preference": host.preference,
            "tls": tls.level,
        }
        if tls.tlsa:
            entry["tlsa"] = [str(r) for r in tls.tlsa]
        if tls.refusal is not None:
            entry["refused"] = f"{tls.refusal.code} {tls.refusal.enhanced} {tls.refusal.text}"
        result["hosts"].append(entry)
    return result


def formatRoute(route: dict[str, Any]) -> str:
    """
    The text form of C{mailfw route}.
    """
    lines = [f"next hop {route['nexthop']} via smtp-relay instance {route['agent']!r}, port {route['port']}"]
    if "failure" in route:
        lines.append(f"no hosts: {route['failure']}")
        return "\n".join(lines)
    tls = route["tls"]
    lines.append(f"TLS policy: {tls['why']}")
    if "failure" in tls:
        lines.append(f"  nothing is sent: {tls['failure']}")
    lines.append("hosts, in order:")
    for host in route["hosts"]:
        lines.append(f"  {host['preference']:>5} {host['name']} [{host['address']}]  tls: {host['tls']}")
        for record in host.get("tlsa", []):
            lines.append(f"        TLSA {record}")
        if "refused" in host:
            lines.append(f"        not used: {host['refused']}")
    return "\n".join(lines)


def routeCommand(args: argparse.Namespace) -> int:
    """
    C{mailfw route DOMAIN}: MX hosts, addresses, TLS policy and why, looked
    up now the way the configured C{smtp-relay} agent would.
    """
    try:
        config = loadConfig(args.config, dataDir=args.data_dir)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    from mailfw.address import AddressError, normaliseDomain

    try:
        domain = normaliseDomain(args.domain.rstrip("."))
    except AddressError as e:
        raise CommandError(f"bad domain {args.domain!r}: {e}") from None
    name, nexthop = routeFor(config, domain, args.agent)
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from mailfw.delivery._relay import fromConfig

    found: list[dict[str, Any]] = []

    def run(reactor: Any) -> Deferred[None]:
        try:
            agent = fromConfig(config.context(reactor), name, config.delivery[name])
        except ConfigError as e:
            raise CommandError(str(e)) from None

        async def go() -> None:
            found.append(await describeRoute(agent, nexthop))

        return Deferred.fromCoroutine(go())

    try:
        react(run)
    except SystemExit as e:
        if e.code:
            raise CommandError("looking up the route failed; see the messages above") from None
    print(json.dumps(found[0], indent=2) if args.json else formatRoute(found[0]))
    return 0


def formatHistory(queueID: str, lines: Any) -> list[str]:
    """
    The events of the JSON log C{lines} about C{queueID}, one line each:
    time, event name, then the event's text (or, for events without a
    format, its fields).
    """
    from twisted.logger import formatEvent

    from mailfw.ops import readEvents

    history = []
    # Most lines are about other messages: skip them before parsing.
    for event in readEvents(line for line in lines if queueID in line):
        if event.get("queueID") != queueID or "event" not in event:
            continue
        when = event.get("log_time")
        stamp = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, int | float) else "-"
        )
        text = formatEvent(event) if event.get("log_format") else ""
        if not text:
            # An event without a format (or a worker's, relayed without one).
            text = " ".join(
                f"{k}={v}"
                for k, v in sorted(event.items())
                if not k.startswith("log_") and k not in ("event", "queueID", "worker", "workerLine")
            )
        worker = f" [worker {event['worker']}]" if event.get("worker") else ""
        history.append(f"{stamp} {event['event']}{worker}: {text}")
    return history


def logCommand(args: argparse.Namespace) -> int:
    path = args.log or os.environ.get("MAILFW_JSON_LOG") or "-"
    try:
        if path == "-":
            history = formatHistory(args.id, sys.stdin)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                history = formatHistory(args.id, f)
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    if not history:
        raise CommandError(f"no events about {args.id} in {'standard input' if path == '-' else path}")
    for line in history:
        print(line)
    return 0


def makeParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailfw", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("-c", "--config", help="the server's configuration file")
    where.add_argument("-d", "--data-dir", help="the server's data directory")
    where.add_argument("--socket", help="the control socket (default DATA_DIR/control.sock)")
    queue = commands.add_parser("queue", help="inspect and steer the running server's queue")
    actions = queue.add_subparsers(dest="action", required=True)
    for name, helpText in [
        ("list", "list queued messages (like mailq)"),
        ("flush", "attempt matching recipients now"),
        ("hold", "hold matching recipients"),
        ("release", "release held recipients"),
        ("delete", "delete matching recipients without notice"),
        ("bounce", "fail matching recipients now and return them to the sender with a DSN"),
    ]:
        action = actions.add_parser(name, help=helpText, parents=[where])
        action.add_argument("ids", nargs="*", metavar="QUEUE_ID")
        action.add_argument("--domain", help="recipient domain; @domain includes subdomains")
        action.add_argument("--sender", help="envelope sender address")
        action.add_argument("--state", choices=["ready", "leased", "hold", "etrn"])
        action.add_argument("--json", action="store_true", help="print JSON")
    show = actions.add_parser("show", help="show one message's envelope and headers", parents=[where])
    show.add_argument("id", metavar="QUEUE_ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    queue.set_defaults(run=queueCommand)

    config = commands.add_parser("config", help="configuration tools")
    configActions = config.add_subparsers(dest="action", required=True)
    check = configActions.add_parser("check", help="check a configuration file")
    check.add_argument("config", nargs="?", help="the file (default: the embedded default)")
    config.set_defaults(run=configCommand)

    route = commands.add_parser("route", help="show a domain's mail hosts and outbound TLS policy, and why")
    route.add_argument("domain", help="the recipient domain")
    route.add_argument("-c", "--config", help="the server's configuration file")
    route.add_argument("-d", "--data-dir", help="the server's data directory")
    route.add_argument("--agent", help="the smtp-relay instance (default: as the router would choose)")
    route.add_argument("--json", action="store_true", help="print JSON")
    route.set_defaults(run=routeCommand)

    from mailfw.auth._tool import addPasswdParser

    addPasswdParser(commands)

    from mailfw.admin._dkim import addDkimParser

    addDkimParser(commands)

    from mailfw.hosting._tool import addHostingParsers

    addHostingParsers(commands)
    # "mailfw user quota USER" asks the running server (its counters live in
    # the server's shared state), unlike the other "user" actions, which
    # edit the hosting table.
    userActions = next(
        a for a in commands.choices["user"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    quota = userActions.add_parser("quota", help="show a user's sending-quota counters", parents=[where])
    quota.add_argument("user", help="the AUTH user name")
    quota.add_argument("--json", action="store_true", help="print JSON")
    quota.set_defaults(run=quotaCommand)

    history = commands.add_parser(
        "log", help="print one message's history (received, attempts, replies, outcome) from the JSON log"
    )
    history.add_argument("id", metavar="QUEUE_ID")
    history.add_argument(
        "--log",
        help="the JSON log (twistd --logger=mailfw.ops.jsonLogger); default $MAILFW_JSON_LOG, else stdin",
    )
    history.set_defaults(run=logCommand)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the C{mailfw} command; returns the exit status.
    """
    args = makeParser().parse_args(argv)
    try:
        return int(args.run(args))
    except CommandError as e:
        print(f"mailfw: {e}", file=sys.stderr)
        return 1
