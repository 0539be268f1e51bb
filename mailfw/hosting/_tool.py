"""
C{mailfw domain|user|alias|sender}: edit the hosting table that
C{[routing] virtual} of the configuration (C{-c}/C{-d}) names.

  - C{mailfw domain add|delete DOMAIN}, C{mailfw domain list}
  - C{mailfw user add ADDRESS [--agent NAME] [--path PATH]
    [--messages-per-hour N] [--messages-per-day N] [--password]}: add a
    mailbox (or replace its settings); with C{--password}, also set its
    AUTH password through C{mailfw passwd add} (the C{[auth] passwords}
    file), prompted for on a terminal or read as one line from standard
    input.
  - C{mailfw user delete ADDRESS [--password]} (C{--password} also removes
    the AUTH user), C{mailfw user list [DOMAIN]}
  - C{mailfw alias add ALIAS TARGET...} (C{ALIAS} is C{local@domain}, or
    C{@domain} for the catch-all), C{mailfw alias delete ALIAS [TARGET]},
    C{mailfw alias list [DOMAIN]}
  - C{mailfw sender allow|deny USER ADDRESS} (C{ADDRESS} may be
    C{@domain}), C{mailfw sender list [USER]}

The commands work on the database directly, so the server need not run,
and the running server sees each change at its next lookup.  Every failure
is one line on standard error and exit status 1.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailfw.config import ConfigError, loadConfig
from mailfw.hosting._sql import SQLHostingTable, runSynchronously, tableFromText
from mailfw.hosting._values import HostingError, Mailbox, addressKey

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["addHostingParsers", "hostingCommand"]

_T = TypeVar("_T")


def _now(d: Deferred[_T]) -> _T:
    """
    The result of a L{Deferred} that has already fired (the command runs
    the table synchronously), raising its failure.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


def _databaseErrors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


def openTable(args: argparse.Namespace) -> SQLHostingTable:
    """
    The table of the configuration's C{[routing] virtual}.

    @raise HostingError: if the configuration has none.
    @raise ConfigError: if the configuration or the table is wrong.
    """
    config = loadConfig(args.config, dataDir=args.data_dir)
    virtual = config.routing.get("virtual")
    if not isinstance(virtual, str):
        where = args.config or "the embedded default configuration"
        raise HostingError(f'{where} has no [routing] virtual table (virtual = "sqlite:PATH")')
    dataDir = Path(config.dataDir)
    try:
        # As the server does at start-up: the table may be the first thing
        # put there.
        dataDir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HostingError(f"cannot create the data directory {dataDir}: {e.strerror}") from None
    return tableFromText(virtual, dataDir, runSynchronously, "[routing] virtual")


