"""
The C{mailfw} command: operator tools for a mailfw server.

C{mailfw queue ...} talks to the running server over its control socket
(C{DATA_DIR/control.sock}); C{mailfw config check} reads a configuration
without starting anything; C{mailfw passwd} manages the AUTH password file;
C{mailfw domain|user|alias|sender} edit the virtual domains' hosting table;
C{mailfw user quota USER} shows a user's sending-quota counters (from the
running server); C{mailfw dkim keygen|check} makes DKIM keys and checks
their DNS records.
"""

from __future__ import annotations

import argparse
import json
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
