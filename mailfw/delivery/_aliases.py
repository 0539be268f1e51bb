"""
Alias expansion (plugin C{aliases}), in the model of Postfix's C{local(8)}:
aliases are expanded at delivery time, and the expansion is new mail in
the queue, so every target gets its own routing, retries and bounces.

Route a domain to this agent (C{transport = {"lists.example.org" =
"aliases"}}, or C{local_agent = "aliases"}) and give it an alias file::

    [delivery.aliases]
    plugin = "aliases"
    file = "aliases"            # relative to the data directory
    # max_targets = 1000        # targets per alias
    # max_depth = 20            # Delivered-To headers before a loop is assumed
    # command_timeout = 300     # seconds, for "|command" targets

The file is a subset of the C{aliases(5)} syntax of sendmail and Postfix::

    # comments and blank lines are ignored
    postmaster: alice@example.org
    team:       alice@example.org, bob@example.net,
                carol                        # a continuation line
    sales@lists.example.org: dave@example.org
    archive:    "|/usr/local/bin/archive --to {recipient}"

  - A name is a local part, matched case-insensitively at any domain
    routed to this agent, or a full address C{user@domain}; an exact
    address wins over a bare local part.  A name may appear only once.
  - A target is an address C{user@domain}; a bare local part, meaning that
    local part at the recipient's domain (which routes back to this agent,
    so it is a nested alias); or a command C{"|/path/to/program args"}
    (quoted when it has spaces or commas), split like a shell would split
    it but run without a shell by L{PipeDeliveryAgent}, whose
    C{{sender}}, C{{recipient}}, C{{localpart}}, C{{domain}}, C{{user}}
    and C{{detail}} fields it may use (the recipient is the alias).  The
    program must be an absolute path to an executable file.
  - C{:include:} files, delivery to files (C{/path}) and C{owner-} aliases
    are not supported; the first two are refused with a message saying so.
  - A recipient without an alias is refused with C{550 5.1.1}: the agent
    is the final word for the domains routed to it.

The file is read at start-up (a syntax error is a L{ConfigError} naming
the file and line) and again whenever its modification time, size or inode
change; that check is a C{stat} in a thread on each delivery.  A file
that became unreadable or invalid is reported in the log and defers every
recipient with C{451 4.3.0} until it is fixed (nothing is delivered by a
table that may be stale or half-edited).

How one recipient is delivered:

  1. Loops: if the message's header section already has a
     C{Delivered-To:} naming the recipient (compared case-insensitively),
     or more than C{max_depth} C{Delivered-To:} headers, the recipient
     gets C{554 5.4.6} ("mail forwarding loop").  An alias that expands to
     itself is therefore stopped after one round.
  2. Commands run first, one after the other, each with the message
     prefixed by C{Delivered-To: <recipient>}.
  3. Then, unless a command asked to try again later, the address targets
     become I{one} new queued message with the same envelope sender (so
     bounces of the expansion go to the original sender, as Postfix does
     without C{owner-} aliases), the recipient's DSN C{NOTIFY}, its
     C{ORCPT} (or the alias address as one), and the body prefixed with
     C{Delivered-To: <recipient>}.  The recipient is delivered when that
     message is durable (C{250 2.1.5}); a queue failure gives
     C{451 4.3.0}.
  4. The recipient's outcome is the worst of its parts: the first
     transient (4xx) reply if any part was transient, else the first
     permanent (5xx) one, else C{250 2.1.5 Expanded to N targets}.  A
     deferred recipient is expanded again on the next attempt, so
     commands that had succeeded run again (commands come first so that a
     deferring command does not also duplicate the queued expansion).

The body is read in a thread pool the agent owns, in chunks of
L{CHUNK_SIZE} handed back to the reactor thread and written to every new
message of the delivery in one pass, so a large message is never held in
memory whole.
"""

from __future__ import annotations

import io
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.address import Address, AddressError
from mailfw.config import ConfigError, Section
from mailfw.delivery._maildir import ThreadPoolRunner, ThreadRunner
from mailfw.delivery._pipe import PipeDeliveryAgent, checkCommand
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IIncomingMessage, IMessageBody, IMessageQueue
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = [
    "Alias",
    "AliasDeliveryAgent",
    "AliasSyntaxError",
    "AliasTable",
    "deliveredToHeaders",
    "fromConfig",
    "parseAliases",
]

