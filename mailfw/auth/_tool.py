"""
C{mailfw passwd}: manage the password file.

  - C{mailfw passwd add USER [--sender PATTERN]... [--etrn DOMAIN]...}
    sets USER's password (adding the user if new): its scrypt hash and its
    SCRAM-SHA-256 keys.  Sender patterns and ETRN domains replace the old
    ones when given and are kept otherwise.
  - C{mailfw passwd delete USER}
  - C{mailfw passwd list}: users with their senders, ETRN domains and
    whether they can use SCRAM.
  - C{mailfw passwd check USER}: exit status 0 if the password is right.

The file is C{--file PATH}, or the C{[auth] passwords} file of the
configuration (C{-c}/C{-d}).  The password is prompted for (twice) on a
terminal, and read as one line from standard input otherwise, so that
scripts can pipe it in.  A new file is created with mode 0600.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import TextIO

from mailfw.auth._passwd import (
    DEFAULT_LOG_N,
    PasswordEntry,
    PasswordFileError,
    formatEntry,
    hashPassword,
    normaliseETRNDomain,
    normaliseSenderPattern,
    parseLine,
    readPasswordFile,
    updatePasswordFile,
    validUsername,
    verifyPassword,
)
from mailfw.auth._scram import DEFAULT_ITERATIONS, MAX_ITERATIONS, MIN_ITERATIONS, ScramKeys
from mailfw.config import ConfigError, Section, loadConfig

__all__ = ["addPasswdParser", "passwdCommand", "readPassword"]


class PasswdError(Exception):
    """
    A failure to report as one line (exit status 1).
    """


def readPassword(stdin: TextIO, confirm: bool, prompt: str = "Password: ") -> str:
    """
    The password: prompted for on a terminal (twice with C{confirm}),
    else the first line of C{stdin} without its line ending.

    @raise PasswdError: if it is empty or the two entries differ.
    """
    if stdin.isatty():
        password = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != password:
            raise PasswdError("the passwords do not match")
    else:
        password = stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    if not password:
        raise PasswdError("empty password")
    return password


def passwordFile(args: argparse.Namespace) -> Path:
    """
    The file C{--file} names, or the configuration's C{[auth] passwords}.
    """
    if args.file:
        return Path(args.file)
    try:
        config = loadConfig(args.config, dataDir=args.data_dir)
    except ConfigError as e:
        raise PasswdError(str(e)) from None
    section = Section("[auth]", config.auth)
    name = section.text("passwords", None)
    if name is None:
        raise PasswdError("no --file given and the configuration has no [auth] passwords")
    return Path(config.dataDir) / str(name)


def _entries(path: Path) -> dict[str, PasswordEntry]:
    try:
        entries, problems = readPasswordFile(path)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise PasswdError(f"cannot read {path}: {e.strerror}") from None
    for problem in problems:
        print(f"mailfw: warning: {path}: {problem}", file=sys.stderr)
    return entries


def passwdCommand(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """
    Run one C{mailfw passwd} action; returns the exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    try:
        return _run(args, stdin)
    except PasswdError as e:
        print(f"mailfw: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, stdin: TextIO) -> int:
    path = passwordFile(args)
    if args.action == "list":
        for entry in sorted(_entries(path).values(), key=lambda e: e.user):
            print(
                f"{entry.user}\tsenders={','.join(entry.senders) or '(user name)'}"
                f"\tetrn={','.join(entry.etrn) or '-'}"
                f"\tscram={'yes' if entry.scram is not None else 'no'}"
            )
        return 0
    user = args.user
    if not validUsername(user):
        raise PasswdError(f"bad user name {user!r}: no ':', spaces or control characters")
    if args.action == "delete":
        try:
            found = updatePasswordFile(path, user, None)
        except OSError as e:
            raise PasswdError(f"cannot update {path}: {e.strerror}") from None
        if not found:
            raise PasswdError(f"no user {user!r} in {path}")
        print(f"deleted {user}")
        return 0
    if args.action == "check":
        known = _entries(path).get(user)
        password = readPassword(stdin, confirm=False)
        if known is None or not verifyPassword(known.hash, password.encode("utf-8")):
            print("wrong password or no such user", file=sys.stderr)
            return 1
        print("ok")
        return 0
    try:
        senders = tuple(normaliseSenderPattern(s) for s in args.sender or ())
        etrn = tuple(normaliseETRNDomain(d) for d in args.etrn or ())
    except PasswordFileError as e:
        raise PasswdError(str(e)) from None
    old = _entries(path).get(user)
    if old is not None:
        senders = senders if args.sender is not None else old.senders
        etrn = etrn if args.etrn is not None else old.etrn
    password = readPassword(stdin, confirm=True)
    try:
        scram: ScramKeys | None = ScramKeys.fromPassword(password, iterations=args.scram_iterations)
    except ValueError as e:
        # No SCRAM client could send this password either (RFC 4013).
        print(f"mailfw: warning: no SCRAM keys for {user}: the password {e}", file=sys.stderr)
        scram = None
    entry = PasswordEntry(user, hashPassword(password, logN=args.cost), senders, etrn, scram)
    if parseLine(formatEntry(entry)) != entry:  # the line must read back
        raise PasswdError(f"internal error: the line for {user!r} does not read back")
    try:
        updatePasswordFile(path, user, entry)
    except OSError as e:
        raise PasswdError(f"cannot update {path}: {e.strerror}") from None
    print(f"{'updated' if old is not None else 'added'} {user} in {path}")
    return 0


def _iterations(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not MIN_ITERATIONS <= count <= MAX_ITERATIONS:
        raise argparse.ArgumentTypeError(f"must be a number from {MIN_ITERATIONS} to {MAX_ITERATIONS}")
    return count


def addPasswdParser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add C{passwd} and its actions to the C{mailfw} command's parser.
    """
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--file", "-f", help="the password file (default: [auth] passwords)")
    where.add_argument("-c", "--config", help="the server's configuration file")
    where.add_argument("-d", "--data-dir", help="the server's data directory")
    passwd = commands.add_parser("passwd", help="manage the AUTH password file")
    actions = passwd.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user or set a password", parents=[where])
    add.add_argument("user")
    add.add_argument(
        "--sender",
        action="append",
        metavar="PATTERN",
        help="an allowed MAIL FROM: address, @domain or *; repeatable",
    )
    add.add_argument("--etrn", action="append", metavar="DOMAIN", help="a domain it may ETRN; repeatable")
    add.add_argument(
        "--cost",
        type=int,
        default=DEFAULT_LOG_N,
        choices=range(14, 21),
        metavar="LOG2N",
        help=f"scrypt cost as log2(N), 14 to 20 (default {DEFAULT_LOG_N})",
    )
    add.add_argument(
        "--scram-iterations",
        type=_iterations,
        default=DEFAULT_ITERATIONS,
        metavar="COUNT",
        help=f"SCRAM-SHA-256 iteration count, {MIN_ITERATIONS} to {MAX_ITERATIONS} (default {DEFAULT_ITERATIONS})",
    )
    delete = actions.add_parser("delete", help="remove a user", parents=[where])
    delete.add_argument("user")
    actions.add_parser("list", help="list the users", parents=[where])
    check = actions.add_parser("check", help="check a user's password", parents=[where])
    check.add_argument("user")
    passwd.set_defaults(run=passwdCommand)
