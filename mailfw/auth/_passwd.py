"""
The password file: salted scrypt hashes, one user per line.

Format (UTF-8 text; blank lines and lines starting with C{#} are ignored)::

    USER:HASH[:SENDERS[:ETRN[:SCRAM]]]

  - C{USER}: the name the client gives to AUTH; no C{:}, white space or
    control characters, at most 255 octets.
  - C{HASH}: C{$scrypt$ln=15,r=8,p=1$SALT$KEY}, the PHC string format:
    scrypt (RFC 7914) with cost C{N = 2**ln}, block size C{r} and
    parallelism C{p}; C{SALT} (16 random octets per user) and C{KEY} (32
    octets) in standard base64 without padding.
  - C{SENDERS}: comma-separated patterns for the MAIL FROM addresses the
    user may use: C{user@example.org}, C{@example.org} (any address in
    that domain) or C{*} (any address).  Empty: the user name itself, when
    it is an address.
  - C{ETRN}: comma-separated domains the user may flush with ETRN
    (C{example.org}, C{.example.org} for its subdomains, or C{*}).
  - C{SCRAM}: the user's SCRAM-SHA-256 keys,
    C{$scram-sha-256$i=ITERATIONS$SALT$STOREDKEY$SERVERKEY} (base64
    without padding; see L{mailfw.auth._scram.ScramKeys}).  They are
    derived from the password as the scrypt hash is, but SCRAM needs its
    own: the client proves it knows the password without sending it.  A
    line without them (every line written before SCRAM existed) offers
    PLAIN and LOGIN only.

scrypt is memory-hard (C{ln=15, r=8} needs 32 MiB and about 0.1 s per
check), so verifying runs in a thread, never on the reactor.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.auth._scram import ScramKeys

__all__ = [
    "PasswordEntry",
    "PasswordFileError",
    "formatEntry",
    "hashPassword",
    "normaliseETRNDomain",
    "normaliseSenderPattern",
    "parsePasswordFile",
    "readPasswordFile",
    "updatePasswordFile",
    "validUsername",
    "verifyPassword",
]

DEFAULT_LOG_N = 15
DEFAULT_R = 8
DEFAULT_P = 1
SALT_OCTETS = 16
KEY_OCTETS = 32
# Refuse parameters that would make one check allocate more than this.
MAX_MEMORY = 1024 * 1024 * 1024

_HASH = re.compile(
    r"\$scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\Z"
)
_USERNAME_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\x9f:]")


class PasswordFileError(ValueError):
    """
    A password file line or a hash is malformed; the message says which.
    """


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _maxmem(n: int, r: int, p: int) -> int:
    # scrypt needs 128 * r * (N + p) octets and a little more.
    return 128 * r * (n + p + 2) + 1024 * 1024


def hashPassword(
    password: str | bytes,
    logN: int = DEFAULT_LOG_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    salt: bytes | None = None,
) -> str:
    """
    Hash C{password} (text is encoded as UTF-8) with scrypt and a new
    random salt, as C{$scrypt$ln=...,r=...,p=...$SALT$KEY}.
    """
    secret = password.encode("utf-8") if isinstance(password, str) else password
    salt = secrets.token_bytes(SALT_OCTETS) if salt is None else salt
    n = 2**logN
    key = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_maxmem(n, r, p), dklen=KEY_OCTETS)
    return f"$scrypt$ln={logN},r={r},p={p}${_b64(salt)}${_b64(key)}"


@dataclass(frozen=True)
class _Parameters:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parseHash(encoded: str) -> _Parameters:
    m = _HASH.match(encoded)
    if m is None:
        raise PasswordFileError("not a $scrypt$ hash")
    logN, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= logN <= 30 and 1 <= r <= 255 and 1 <= p <= 255):
        raise PasswordFileError("scrypt parameters out of range")
    if 128 * r * 2**logN > MAX_MEMORY or r * p >= 2**30:
        raise PasswordFileError("scrypt parameters need too much memory")
    try:
        salt, key = _unb64(m.group(4)), _unb64(m.group(5))
    except (binascii.Error, ValueError):
        raise PasswordFileError("bad base64 in hash") from None
    if len(key) < 16 or len(salt) < 8:
        raise PasswordFileError("salt or key too short")
    return _Parameters(2**logN, r, p, salt, key)


def checkHash(encoded: str) -> None:
    """
    @raise PasswordFileError: if C{encoded} is not a usable scrypt hash.
    """
    _parseHash(encoded)


def verifyPassword(encoded: str, password: bytes) -> bool:
    """
    Whether C{password} matches the hash C{encoded}; compares in constant
    time.  Slow on purpose: call it in a thread.

    @raise PasswordFileError: if C{encoded} is malformed.
    """
    params = _parseHash(encoded)
    derived = hashlib.scrypt(
        password,
        salt=params.salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=_maxmem(params.n, params.r, params.p),
        dklen=len(params.key),
    )
    return hmac.compare_digest(derived, params.key)


_dummyHash: str | None = None


def burnTime(password: bytes) -> None:
    """
    Spend as long as checking a real password takes, so that the answer
    for an unknown user does not come back sooner than for a known one.
    """
    global _dummyHash
    if _dummyHash is None:
        _dummyHash = hashPassword(secrets.token_bytes(16))
    verifyPassword(_dummyHash, password)


def validUsername(name: str) -> bool:
    """
    Whether C{name} can be a user in the password file.
    """
    return (
        bool(name)
        and len(name.encode("utf-8")) <= 255
        and not name.startswith("#")
        and _USERNAME_FORBIDDEN.search(name) is None
    )


def normaliseSenderPattern(text: str) -> str:
    """
    A sender pattern in canonical form: C{*}, C{@domain} (A-labels, lower
    case) or C{localpart@domain}.

    @raise PasswordFileError: if it is none of these.
    """
    text = text.strip()
    if text == "*":
        return text
    try:
        if text.startswith("@"):
            return "@" + normaliseDomain(text[1:])
        return str(Address.parse(text, utf8=True))
    except AddressError as e:
        raise PasswordFileError(f"bad sender pattern {text!r}: {e}") from None


def normaliseETRNDomain(text: str) -> str:
    """
    An ETRN domain pattern in canonical form: C{*}, C{domain} or
    C{.domain} (its subdomains).

    @raise PasswordFileError: if it is not a domain.
    """
    text = text.strip()
    if text == "*":
        return text
    parent = text.startswith(".")
    try:
        domain = normaliseDomain(text[1:] if parent else text)
    except AddressError as e:
        raise PasswordFileError(f"bad ETRN domain {text!r}: {e}") from None
    return "." + domain if parent else domain


@dataclass(frozen=True)
class PasswordEntry:
    """
    One user of the password file.

    @ivar senders: normalised sender patterns (see the module docstring).
    @ivar etrn: normalised ETRN domain patterns.
    @ivar scram: the SCRAM-SHA-256 keys, if the line has them.
    """

    user: str
    hash: str
    senders: tuple[str, ...] = ()
    etrn: tuple[str, ...] = ()
    scram: ScramKeys | None = None


def _list(text: str, normalise: Callable[[str], str]) -> tuple[str, ...]:
    return tuple(normalise(item) for item in text.split(",") if item.strip())


def parseLine(line: str) -> PasswordEntry | None:
    """
    Parse one line; C{None} for a blank line or a comment.

    @raise PasswordFileError: if the line is malformed.
    """
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":")
    if len(fields) < 2 or len(fields) > 5:
        raise PasswordFileError("expected USER:HASH[:SENDERS[:ETRN[:SCRAM]]]")
    user, encoded = fields[0], fields[1]
    if not validUsername(user):
        raise PasswordFileError("bad user name")
    checkHash(encoded)
    senders = _list(fields[2], normaliseSenderPattern) if len(fields) > 2 else ()
    etrn = _list(fields[3], normaliseETRNDomain) if len(fields) > 3 else ()
    scram = None
    if len(fields) > 4:
        try:
            scram = ScramKeys.parse(fields[4])
        except ValueError as e:
            raise PasswordFileError(str(e)) from None
    return PasswordEntry(user, encoded, senders, etrn, scram)


def formatEntry(entry: PasswordEntry) -> str:
    """
    The line for C{entry}, without a line ending.
    """
    fields = [entry.user, entry.hash, ",".join(entry.senders), ",".join(entry.etrn)]
    if entry.scram is not None:
        fields.append(entry.scram.format())
    while fields[-1] == "":
        fields.pop()
    return ":".join(fields)


def parsePasswordFile(text: str) -> tuple[dict[str, PasswordEntry], list[str]]:
    """
    Parse a whole file.  A malformed line is skipped (and reported), so
    that one bad line locks out one user, not everyone.

    @return: the entries by user name, and one message per bad line.
    """
    entries: dict[str, PasswordEntry] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = parseLine(line)
        except PasswordFileError as e:
            problems.append(f"line {number}: {e}")
            continue
        if entry is None:
            continue
        if entry.user in entries:
            problems.append(f"line {number}: duplicate user {entry.user!r} ignored")
            continue
        entries[entry.user] = entry
    return entries, problems


def readPasswordFile(path: Path) -> tuple[dict[str, PasswordEntry], list[str]]:
    """
    Read and parse the file at C{path} (blocking: call it in a thread).

    @raise OSError: if it cannot be read.
    """
    return parsePasswordFile(path.read_bytes().decode("utf-8", "replace"))


def updatePasswordFile(
    path: Path,
    user: str,
    entry: PasswordEntry | None,
) -> bool:
    """
    Replace C{user}'s line with C{entry} (append it if there is none), or
    remove it when C{entry} is C{None}; other lines, comments included,
    are kept as they are.  The new file replaces the old one atomically; a
    new file gets mode 0600, an existing one keeps its mode and owner.
    Concurrent updates are serialised with a lock on the directory.

    @return: whether C{user} had a line before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lockFD = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lockFD, fcntl.LOCK_EX)
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
            stat: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            lines, stat = [], None
        out, found = _replaced(lines, user, entry)
        _writeAtomically(path, "".join(line + "\n" for line in out), stat)
        return found
    finally:
        os.close(lockFD)


def _replaced(lines: Sequence[str], user: str, entry: PasswordEntry | None) -> tuple[list[str], bool]:
    out: list[str] = []
    found = False
    for line in lines:
        if line.split(":", 1)[0] == user and not line.lstrip().startswith("#"):
            if not found and entry is not None:
                out.append(formatEntry(entry))
            found = True
            continue
        out.append(line)
    if not found and entry is not None:
        out.append(formatEntry(entry))
    return out, found


def _writeAtomically(path: Path, text: str, stat: os.stat_result | None) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600 if stat is None else stat.st_mode & 0o7777)
            if stat is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), stat.st_uid, stat.st_gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def senderPatterns(texts: Iterable[str]) -> tuple[str, ...]:
    """
    Normalise several sender patterns.

    @raise PasswordFileError: for the first bad one.
    """
    return tuple(normaliseSenderPattern(t) for t in texts)