CHUNK_SIZE = 256 * 1024
HEADER_SCAN_LIMIT = 1024 * 1024
"""How much of a message is read to find its header section."""

NO_SUCH_USER = SMTPReply(550, "5.1.1", "No such user")
LOOP = SMTPReply(554, "5.4.6", "Mail forwarding loop")
TOO_DEEP = SMTPReply(554, "5.4.6", "Mail forwarding loop (too many Delivered-To headers)")
QUEUE_ERROR = SMTPReply(451, "4.3.0", "Could not queue the alias expansion, try again later")
TABLE_ERROR = SMTPReply(451, "4.3.0", "Alias table unavailable, try again later")
LOCAL_ERROR = SMTPReply(451, "4.3.0", "Local delivery error, try again later")

_PLACEHOLDER_DOMAIN = "example.invalid"


def expanded(count: int) -> SMTPReply:
    """
    The reply for a recipient whose expansion is all done.
    """
    return SMTPReply(250, "2.1.5", f"Expanded to {count} target{'s' if count != 1 else ''}")


class AliasSyntaxError(ValueError):
    """
    The alias file is invalid; the message names the file and line.
    """


@dataclass(frozen=True)
class Alias:
    """
    One alias: its targets, by kind.

    @ivar addresses: full target addresses.
    @ivar localparts: bare local parts, at the recipient's domain.
    @ivar commands: argument vectors of C{|command} targets.
    @ivar line: where the alias starts in the file, for the log.
    """

    name: str
    addresses: tuple[Address, ...] = ()
    localparts: tuple[str, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    line: int = 0

    def addressesAt(self, domain: str) -> list[Address]:
        """
        The address targets with bare local parts put at C{domain}, without
        duplicates, in file order (full addresses first).
        """
        seen: set[str] = set()
        result: list[Address] = []
        for address in (*self.addresses, *(Address(lp, domain) for lp in self.localparts)):
            key = str(address).lower()
            if key not in seen:
                seen.add(key)
                result.append(address)
        return result


def _key(address: Address) -> str:
    return address.unquotedLocalpart.lower()


class AliasTable:
    """
    Aliases by name: C{(local part lowercased, domain)} for full-address
    names and C{(local part lowercased, None)} for bare ones.
    """

    def __init__(self, entries: Mapping[tuple[str, str | None], Alias]) -> None:
        self._entries = dict(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, address: Address) -> Alias | None:
        """
        The alias for C{address}: an exact address entry, else a bare local
        part entry, else C{None}.
        """
        local = _key(address)
        found = self._entries.get((local, address.domain))
        if found is None:
            found = self._entries.get((local, None))
        return found


def _logicalLines(text: str) -> list[tuple[int, str]]:
    """
    Join continuation lines (starting with whitespace) to the line they
    continue, dropping blank lines and comments (lines whose first
    non-blank character is C{#}, as in Postfix).
    """
    logical: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not logical:
                raise AliasSyntaxError(f"line {number}: continuation line without an alias")
            start, previous = logical[-1]
            logical[-1] = (start, previous + " " + stripped)
        else:
            logical.append((number, stripped))
    return logical


def _splitTargets(text: str) -> list[str]:
    """
    Split on commas outside double quotes; a backslash inside quotes
    escapes the next character.
    """
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quoted:
        raise ValueError("unterminated quoted string")
    items.append("".join(current).strip())
    return items


def _unquote(text: str) -> str:
    out: list[str] = []
    escaped = False
    for char in text:
        if not escaped and char == "\\":
            escaped = True
            continue
        escaped = False
        out.append(char)
    return "".join(out)


def _command(text: str, isExecutable: Callable[[str], bool]) -> tuple[str, ...]:
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"bad command {text!r}: {e}") from None
    try:
        checkCommand(argv, perRecipient=True)
    except ValueError as e:
        raise ValueError(f"command {text!r}: {e}") from None
    if not isExecutable(argv[0]):
        raise ValueError(f"command {text!r}: {argv[0]} is not an executable file")
    return tuple(argv)


def _parseName(name: str) -> tuple[tuple[str, str | None], str]:
    if "@" in name:
        address = Address.parse(name, utf8=True)
        return (_key(address), address.domain), str(address)
    address = Address.parse(f"{name}@{_PLACEHOLDER_DOMAIN}", utf8=True)
    return (_key(address), None), address.localpart


