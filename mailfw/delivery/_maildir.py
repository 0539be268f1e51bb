"""
Delivery into Maildirs (plugin C{maildir}).

Each message is written the way the Maildir specification asks
(U{https://cr.yp.to/proto/maildir.html}): under a unique name in C{tmp/},
flushed with C{fsync}, hard-linked (or renamed) into C{new/}, and then the
C{new/} directory itself is flushed.  A reader of C{new/} therefore never
sees a partial message; a crash leaves at most a stray file in C{tmp/}.

Mailbox paths come from a template such as C{"mail/{domain}/{localpart}"}.
Every value put into the template is encoded first (see L{safeName}), so
no local part (C{../../etc}, C{a/b}, C{.hidden}, C{"a b"}, UTF-8) can name
a path outside the mailbox's directory.

Stored messages have LF line ends (the Maildir convention that Dovecot,
Courier and mail readers expect); C{Return-Path:} and C{Delivered-To:} are
prepended.

All file work runs in a thread pool the agent owns; the reactor thread
only collects the results and logs them.

Quota (optional) counts the octets of the messages in C{new/} and C{cur/}
of the mailbox and of its Maildir++ folders.  Sizes come from the
C{,S=<octets>} part of file names (which mailfw and Dovecot write), with a
C{stat} for names without it; each directory's total is cached and
rescanned only when that directory's modification time changes, so a
delivery normally costs a few C{stat} calls rather than a listing.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.address import Address
from mailfw.config import ConfigError, Section
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IDescribed, IMessageBody
from mailfw.queue._produce import ThreadPoolRunner, ThreadRunner
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = [
    "MaildirDeliveryAgent",
    "ThreadPoolRunner",
    "ThreadRunner",
    "fromConfig",
    "safeName",
]

_T = TypeVar("_T")

DELIVERED = SMTPReply(250, "2.0.0", "Delivered")
UNKNOWN_MAILBOX = SMTPReply(550, "5.1.1", "No such mailbox")
BAD_MAILBOX_NAME = SMTPReply(550, "5.1.3", "Bad mailbox name")
OVER_QUOTA = SMTPReply(552, "5.2.2", "Mailbox full")
DISK_FULL = SMTPReply(452, "4.3.1", "Insufficient system storage")
LOCAL_ERROR = SMTPReply(451, "4.3.0", "Local delivery error, try again later")

TEMPLATE_FIELDS = frozenset({"domain", "localpart", "user", "detail"})
CHUNK_SIZE = 64 * 1024

# Characters kept as they are in file names made from addresses.  Everything
# else (including "/", "%", NUL, spaces, quotes and non-ASCII) becomes %XX
# of its UTF-8 octets, and so does a leading "." (no "..", no hidden or
# Maildir++ folder names).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&'*+-=?^_`{|}~.")
_SIZE_IN_NAME = re.compile(r",S=(\d+)")


def safeName(text: str) -> str:
    """
    Encode C{text} (a local part, a domain, a detail) as one safe path
    component: never empty, never C{.} or C{..}, never starting with a dot,
    no C{/} or NUL, ASCII only.  The encoding is C{%XX} of UTF-8 octets,
    so distinct inputs give distinct names.
    """
    out = []
    for i, char in enumerate(text):
        if char in _SAFE and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"%{octet:02X}" for octet in char.encode("utf-8", "surrogatepass"))
    return "".join(out) or "%"


def _encodeHostname(hostname: str) -> str:
    # The specification's own encoding: "/" and ":" would break the name.
    return hostname.replace("/", "\\057").replace(":", "\\072")


@dataclass(frozen=True)
class _Target:
    """
    Where one recipient's copy goes.
    """

    maildir: Path
    folder: str | None


class _MailboxError(Exception):
    def __init__(self, reply: SMTPReply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


@implementer(IDeliveryAgent, IDescribed)
class MaildirDeliveryAgent:
    """
    Writes each recipient's copy into a Maildir chosen by a path template.

    @ivar baseDir: the directory the mailboxes live under; no mailbox path
        leaves it.
    @ivar template: the mailbox path relative to C{baseDir}, with the fields
        C{{domain}}, C{{localpart}} (as the client gave it), C{{user}} (the
        local part lowercased, without C{+detail}) and C{{detail}}.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        baseDir: Path,
        runInThread: ThreadRunner,
        template: str = "mail/{domain}/{localpart}",
        create: bool = True,
        detailFolder: bool = False,
        separator: str = "+",
        quota: int | None = None,
        hostname: str | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        checkTemplate(template)
        self.name = name
        self.baseDir = Path(os.path.abspath(baseDir))
        self.template = template
        self.create = create
        self.detailFolder = detailFolder
        self.separator = separator
        self.quota = quota
        self._runInThread = runInThread
        self._hostname = _encodeHostname(hostname or socket.gethostname())
        self._now = now
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._sizeCache: dict[str, tuple[int, int]] = {}

    def describe(self) -> str:
        return f"plugin maildir, mailboxes {self.baseDir / self.template}"

    def ownedPaths(self) -> list[str]:
        return [str(self.baseDir)]

    # -- mapping addresses to paths -------------------------------------------

    def targetFor(self, address: Address) -> _Target:
        """
        The Maildir (and Maildir++ folder) for C{address}.

        @raise _MailboxError: if the path would leave L{baseDir}.
        """
        localpart = address.unquotedLocalpart
        user, sep, detail = (
            localpart.partition(self.separator)
            if self.separator
            else (
                localpart,
                "",
                "",
            )
        )
        fields = {
            "domain": safeName(address.domain),
            "localpart": safeName(localpart),
            "user": safeName(user.lower()),
            "detail": safeName(detail) if detail else "",
        }
        relative = self.template.format_map(fields)
        path = Path(os.path.normpath(self.baseDir / relative))
        if path == self.baseDir or self.baseDir not in path.parents:
            raise _MailboxError(BAD_MAILBOX_NAME, f"path {relative!r} leaves the base directory")
        folder = "." + safeName(detail) if self.detailFolder and sep and detail else None
        return _Target(path, folder)

    # -- the agent ----------------------------------------------------------

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        if not envelope.recipients:
            return succeed([])
        results = [self._deliverRecipient(envelope, r, body) for r in envelope.recipients]
        return gatherResults(results, consumeErrors=True).addCallback(list)

    def _deliverRecipient(
        self, envelope: Envelope, recipient: Recipient, body: IMessageBody
    ) -> Deferred[RecipientOutcome]:
        def work() -> tuple[SMTPReply, str]:
            return self.attempt(envelope.senderText, recipient.address, body)

        def unexpected(failure: Failure) -> tuple[SMTPReply, str]:
            self.log.failure(
                "{agent}: delivery to {recipient} failed unexpectedly",
                failure,
                agent=self.name,
                recipient=str(recipient.address),
            )
            return LOCAL_ERROR, "unexpected error"

        def done(result: tuple[SMTPReply, str]) -> RecipientOutcome:
            # Logged here, on the reactor thread, not in the pool.
            reply, reason = result
            self.log.emit(
                LogLevel.info if reply.isPositive else LogLevel.warn,
                "{agent}: {recipient} from {sender}: {code} {enhanced} ({reason})",
                agent=self.name,
                sender=envelope.senderText,
                recipient=str(recipient.address),
                code=reply.code,
                enhanced=reply.enhanced,
                reason=reason,
            )
            return RecipientOutcome(recipient, reply)

        d = self._runInThread(work)
        return d.addErrback(unexpected).addCallback(done)

    # -- the blocking part, run in a thread -------------------------------------

    def deliverOne(self, sender: str, address: Address, body: IMessageBody) -> SMTPReply:
        """
        Deliver one copy to C{address}, blocking; see L{attempt}.
        """
        return self.attempt(sender, address, body)[0]

    def attempt(self, sender: str, address: Address, body: IMessageBody) -> tuple[SMTPReply, str]:
        """
        Deliver one copy to C{address}, blocking; runs in the pool.  Every
        expected failure is turned into a reply here.

        @return: the reply and, for the log, where the copy went or why it
            did not.
        """
        try:
            target = self.targetFor(address)
            directory = self._prepare(target)
            header = f"Return-Path: <{sender}>\nDelivered-To: {address}\n".encode()
            name = self._write(directory, header, body)
        except _MailboxError as e:
            return e.reply, e.reason
        except OSError as e:
            reply = DISK_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR
            where = f" ({e.filename})" if e.filename else ""
            return reply, f"{e.strerror}{where}"
        return DELIVERED, f"stored as {name}"

    def _prepare(self, target: _Target) -> Path:
        """
        Make sure the Maildir (and folder) exists; return the directory to
        write into.
        """
        maildir = target.maildir
        if not _isMaildir(maildir):
            if not self.create:
                if maildir.exists():
                    raise OSError(errno.ENOTDIR, "not a Maildir", str(maildir))
                raise _MailboxError(UNKNOWN_MAILBOX, f"no Maildir at {maildir}")
            _makeMaildir(maildir)
        if target.folder is None:
            return maildir
        folder = maildir / target.folder
        if _isMaildir(folder):
            return folder
        if not self.create:
            return maildir
        _makeMaildir(folder)
        # Maildir++: a folder is marked by this empty file.
        with open(folder / "maildirfolder", "ab"):
            pass
        return folder

    def _uniqueName(self) -> str:
        now = self._now()
        seconds = int(now)
        micro = int((now - seconds) * 1_000_000)
        with self._lock:
            sequence = next(self._sequence)
        return f"{seconds}.M{micro}P{os.getpid()}Q{sequence}.{self._hostname}"

    def _write(self, maildir: Path, header: bytes, body: IMessageBody) -> Path:
        for _attempt in range(5):
            unique = self._uniqueName()
            tmpPath = maildir / "tmp" / unique
            try:
                fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(errno.EEXIST, "no unique name found", str(maildir / "tmp"))
        linked = False
        try:
            try:
                size = _copy(fd, header, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._checkQuota(maildir, size)
            newPath = maildir / "new" / f"{unique},S={size}"
            _linkInto(tmpPath, newPath)
            linked = True
            _fsyncDirectory(maildir / "new")
        finally:
            if not linked:
                _unlinkQuietly(tmpPath)
        return newPath

    # -- quota ----------------------------------------------------------------

    def _checkQuota(self, directory: Path, size: int) -> None:
        if self.quota is None:
            return
        maildir = directory.parent if (directory / "maildirfolder").exists() else directory
        used = self.mailboxSize(maildir)
        if used + size > self.quota:
            raise _MailboxError(OVER_QUOTA, f"quota exceeded: {used} + {size} > {self.quota} octets")

    def mailboxSize(self, maildir: Path) -> int:
        """
        Octets in C{new/} and C{cur/} of C{maildir} and its Maildir++
        folders, using the per-directory cache.
        """
        total = 0
        folders = [maildir]
        try:
            with os.scandir(maildir) as entries:
                folders.extend(
                    Path(e.path)
                    for e in entries
                    if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir()
                )
        except FileNotFoundError:
            return 0
        for folder in folders:
            for sub in ("new", "cur"):
                total += self._directorySize(folder / sub)
        return total

    def _directorySize(self, directory: Path) -> int:
        key = str(directory)
        try:
            mtime = os.stat(directory).st_mtime_ns
        except FileNotFoundError:
            return 0
        with self._lock:
            cached = self._sizeCache.get(key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        total = 0
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _SIZE_IN_NAME.search(entry.name)
                if match:
                    total += int(match.group(1))
                else:
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
        with self._lock:
            self._sizeCache[key] = (mtime, total)
        return total


def _isMaildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("tmp", "new", "cur"))


def _makeMaildir(path: Path) -> None:
    created = not path.exists()
    for sub in ("tmp", "new", "cur"):
        os.makedirs(path / sub, mode=0o700, exist_ok=True)
    _fsyncDirectory(path)
    if created:
        _fsyncDirectory(path.parent)


def _copy(fd: int, header: bytes, body: IMessageBody) -> int:
    """
    Write C{header} and C{body} to C{fd} with LF line ends (the Maildir
    convention); return the octets written.
    """
    written = _writeAll(fd, header)
    pendingCR = False
    reader: BinaryIO
    with body.open() as reader:
        while True:
            chunk = reader.read(CHUNK_SIZE)
            if not chunk:
                break
            if pendingCR:
                chunk = b"\r" + chunk
            pendingCR = chunk.endswith(b"\r")
            if pendingCR:
                chunk = chunk[:-1]
            written += _writeAll(fd, chunk.replace(b"\r\n", b"\n"))
    if pendingCR:
        written += _writeAll(fd, b"\r")
    return written


def _writeAll(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _linkInto(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links on this file system: rename is atomic too, but it
        # would replace an existing name, so make sure there is none.
        if target.exists():
            raise OSError(errno.EEXIST, "name already in new/", str(target)) from None
        os.rename(source, target)
        return
    _unlinkQuietly(source)


def _unlinkQuietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsyncDirectory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkTemplate(template: str) -> None:
    """
    Refuse a path template with unknown fields, attribute or index access,
    conversions or format specifications.

    @raise ValueError: naming the problem.
    """
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"bad template field {{{field}}}: use only "
                + ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            )


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> MaildirDeliveryAgent:
    """
    Build a Maildir agent from C{[delivery.NAME]}: C{path}, C{create},
    C{detail_folder}, C{separator}, C{quota} (octets), C{threads}.
    """
    section = Section(f"[delivery.{instanceName}]", options)
    template = section.text("path", "mail/{domain}/{localpart}")
    create = section.flag("create", True)
    detailFolder = section.flag("detail_folder", False)
    separator = section.text("separator", "+")
    quota = section.integer("quota", None, minimum=1)
    threads = section.integer("threads", 4, minimum=1)
    section.finish()
    try:
        checkTemplate(template)
    except ValueError as e:
        raise ConfigError(f"{section.title} path: {e}") from None
    if len(separator) > 1:
        raise ConfigError(f"{section.title} separator: must be one character or empty")
    if os.path.isabs(template):
        base, relative = Path("/"), template.lstrip("/")
    else:
        base, relative = context.dataDir, template
    # The fixed leading part of the template is the base directory; the
    # rest is where address-derived names go, so nothing can leave it.
    fixed, _, _ = relative.partition("{")
    fixedDir = fixed.rpartition("/")[0]
    return MaildirDeliveryAgent(
        name=instanceName,
        baseDir=base / fixedDir if fixedDir else base,
        runInThread=ThreadPoolRunner(context.reactor, f"mailfw-maildir-{instanceName}", threads),
        template=relative[len(fixedDir) + 1 :] if fixedDir else relative,
        create=create,
        detailFolder=detailFolder,
        separator=separator,
        quota=quota,
        hostname=context.hostname,
    )