def hostingCommand(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """
    Run one C{domain}, C{user}, C{alias} or C{sender} action; returns the
    exit status.
    """
    try:
        table = openTable(args)
        try:
            return int(args.action_run(table, args, sys.stdin if stdin is None else stdin))
        finally:
            table.close()
    except (HostingError, ConfigError) as e:
        print(f"mailfw: {e}", file=sys.stderr)
    except _databaseErrors() as e:
        print(f"mailfw: the hosting table failed: {e}", file=sys.stderr)
    return 1


# -- domains ------------------------------------------------------------------


def _domainAdd(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    added = _now(table.addDomain(args.domain))
    print(f"{'added' if added else 'already hosted:'} {args.domain}")
    return 0


def _domainDelete(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    if not _now(table.deleteDomain(args.domain)):
        raise HostingError(f"domain {args.domain} is not hosted")
    print(f"deleted {args.domain}")
    return 0


def _domainList(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    for domain in _now(table.listDomains()):
        print(domain)
    return 0


# -- users ----------------------------------------------------------------------


def _passwd(args: argparse.Namespace, action: str, user: str, stdin: TextIO) -> int:
    """
    Run C{mailfw passwd ACTION USER} on the configuration's password file:
    the one place that hashes and writes passwords.
    """
    from mailfw.auth._passwd import DEFAULT_LOG_N
    from mailfw.auth._scram import DEFAULT_ITERATIONS
    from mailfw.auth._tool import passwdCommand

    config = loadConfig(args.config, dataDir=args.data_dir)
    if not config.auth.get("passwords"):
        raise HostingError("--password needs an [auth] passwords file in the configuration")
    namespace = argparse.Namespace(
        action=action,
        user=user,
        file=None,
        config=args.config,
        data_dir=args.data_dir,
        sender=None,
        etrn=None,
        cost=getattr(args, "cost", DEFAULT_LOG_N),
        scram_iterations=getattr(args, "scram_iterations", DEFAULT_ITERATIONS),
    )
    return passwdCommand(namespace, stdin)


def _userAdd(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    if args.agent is not None:
        configured = loadConfig(args.config, dataDir=args.data_dir).delivery
        if args.agent not in configured:
            raise HostingError(
                f"--agent {args.agent}: the configuration has no [delivery.{args.agent}] "
                f"(configured: {', '.join(sorted(configured)) or 'none'})"
            )
    mailbox = Mailbox(args.address, args.agent, args.path, args.messages_per_hour, args.messages_per_day)
    new = _now(table.addMailbox(mailbox))
    print(f"{'added' if new else 'updated'} mailbox {args.address}")
    if args.password:
        key = _now(table.mailbox(_parse(args.address)))
        assert key is not None
        return _passwd(args, "add", key.address, stdin)
    return 0


def _parse(text: str) -> Any:
    from mailfw.address import Address, AddressError

    try:
        return Address.parse(text, utf8=True)
    except AddressError as e:
        raise HostingError(f"bad address {text!r}: {e}") from None


def _userDelete(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    if not _now(table.deleteMailbox(args.address)):
        raise HostingError(f"no mailbox {args.address}")
    print(f"deleted mailbox {args.address}")
    if args.password:
        return _passwd(args, "delete", addressKey(args.address), stdin)
    return 0


def _optional(value: object) -> str:
    return "-" if value is None else str(value)


def _userList(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    for box in _now(table.listMailboxes(args.domain)):
        print(
            f"{box.address}\tagent={_optional(box.agent)}\tpath={_optional(box.path)}"
            f"\tper-hour={_optional(box.messagesPerHour)}\tper-day={_optional(box.messagesPerDay)}"
        )
    return 0


# -- aliases ----------------------------------------------------------------------


def _aliasAdd(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    added = _now(table.addAlias(args.alias, args.targets))
    print(f"{args.alias}: {added} new target(s)")
    return 0


def _aliasDelete(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    removed = _now(table.deleteAlias(args.alias, args.target))
    if not removed:
        raise HostingError(f"no alias {args.alias}" + (f" to {args.target}" if args.target else ""))
    print(f"{args.alias}: removed {removed} target(s)")
    return 0


def _aliasList(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    for entry in _now(table.listAliases(args.domain)):
        print(f"{entry.address}\t{entry.target}")
    return 0


# -- sender rights ------------------------------------------------------------------


def _senderAllow(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    new = _now(table.allowSender(args.user, args.address))
    print(f"{args.user} {'may now' if new else 'already may'} send as {args.address}")
    return 0


def _senderDeny(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    if not _now(table.denySender(args.user, args.address)):
        raise HostingError(f"{args.user} had no right to send as {args.address}")
    print(f"{args.user} may no longer send as {args.address}")
    return 0


def _senderList(table: SQLHostingTable, args: argparse.Namespace, stdin: TextIO) -> int:
    for right in _now(table.listSenders(args.user)):
        print(f"{right.user}\t{right.address}")
    return 0


def addHostingParsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add C{domain}, C{user}, C{alias} and C{sender} with their actions to
    the C{mailfw} command's parser.
    """
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("-c", "--config", help="the server's configuration file (with [routing] virtual)")
    where.add_argument("-d", "--data-dir", help="the server's data directory")

    def group(name: str, helpText: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        parser = commands.add_parser(name, help=helpText)
        parser.set_defaults(run=hostingCommand)
        return parser.add_subparsers(dest="action", required=True)

    def action(
        actions: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        helpText: str,
        run: Callable[[SQLHostingTable, argparse.Namespace, TextIO], int],
    ) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=helpText, parents=[where])
        parser.set_defaults(action_run=run)
        return parser

    domains = group("domain", "manage the virtual domains")
    action(domains, "add", "host a domain", _domainAdd).add_argument("domain")
    action(domains, "delete", "stop hosting a domain (it must be empty)", _domainDelete).add_argument(
        "domain"
    )
    action(domains, "list", "list the hosted domains", _domainList)

    users = group("user", "manage the mailboxes of virtual domains")
    add = action(users, "add", "add a mailbox or change its settings", _userAdd)
    add.add_argument("address")
    add.add_argument(
        "--agent", help="the delivery instance for its mail (default: as the domain's other mail)"
    )
    add.add_argument("--path", help="the mailbox's path, for agents that use one per recipient")
    add.add_argument("--messages-per-hour", type=int, metavar="N", help="sending quota (stored for quotas)")
    add.add_argument("--messages-per-day", type=int, metavar="N", help="sending quota (stored for quotas)")
    add.add_argument("--password", action="store_true", help="also set its AUTH password ([auth] passwords)")
    delete = action(users, "delete", "remove a mailbox", _userDelete)
    delete.add_argument("address")
    delete.add_argument("--password", action="store_true", help="also remove its AUTH password")
    action(users, "list", "list mailboxes", _userList).add_argument("domain", nargs="?")

    aliases = group("alias", "manage the aliases of virtual domains")
    add = action(aliases, "add", "add targets to an alias (@domain: the catch-all)", _aliasAdd)
    add.add_argument("alias")
    add.add_argument("targets", nargs="+", metavar="TARGET")
    delete = action(aliases, "delete", "remove one target, or the whole alias", _aliasDelete)
    delete.add_argument("alias")
    delete.add_argument("target", nargs="?")
    action(aliases, "list", "list aliases", _aliasList).add_argument("domain", nargs="?")

    senders = group("sender", "manage who may send as which address")
    for name, helpText, run in (
        ("allow", "let USER send as ADDRESS (or @domain)", _senderAllow),
        ("deny", "withdraw that right", _senderDeny),
    ):
        parser = action(senders, name, helpText, run)
        parser.add_argument("user")
        parser.add_argument("address")
    action(senders, "list", "list sender rights", _senderList).add_argument("user", nargs="?")