def parseAliases(
    text: str,
    filename: str = "aliases",
    maxTargets: int = 1000,
    isExecutable: Callable[[str], bool] = lambda path: os.access(path, os.X_OK),
) -> AliasTable:
    """
    Parse an alias file (see the module docstring for the syntax).

    @param isExecutable: checks a command's program (a seam for tests).
    @raise AliasSyntaxError: naming C{filename} and the line.
    """
    entries: dict[tuple[str, str | None], Alias] = {}
    try:
        logical = _logicalLines(text)
    except AliasSyntaxError as e:
        raise AliasSyntaxError(f"{filename}, {e}") from None
    for number, line in logical:
        where = f"{filename}, line {number}"
        name, colon, rest = line.partition(":")
        name = name.strip()
        if not colon or not name:
            raise AliasSyntaxError(f"{where}: expected 'name: target, ...'")
        try:
            key, shown = _parseName(name)
        except AddressError as e:
            raise AliasSyntaxError(f"{where}: bad alias name {name!r}: {e}") from None
        if key in entries:
            raise AliasSyntaxError(f"{where}: alias {shown!r} is already defined on line {entries[key].line}")
        addresses: list[Address] = []
        localparts: list[str] = []
        commands: list[tuple[str, ...]] = []
        try:
            targets = _splitTargets(rest)
        except ValueError as e:
            raise AliasSyntaxError(f"{where}: {e}") from None
        if len(targets) > maxTargets:
            raise AliasSyntaxError(
                f"{where}: alias {shown!r} has {len(targets)} targets (max_targets is {maxTargets})"
            )
        for target in targets:
            try:
                if not target:
                    raise ValueError("empty target (a stray comma?)")
                if target.startswith('"|') and target.endswith('"') and len(target) > 2:
                    commands.append(_command(_unquote(target[2:-1]), isExecutable))
                elif target.startswith("|"):
                    commands.append(_command(target[1:], isExecutable))
                elif target.lower().startswith(":include:"):
                    raise ValueError(
                        f"{target!r}: :include: is not supported; list the targets in the alias file"
                    )
                elif target.lstrip('"').startswith("/"):
                    raise ValueError(
                        f"{target!r}: delivery to files is not supported; "
                        'use a command ("|/path/to/program") or an address'
                    )
                elif "@" in target:
                    addresses.append(Address.parse(target, utf8=True))
                else:
                    Address.parse(f"{target}@{_PLACEHOLDER_DOMAIN}", utf8=True)
                    localparts.append(target)
            except AddressError as e:
                raise AliasSyntaxError(f"{where}: bad target {target!r}: {e}") from None
            except ValueError as e:
                raise AliasSyntaxError(f"{where}: {e}") from None
        entries[key] = Alias(shown, tuple(addresses), tuple(localparts), tuple(commands), number)
    return AliasTable(entries)


def deliveredToHeaders(message: bytes) -> list[str]:
    """
    The values of the C{Delivered-To:} fields in the header section at the
    start of C{message} (unfolded, stripped, lowercased).  The header
    section ends at the first empty line or at the end of C{message}.
    """
    values: list[str] = []
    current: str | None = None
    for raw in message.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current += " " + line.decode("utf-8", "replace").strip()
            continue
        if current is not None:
            values.append(current.strip().lower())
            current = None
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"delivered-to":
            current = value.decode("utf-8", "replace")
    if current is not None:
        values.append(current.strip().lower())
    return values


class _PrefixedReader(io.RawIOBase):
    """
    A reader giving C{prefix} and then what C{reader} gives; closing it
    closes C{reader}.
    """

    def __init__(self, prefix: bytes, reader: BinaryIO) -> None:
        self._prefix = memoryview(prefix)
        self._reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        if self._prefix:
            count = min(len(target), len(self._prefix))
            target[:count] = self._prefix[:count]
            self._prefix = self._prefix[count:]
            return count
        data = self._reader.read(len(target))
        target[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


@implementer(IMessageBody)
class _PrefixedBody:
    """
    C{body} with header lines put in front of it, for commands.
    """

    def __init__(self, prefix: bytes, body: IMessageBody) -> None:
        self._prefix = prefix
        self._body = body
        self.size = len(prefix) + body.size

    def open(self) -> BinaryIO:
        reader = self._body.open()
        return cast(BinaryIO, io.BufferedReader(_PrefixedReader(self._prefix, reader)))

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._prefix)
        return self._body.produce(consumer)


