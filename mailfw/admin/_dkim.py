"""
C{mailfw dkim}: make DKIM signing keys and check their DNS records.

C{mailfw dkim keygen DOMAIN SELECTOR [--algorithm rsa|ed25519]} writes a
new private key (mode 0600, never over an existing file) and prints the
TXT record to publish at C{SELECTOR._domainkey.DOMAIN}; C{mailfw dkim
check DOMAIN SELECTOR} looks that record up (through the configuration's
C{[dns]} name servers, or C{--nameserver}) and says whether it publishes
the key's public half; the exit status is 0 only when it does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["addDkimParser", "checkRecord", "zoneLines"]


def zoneLines(name: str, record: str) -> str:
    """
    The record as a zone file line, its text split into strings of at most
    255 octets as TXT records need.
    """
    pieces = [record[i : i + 250] for i in range(0, len(record), 250)]
    quoted = " ".join(f'"{piece}"' for piece in pieces)
    return f"{name}. IN TXT ( {quoted} )"


def checkRecord(records: list[bytes], public: str, algorithm: bytes) -> tuple[bool, str]:
    """
    Whether C{records} (the TXT records found, each joined) publish the
    key C{public} (base64) for C{algorithm}.

    @return: the verdict and one line saying why.
    """
    from dkim.util import InvalidTagValueList, parse_tag_value

    if not records:
        return False, "no TXT record found"
    if len(records) > 1:
        return False, f"{len(records)} TXT records found; publish exactly one"
    try:
        tags = parse_tag_value(records[0])
    except InvalidTagValueList as e:
        return False, f"the record does not parse: {e!r}"
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return False, "the record's v= is not DKIM1"
    kind = tags.get(b"k", b"rsa")
    wanted = b"ed25519" if algorithm == b"ed25519-sha256" else b"rsa"
    if kind != wanted:
        return False, f"the record has k={kind.decode('ascii', 'replace')}, the key is {wanted.decode()}"
    published = b"".join(tags.get(b"p", b"").split()).decode("ascii", "replace")
    if not published:
        return False, "the record's key is empty (revoked)"
    if published != public:
        return False, "the record publishes a different key"
    return True, "the record matches the key"


def keygenCommand(args: argparse.Namespace) -> int:
    from mailfw.policy._dkimsign import generateKey

    output = Path(args.output or f"{args.domain}.{args.selector}.key")
    private, key = generateKey(args.algorithm, args.domain.lower(), args.selector)
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"mailfw: {output} exists; not overwriting a key", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mailfw: cannot write {output}: {e.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(output, 0o600)
    print(f"wrote the {args.algorithm} private key to {output} (mode 0600)")
    print("publish this TXT record:")
    print(zoneLines(f"{args.selector}._domainkey.{args.domain}", key.record))
    return 0


def _keyPath(args: argparse.Namespace) -> Path | None:
    """
    The key file: C{--key}, else the one the configuration's C{dkim-sign}
    policy uses for the domain and selector, else C{DOMAIN.SELECTOR.key}.
    """
    if args.key:
        return Path(args.key)
    if args.config:
        from mailfw.config import loadConfig

        config = loadConfig(args.config, dataDir=args.data_dir)
        for section in config.policy.values():
            if section.get("plugin") != "dkim-sign":
                continue
            domains = section.get("domains")
            options = domains.get(args.domain) if isinstance(domains, dict) else None
            if not isinstance(options, dict):
                continue
            entries = options.get("keys", [options])
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get("selector") == args.selector:
                    return config.dataDir / str(entry.get("key"))
    return Path(f"{args.domain}.{args.selector}.key")


def _nameservers(args: argparse.Namespace) -> tuple[tuple[str, int], ...]:
    from mailfw.config import _nameserver, loadConfig

    if args.nameserver:
        return tuple(_nameserver(text) for text in args.nameserver)
    if args.config:
        return loadConfig(args.config).nameservers
    return ()


def lookupTXT(name: str, nameservers: tuple[tuple[str, int], ...], timeout: float) -> list[bytes]:
    """
    The TXT records at C{name}, looked up with L{twisted.names} (blocking:
    this is a command, not the server).

    @raise LookupError: with a one-line reason when the lookup fails.
    """
    from twisted.internet.task import react
    from twisted.names import client, dns, error

    found: list[bytes] = []
    problem: list[str] = []

    def main(reactor: Any) -> Any:
        if nameservers:
            resolver = client.Resolver(servers=list(nameservers), reactor=reactor)
        else:
            resolver = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)

        def answered(answer: Any) -> None:
            for rr in answer[0]:
                if rr.type == dns.TXT:
                    found.append(b"".join(rr.payload.data))

        def failed(f: Any) -> None:
            if f.check(error.DNSNameError):
                return
            problem.append(f"the lookup of {name} failed: {f.getErrorMessage() or f.type.__name__}")

        return resolver.lookupText(name, timeout=(timeout,)).addCallbacks(answered, failed)

    try:
        react(main)
    except SystemExit as e:
        if e.code:
            raise LookupError(f"the lookup of {name} failed") from None
    if problem:
        raise LookupError(problem[0])
    return found


def checkCommand(args: argparse.Namespace) -> int:
    from mailfw.config import ConfigError
    from mailfw.policy._dkimsign import loadKey

    try:
        path = _keyPath(args)
        nameservers = _nameservers(args)
    except ConfigError as e:
        print(f"mailfw: {e}", file=sys.stderr)
        return 1
    assert path is not None
    try:
        key = loadKey(path.read_bytes(), args.domain.lower(), args.selector)
    except OSError as e:
        print(f"mailfw: cannot read the key {path}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"mailfw: {path}: {e}", file=sys.stderr)
        return 1
    name = f"{args.selector}._domainkey.{args.domain}"
    try:
        records = lookupTXT(name, nameservers, args.timeout)
    except LookupError as e:
        print(f"mailfw: {e}", file=sys.stderr)
        return 1
    ok, why = checkRecord(records, key.public, key.algorithm)
    print(f"{name}: {why}" + ("" if ok else f"\nexpected: {zoneLines(name, key.record)}"))
    return 0 if ok else 1


def addDkimParser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """
    Add C{mailfw dkim keygen|check}.
    """
    dkim = commands.add_parser("dkim", help="DKIM signing keys: make one, check its DNS record")
    actions = dkim.add_subparsers(dest="action", required=True)
    keygen = actions.add_parser("keygen", help="write a new private key and print its DNS record")
    keygen.add_argument("domain", help="the signing domain (d=)")
    keygen.add_argument("selector", help="the selector (s=)")
    keygen.add_argument(
        "--algorithm", choices=["rsa", "ed25519"], default="rsa", help="default rsa (2048 bits)"
    )
    keygen.add_argument("-o", "--output", help="the key file (default DOMAIN.SELECTOR.key)")
    keygen.set_defaults(run=keygenCommand)
    check = actions.add_parser("check", help="look the DNS record up and compare it with the key")
    check.add_argument("domain")
    check.add_argument("selector")
    check.add_argument(
        "--key", help="the private key file (default: from the configuration, or DOMAIN.SELECTOR.key)"
    )
    check.add_argument("-c", "--config", help="the server's configuration ([dns] and the dkim-sign keys)")
    check.add_argument("-d", "--data-dir", help="the server's data directory (key paths are relative to it)")
    check.add_argument(
        "--nameserver", action="append", help="ask this server (ADDRESS or ADDRESS:PORT); repeatable"
    )
    check.add_argument("--timeout", type=float, default=10.0, help="seconds for the lookup (default 10)")
    check.set_defaults(run=checkCommand)