@dataclass(frozen=True)
class _Stamp:
    mtime: int
    size: int
    inode: int


@dataclass(frozen=True)
class _Loaded:
    """
    What a reload in the thread found: a new stamp, and a new table or the
    reason there is none.
    """

    stamp: _Stamp | None
    table: AliasTable | None
    error: str | None


def loadTable(path: Path, maxTargets: int) -> tuple[_Stamp, AliasTable]:
    """
    Read and parse the alias file, blocking.

    @raise OSError: if it cannot be read.
    @raise AliasSyntaxError: if it is invalid (also when it is not UTF-8).
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AliasSyntaxError(f"{path}: not UTF-8 ({e.reason} at octet {e.start})") from None
    table = parseAliases(text, str(path), maxTargets)
    return _Stamp(st.st_mtime_ns, st.st_size, st.st_ino), table


@dataclass
class _Plan:
    """
    What happens to one recipient of a delivery.
    """

    recipient: Recipient
    replies: list[SMTPReply]
    alias: Alias | None = None
    addresses: Sequence[Address] = ()

    @property
    def targetCount(self) -> int:
        return len(self.addresses) + (len(self.alias.commands) if self.alias else 0)

    def outcome(self) -> RecipientOutcome:
        for reply in self.replies:
            if reply.isTransient:
                return RecipientOutcome(self.recipient, reply)
        for reply in self.replies:
            if reply.isPermanent:
                return RecipientOutcome(self.recipient, reply)
        return RecipientOutcome(self.recipient, expanded(self.targetCount))


@implementer(IDeliveryAgent)
class AliasDeliveryAgent:
    """
    Expands each recipient by an alias table into new queued mail and
    command runs (see the module docstring).

    @ivar path: the alias file, re-read when it changes.
    @ivar table: the current table, or C{None} while the file is broken.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        path: Path,
        queue: IMessageQueue,
        runInThread: ThreadRunner,
        pipeFactory: Callable[[Sequence[str]], IDeliveryAgent],
        table: AliasTable | None = None,
        stamp: _Stamp | None = None,
        maxTargets: int = 1000,
        maxDepth: int = 20,
    ) -> None:
        """
        @param table: the table read at start-up with its C{stamp}; read on
            the first delivery when C{None}.
        @param pipeFactory: builds the agent that runs one command's
            argument vector (a L{PipeDeliveryAgent} outside tests).
        """
        self.name = name
        self.path = path
        self.queue = queue
        self.table = table
        self.maxTargets = maxTargets
        self.maxDepth = maxDepth
        self._stamp = stamp if table is not None else None
        self._error: str | None = None
        self._runInThread = runInThread
        self._pipeFactory = pipeFactory
        self._pipes: dict[tuple[str, ...], IDeliveryAgent] = {}

    # -- the table ----------------------------------------------------------

    def _reload(self, known: _Stamp | None) -> _Loaded | None:
        """
        Blocking, in the pool: C{None} if the file still has stamp
        C{known}, else what it holds now.
        """
        try:
            st = os.stat(self.path)
        except OSError as e:
            return _Loaded(None, None, f"cannot read {self.path}: {e.strerror}")
        if known is not None and _Stamp(st.st_mtime_ns, st.st_size, st.st_ino) == known:
            return None
        try:
            stamp, table = loadTable(self.path, self.maxTargets)
        except OSError as e:
            return _Loaded(None, None, f"cannot read {self.path}: {e.strerror}")
        except AliasSyntaxError as e:
            return _Loaded(_Stamp(st.st_mtime_ns, st.st_size, st.st_ino), None, str(e))
        return _Loaded(stamp, table, None)

    def _apply(self, loaded: _Loaded | None) -> None:
        """
        On the reactor thread: take what L{_reload} found, logging changes.
        """
        if loaded is None:
            return
        self._stamp = loaded.stamp
        if loaded.table is not None:
            self.table = loaded.table
            self._error = None
            self.log.info(
                "{agent}: read {count} aliases from {path}",
                agent=self.name,
                count=len(loaded.table),
                path=str(self.path),
            )
        else:
            self.table = None
            if loaded.error != self._error:
                self.log.error(
                    "{agent}: alias table unusable, deferring its mail: {error}",
                    agent=self.name,
                    error=loaded.error,
                )
            self._error = loaded.error

    # -- delivery -------------------------------------------------------------

    def _pipe(self, argv: tuple[str, ...]) -> IDeliveryAgent:
        agent = self._pipes.get(argv)
        if agent is None:
            agent = self._pipes[argv] = self._pipeFactory(argv)
        return agent

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        if not envelope.recipients:
            return succeed([])
        return Deferred.fromCoroutine(self._deliver(envelope, body))

    async def _deliver(self, envelope: Envelope, body: IMessageBody) -> Sequence[RecipientOutcome]:
        known = self._stamp
        self._apply(await self._runInThread(lambda: self._reload(known)))
        try:
            headers = await self._runInThread(lambda: _readHeaders(body))
        except OSError as e:
            self.log.error("{agent}: cannot read the message: {error}", agent=self.name, error=str(e))
            return [RecipientOutcome(r, LOCAL_ERROR) for r in envelope.recipients]
        deliveredTo = deliveredToHeaders(headers)
        plans = [self._plan(r, deliveredTo) for r in envelope.recipients]
        for plan in plans:
            if plan.alias is not None and plan.alias.commands:
                await self._runCommands(envelope, body, plan)
        toQueue = [p for p in plans if p.addresses and not any(reply.isTransient for reply in p.replies)]
        if toQueue:
            await self._enqueue(envelope, body, toQueue)
        outcomes = [plan.outcome() for plan in plans]
        for outcome in outcomes:
            reply = outcome.reply
            self.log.emit(
                LogLevel.info if reply.isPositive else LogLevel.warn,
                "{agent}: {recipient} from {sender}: {code} {enhanced} {text}",
                agent=self.name,
                sender=envelope.senderText,
                recipient=str(outcome.recipient.address),
                code=reply.code,
                enhanced=reply.enhanced,
                text=reply.text,
            )
        return outcomes

    def _plan(self, recipient: Recipient, deliveredTo: Sequence[str]) -> _Plan:
        address = recipient.address
        if self.table is None:
            return _Plan(recipient, [TABLE_ERROR])
        if str(address).lower() in deliveredTo:
            return _Plan(recipient, [LOOP])
        if len(deliveredTo) > self.maxDepth:
            return _Plan(recipient, [TOO_DEEP])
        alias = self.table.lookup(address)
        if alias is None:
            return _Plan(recipient, [NO_SUCH_USER])
        return _Plan(recipient, [], alias, alias.addressesAt(address.domain))

    async def _runCommands(self, envelope: Envelope, body: IMessageBody, plan: _Plan) -> None:
        assert plan.alias is not None
        single = replace(envelope, recipients=(plan.recipient,))
        prefixed = _PrefixedBody(_deliveredTo(plan.recipient.address), body)
        for argv in plan.alias.commands:
            try:
                [outcome] = await self._pipe(argv).deliver(single, prefixed, None)
                reply = outcome.reply
            except Exception:
                self.log.failure(
                    "{agent}: command {program} for {recipient} failed unexpectedly",
                    agent=self.name,
                    program=argv[0],
                    recipient=str(plan.recipient.address),
                )
                reply = LOCAL_ERROR
            plan.replies.append(reply)
            if reply.isTransient:
                # The recipient is retried as a whole; running the rest
                # now would only run them again then.
                return

    async def _enqueue(self, envelope: Envelope, body: IMessageBody, plans: Sequence[_Plan]) -> None:
        """
        Queue one new message per plan, reading the body once for all.
        """
        incoming: list[IIncomingMessage] = []
        for plan in plans:
            prefix = _deliveredTo(plan.recipient.address)
            message = self.queue.receive(self._expansionEnvelope(envelope, plan, len(prefix)))
            message.write(prefix)
            incoming.append(message)
        try:
            await self._copyBody(body, incoming)
        except OSError as e:
            self.log.error("{agent}: cannot read the message: {error}", agent=self.name, error=str(e))
            for message in incoming:
                message.abort()
            for plan in plans:
                plan.replies.append(LOCAL_ERROR)
            return
        commits = [message.commit() for message in incoming]
        for plan, commit in zip(plans, commits, strict=False):
            try:
                queueID = await commit
            except Exception:
                self.log.failure(
                    "{agent}: cannot queue the expansion of {recipient}",
                    Failure(),
                    agent=self.name,
                    recipient=str(plan.recipient.address),
                )
                plan.replies.append(QUEUE_ERROR)
                continue
            self.log.info(
                "{agent}: {recipient} expanded to {count} address(es) as {queueID}",
                agent=self.name,
                recipient=str(plan.recipient.address),
                count=len(plan.addresses),
                queueID=queueID,
            )

    async def _copyBody(self, body: IMessageBody, incoming: Sequence[IIncomingMessage]) -> None:
        """
        Read C{body} in chunks in the pool and write each chunk to every
        message on the reactor thread (where C{write} belongs).

        @raise OSError: if the body cannot be read.
        """
        reader = await self._runInThread(body.open)
        try:
            while True:
                chunk = await self._runInThread(lambda: reader.read(CHUNK_SIZE))
                if not chunk:
                    return
                for message in incoming:
                    message.write(chunk)
        finally:
            reader.close()

    def _expansionEnvelope(self, envelope: Envelope, plan: _Plan, extra: int) -> Envelope:
        original = plan.recipient
        orcpt = original.orcpt
        if orcpt is None:
            kind = "rfc822" if original.address.isASCII else "utf-8"
            orcpt = f"{kind};{original.address}"
        return replace(
            envelope,
            recipients=tuple(Recipient(a, notify=original.notify, orcpt=orcpt) for a in plan.addresses),
            size=None if envelope.size is None else envelope.size + extra,
            smtputf8=envelope.smtputf8 or not all(a.isASCII for a in plan.addresses),
            arrival=0.0,
            queueID="",
        )


def _deliveredTo(address: Address) -> bytes:
    return f"Delivered-To: {address}\r\n".encode()


def _readHeaders(body: IMessageBody) -> bytes:
    """
    Blocking: the start of the message, up to the end of its header
    section or L{HEADER_SCAN_LIMIT} octets.
    """
    data = b""
    with body.open() as reader:
        while len(data) < HEADER_SCAN_LIMIT:
            chunk = reader.read(CHUNK_SIZE)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"\r\n", b"\n")) or b"\n\r\n" in data or b"\n\n" in data:
                break
    return data


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> AliasDeliveryAgent:
    """
    Build an alias agent from C{[delivery.NAME]}: C{file} (required,
    relative to the data directory), C{max_targets} (default 1000),
    C{max_depth} (default 20), C{command_timeout} (seconds, default 300).
    The file is read now, so its mistakes stop the start-up.
    """
    section = Section(f"[delivery.{instanceName}]", options)
    fileName = section.text("file", None)
    maxTargets = section.integer("max_targets", 1000, minimum=1)
    maxDepth = section.integer("max_depth", 20, minimum=1)
    timeout = section.number("command_timeout", 300.0, minimum=0.001)
    section.finish()
    if fileName is None:
        raise ConfigError(f"{section.title} needs 'file'")
    if context.queue is None:
        raise ConfigError(
            f"{section.title}: the aliases agent puts its expansions into the queue, "
            "but none was given to it (ComponentContext.queue is not set)"
        )
    path = Path(fileName) if os.path.isabs(fileName) else context.path(fileName)
    try:
        # At start-up, before the reactor runs.
        stamp, table = loadTable(path, maxTargets)
    except OSError as e:
        raise ConfigError(f"{section.title} file: cannot read {path}: {e.strerror}") from None
    except AliasSyntaxError as e:
        raise ConfigError(f"{section.title} file: {e}") from None
    reactor = context.reactor

    def pipe(argv: Sequence[str]) -> IDeliveryAgent:
        return PipeDeliveryAgent(reactor, instanceName, argv, timeout=timeout)

    return AliasDeliveryAgent(
        name=instanceName,
        path=path,
        queue=context.queue,
        runInThread=ThreadPoolRunner(reactor, f"mailfw-aliases-{instanceName}", 2),
        pipeFactory=pipe,
        table=table,
        stamp=stamp,
        maxTargets=maxTargets,
        maxDepth=maxDepth,
    )
