"""
The queue's state transitions, written once for both SQL stores.

L{SQLQueue} holds every transition (enqueue, claim, record, hold,
release, flush, bounce, delete, list, the due time) and the shared state
(L{ISharedState}), as functions of one database handle with C{?}
placeholders.  A store subclasses it and supplies the seam:

  - C{_transact(function, durable)}: run C{function} in a write
    transaction, fire with its result after the C{COMMIT}.  C{function}
    may run more than once (a store retries a batch), so it must depend
    only on the database.
  - C{_read(function)}: run C{function} in a read transaction.
  - C{_copyBody(db, queueID, spooled, size)}: store a spilled body without
    holding it in memory (SQLite's BLOB I/O, PostgreSQL's binary COPY).
  - C{_shutdown} (threads, connections), which owners' leases recovery
    spares (C{_sparedOwners}), how a large body is read (C{_largeBody}),
    what a full store looks like (C{_isFull}), and a few optional hooks
    (L{SQLQueue._store}, L{SQLQueue._reapDead}, L{SQLQueue._touch},
    L{SQLQueue._wakeOthers}, L{SQLQueue._insertMessageRow}).  A store may
    set C{_recent} (L{RecentMessages}; SQLite does) so that the common path
    reads nothing back.

The differences between the two SQL dialects that the transitions see are
the row locks (L{Dialect}); a PostgreSQL handle rewrites the placeholders.
The memory queue (L{mailfw.queue._memory}) stays the reference the
contract suite checks both against.

Shared state
============

One table, C{shared_state(name, value, started, expires)}: a counter's
value or a mark's first time, and when the entry ends.  A count or mark
is one C{INSERT ... ON CONFLICT DO UPDATE ... RETURNING} (an expired entry
starts again in the same statement); reading a counter (C{amount} 0) is a
read, which sees the counts committed before it began (chain it on a
count's L{Deferred} to see that count), so that the frequent reads of a
greylist or quota never queue behind the SQLite writer.  They are not mail: the store commits them without waiting for the
disk (C{durable=False}).  Expired rows are purged in batches of
L{PURGE_BATCH} with the next write, at most once per L{PURGE_SECONDS}
unless the last purge found a full batch.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mailfw.config import Section
from mailfw.envelope import Envelope
from mailfw.interfaces import IIncomingMessage, IMessageBody, ISelectiveClaim
from mailfw.queue._io import Executor, MemoryBody, ThreadExecutor
from mailfw.queue._schema import (
    INSERT_LEASED_RECIPIENT,
    INSERT_MESSAGE,
    INSERT_RECIPIENT,
    SCHEMA_VERSION,
    envelopeFromJSON,
    envelopeToJSON,
    matchingClaim,
    recipientRows,
    replyColumns,
    replyFromColumns,
    selectorWhere,
)
from mailfw.queue._spool import LeaseOffers, NewMessage, SpoolingIncoming
from mailfw.queued import (
    Disposition,
    Lease,
    LeaseLost,
    Notice,
    QueuedMessage,
    QueuedRecipient,
    QueueFull,
    RecipientState,
    Selector,
)

__all__ = [
    "PURGE_BATCH",
    "PURGE_SECONDS",
    "Database",
    "Dialect",
    "RecentMessages",
    "Rows",
    "SQLQueue",
    "createSchema",
    "marks",
    "returnLeases",
    "storeOptions",
]

_T = TypeVar("_T")

READY = RecipientState.READY.value
LEASED = RecipientState.LEASED.value
HOLD = RecipientState.HOLD.value
ETRN = RecipientState.ETRN.value
CLEAR_LEASE = "lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
_RECIPIENT_COLUMNS = (
    "idx, attempts, next_attempt_at, warned, reply_code, reply_enhanced, reply_text, released, bounce"
)

PURGE_BATCH = 1000
"""The most expired shared-state rows one write deletes."""
PURGE_SECONDS = 60.0
"""How often expired shared-state rows are purged while none are left over."""


class Rows(Protocol):
    """
    What a statement returns: a DB-API cursor.
    """

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """
    The handle a transition runs on: an SQLite connection, or a PostgreSQL
    cursor that takes C{?} placeholders.
    """

    def execute(self, statement: str, params: Sequence[Any] = ..., /) -> Rows: ...

    def executemany(self, statement: str, rows: Iterable[Sequence[Any]], /) -> object: ...


@dataclass(frozen=True)
class Dialect:
    """
    What differs between the SQL dialects in the transitions' statements.

    @ivar lockRows: appended to a C{SELECT} whose rows the transaction
        will change: C{""} where one writer runs at a time (SQLite),
        C{" FOR UPDATE"} where transactions run side by side.
    @ivar skipLocked: appended to a claim's C{SELECT}, so that concurrent
        claims take different rows instead of waiting for each other.
    """

    lockRows: str = ""
    skipLocked: str = ""


def marks(values: Sequence[object]) -> str:
    """
    One C{?} per value, for C{IN (...)}.
    """
    return ", ".join("?" for _ in values)


def returnLeases(db: Database, condition: str, params: Sequence[Any]) -> int:
    """
    Return the leased recipients that match C{condition} (with C{params})
    to ready, clearing their leases; how many.
    """
    return db.execute(
        f"UPDATE recipients SET state = ?, {CLEAR_LEASE} WHERE state = ? AND {condition}",
        (READY, LEASED, *params),
    ).rowcount


def createSchema(
    db: Database, stored: int | None, statements: Iterable[str], newer: Callable[[str], Exception]
) -> None:
    """
    Bring the schema from version C{stored} (L{None}: none yet) to
    L{SCHEMA_VERSION} with C{statements}, in the caller's transaction and
    under its lock.  Every statement is safe to run again: creating version
    2 from nothing and migrating version 1 (which lacks C{shared_state})
    are the same.  A later migration that is not goes here, guarded by
    C{stored}.

    @raise Exception: C{newer(message)}, if a newer mailfw made the schema.
    """
    if stored is not None and stored > SCHEMA_VERSION:
        raise newer(f"the queue schema has version {stored}; this mailfw knows {SCHEMA_VERSION}")
    for statement in statements:
        db.execute(statement)
    if stored != SCHEMA_VERSION:
        db.execute("DELETE FROM mailfw_schema")
        db.execute("INSERT INTO mailfw_schema (version) VALUES (?)", (SCHEMA_VERSION,))


def storeOptions(section: Section) -> dict[str, Any]:
    """
    The options every SQL store's C{fromConfig} takes, as its keyword
    arguments: C{lease_seconds} (default 7200) and C{spill_threshold}
    (octets kept in memory per message while receiving; default 262144).
    """
    return {
        "leaseSeconds": section.number("lease_seconds", 7200.0, minimum=1),
        "spillThreshold": section.integer("spill_threshold", 256 * 1024, minimum=0),
    }


def _selected(selector: Selector) -> tuple[str, list[Any]]:
    """
    A condition selecting C{recipients} rows (unaliased, for UPDATE and
    DELETE) that match C{selector}.
    """
    where, params = selectorWhere(selector)
    return (
        "(message_id, idx) IN (SELECT r.message_id, r.idx FROM recipients r"
        f" JOIN messages m ON m.id = r.message_id WHERE {where})",
        params,
    )


def _queuedRecipient(envelope: Envelope, state: str, row: Sequence[Any]) -> QueuedRecipient:
    index, attempts, nextAttempt, warned, code, enhanced, text, released, bounce = row
    return QueuedRecipient(
        index=index,
        recipient=envelope.recipients[index],
        state=RecipientState(state),
        attempts=attempts,
        nextAttempt=nextAttempt,
        warned=bool(warned),
        lastReply=replyFromColumns(code, enhanced, text),
        released=bool(released),
        bounceRequested=bool(bounce),
    )


def _allFinal(dispositions: Sequence[Disposition], claimed: Sequence[int]) -> bool:
    """
    Whether C{dispositions} take every claimed recipient out of the queue
    (delivered or failed).
    """
    return (
        len(dispositions) == len(claimed)
        and all(not d.hold and not d.outcome.deferred for d in dispositions)
        and {d.index for d in dispositions} == set(claimed)
    )


class RecentMessages:
    """
    The envelopes and (small) bodies of recently committed messages, so
    that the common path (accept, then deliver at once) reads nothing back
    from the database: C{claim} takes the envelope from here and
    C{openBody} the bytes.  Bounded in bytes and entries (oldest evicted
    first); a miss falls back to the database.  Used from the writer and
    the reactor thread.
    """

    def __init__(self, maxBytes: int = 16 * 1024 * 1024, maxEntries: int = 10_000) -> None:
        self._entries: dict[str, tuple[Envelope, bytes]] = {}
        self._bytes = 0
        self._maxBytes = maxBytes
        self._maxEntries = maxEntries
        self._lock = threading.Lock()

    def add(self, queueID: str, envelope: Envelope, body: bytes) -> None:
        if len(body) > self._maxBytes:
            return
        with self._lock:
            old = self._entries.pop(queueID, None)
            if old is not None:
                self._bytes -= len(old[1])
            while self._entries and (
                self._bytes + len(body) > self._maxBytes or len(self._entries) >= self._maxEntries
            ):
                evicted = self._entries.pop(next(iter(self._entries)))
                self._bytes -= len(evicted[1])
            self._entries[queueID] = (envelope, body)
            self._bytes += len(body)

    def get(self, queueID: str) -> tuple[Envelope, bytes] | None:
        with self._lock:
            return self._entries.get(queueID)

    def discard(self, queueID: str) -> None:
        with self._lock:
            old = self._entries.pop(queueID, None)
            if old is not None:
                self._bytes -= len(old[1])


_COUNT = (
    "INSERT INTO shared_state (name, value, started, expires) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET"
    " value = CASE WHEN shared_state.expires <= ? THEN excluded.value"
    " ELSE shared_state.value + excluded.value END,"
    " started = CASE WHEN shared_state.expires <= ? THEN excluded.started ELSE shared_state.started END,"
    " expires = CASE WHEN shared_state.expires <= ? THEN excluded.expires ELSE shared_state.expires END"
)


@implementer(ISelectiveClaim)
class SQLQueue:
    """
    The transitions of L{mailfw.interfaces.IMessageQueue} and the whole of
    L{mailfw.interfaces.ISharedState} over an SQL store; see the module
    docstring for the seam a store supplies.

    @ivar leaseSeconds: how long a claim lasts.
    @ivar spillThreshold: bodies larger than this many octets are spilled to
        a temporary file while they arrive and read in pieces.
    """

    log = Logger()
    _dialect = Dialect()
    _recent: RecentMessages | None = None
    _reaper: LoopingCall | None = None

    def _startEngine(
        self,
        clock: IReactorTime,
        deliver: Callable[[Callable[[], None]], None] | None,
        *,
        ids: Callable[[], str],
        leaseSeconds: float,
        owner: str | None,
        spillThreshold: int,
        spoolDirectory: Path,
        spool: Executor | None,
    ) -> None:
        """
        Set up what every store has; stores call it from C{__init__}.

        @param deliver: calls a function on the reactor thread (default
            C{clock.callFromThread}).
        @param owner: the lease owner recorded in claimed rows (default:
            host name and process ID).
        @param spool: spills large bodies (default: a dedicated thread).
        """
        if deliver is None:
            if not IReactorFromThreads.providedBy(clock):
                raise TypeError("deliver is required when clock has no callFromThread")
            deliver = IReactorFromThreads(clock).callFromThread
        self._clock = clock
        self._deliver: Callable[[Callable[[], None]], None] = deliver
        self._ids = ids
        self.leaseSeconds = leaseSeconds
        self._owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.spillThreshold = spillThreshold
        self.spoolDirectory = spoolDirectory
        self._spool: Executor = spool or ThreadExecutor("mailfw-queue-spool")
        self._closed = False
        self._callbacks: list[Callable[[], None]] = []
        self._offers = LeaseOffers()
        self._purgeAt = 0.0

    # --- the seam -----------------------------------------------------------

    def _transact(self, function: Callable[[Database], _T], durable: bool = True) -> Deferred[_T]:
        """
        Run C{function} in a write transaction; fire with its result on the
        reactor thread after the C{COMMIT} (on disk first if C{durable}).
        """
        raise NotImplementedError()

    def _read(self, function: Callable[[Database], _T]) -> Deferred[_T]:
        """
        Run C{function} in a read transaction off the reactor thread; it
        sees what was committed before it began.
        """
        raise NotImplementedError()

    def _copyBody(self, db: Database, queueID: str, head: bytes, spooled: IO[bytes], size: int) -> None:
        """
        Store C{head} and then a spilled body, C{size} octets in all,
        without holding the body in memory.
        """
        raise NotImplementedError()

    def _store(
        self, message: NewMessage, lease: Lease | None, insert: Callable[[Database], str]
    ) -> Deferred[str]:
        """
        Run C{insert}, which stores C{message} (leased under C{lease}, if
        given), durably; a store may add its own care around the commit.
        """
        return self._transact(insert)

    @staticmethod
    def _isFull(error: BaseException) -> bool:
        """
        Whether C{error} is the store's way of saying it is full.
        """
        return False

    @classmethod
    def _translate(cls, error: BaseException) -> BaseException:
        """
        Turn a full store or spool disk into L{QueueFull}, so that the
        server answers 452.
        """
        if cls._isFull(error) or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
            return QueueFull(str(error))
        return error

    def _newToken(self) -> str:
        """
        A lease token no other lease of this queue has.
        """
        raise NotImplementedError()

    def _sparedOwners(self, db: Database, now: float, clockNow: float) -> tuple[str, Sequence[Any]]:
        """
        A condition on C{lease_owner} (with its parameters) that names the
        other live processes or nodes, whose leases unexpired by the clock
        L{recover} leaves alone.
        """
        raise NotImplementedError()

    def _reapDead(self, db: Database, now: float) -> int:
        """
        Called in L{recover}: return to ready the leases of owners known to
        be dead; how many.
        """
        return 0

    def _shutdown(self) -> Deferred[None]:
        """
        Close the store once the work under way is done (L{close} stopped
        the reaping already).
        """
        raise NotImplementedError()

    def _touch(self, db: Database, now: float) -> None:
        """
        Called first in every claim (PostgreSQL: the node's heartbeat).
        """

    def _wakeOthers(self, db: Database) -> None:
        """
        Called in a release, flush or bounce that changed rows: wake the
        other processes sharing the database (PostgreSQL: C{NOTIFY}).
        """

    def _largeBody(self, db: Database, queueID: str, size: int) -> IMessageBody:
        """
        A body larger than C{spillThreshold}, read in pieces (in the read
        transaction of L{openBody}).
        """
        raise NotImplementedError()

    def _beginSnapshot(self, db: Database) -> None:
        """
        Called first in L{openBody}'s read transaction: make it see one
        snapshot throughout (where that is not the default).
        """

    def _insertMessageRow(self, db: Database, queueID: str, envelope: Envelope, size: int) -> bool:
        """
        Insert the C{messages} row; C{False} if this very message is stored
        already (a store whose commits are retried makes that idempotent).
        """
        db.execute(
            INSERT_MESSAGE, (queueID, envelope.senderText, envelopeToJSON(envelope), size, envelope.arrival)
        )
        return True

    # --- waking the scheduler ---------------------------------------------------

    def notifyDue(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _notify(self, result: _T) -> _T:
        for callback in list(self._callbacks):
            callback()
        return result

    def _notifyIf(self, count: int) -> int:
        if count:
            self._notify(None)
        return count

    # --- recovery and closing ---------------------------------------------------

    def recover(self, now: float) -> Deferred[int]:
        """
        Return to ready the leases that expire by C{now}, except those of
        another live owner (L{_sparedOwners}) that are unexpired by the
        clock: the scheduler's start-up passes an infinite C{now}, and must
        not take what a sibling process or another node is delivering.
        """
        clockNow = self._clock.seconds()

        def recover(db: Database) -> int:
            spared, params = self._sparedOwners(db, now, clockNow)
            condition = f"lease_expires <= ? AND NOT (lease_expires > ? AND {spared})"
            return returnLeases(db, condition, (now, clockNow, *params)) + self._reapDead(db, clockNow)

        return self._transact(recover).addCallback(self._notifyIf)

    def _startReaping(self, reap: Callable[[], Deferred[Any]], interval: float, now: bool) -> None:
        """
        Call C{reap} (the store's return of dead owners' leases) every
        C{interval} seconds until L{close}.
        """
        self._reaper = LoopingCall(reap)
        self._reaper.clock = self._clock
        self._reaper.start(interval, now=now).addErrback(
            lambda f: self.log.failure("reaping leases failed", f)
        )

    def close(self) -> Deferred[None]:
        """
        Stop reaping, then let the store finish the work under way and
        close (L{_shutdown}).
        """
        if self._closed:
            return fail(RuntimeError("the queue is already closed"))
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        return self._shutdown()

    # --- receiving ------------------------------------------------------------

    def receive(self, envelope: Envelope) -> IIncomingMessage:
        return SpoolingIncoming(self, self._ids(), envelope, self._translate)

    def offerNew(self, room: Callable[[], int], take: Callable[[Lease], None]) -> None:
        self._offers.register(room, take)

    def _insertMessage(self, message: NewMessage) -> Deferred[str]:
        envelope = message.envelope
        expires = message.now + self.leaseSeconds
        lease = (
            None
            if message.hold
            else self._offers.leaseFor(
                message.queueID, envelope, message.now, message.size, self._newToken(), expires
            )
        )
        recent = self._recent

        def insert(db: Database) -> str:
            self._insert(message, lease, db)
            if recent is not None and message.body is not None and envelope.recipients:
                # Harmless if the transaction then fails: only rows that
                # exist are ever claimed.
                recent.add(message.queueID, envelope, message.body)
            return message.queueID

        d = self._store(message, lease, insert)
        spooled = message.spooled
        if spooled is not None:
            # Done with the spilled body, stored or not.
            def closeSpool(result: _T) -> _T:
                self._spool.submit(spooled.close)
                return result

            d.addBoth(closeSpool)
        if lease is not None:
            return d.addCallbacks(
                self._handLater, self._offers.withdraw, callbackArgs=(lease,), errbackArgs=(lease,)
            )
        return d.addCallback(self._notify) if envelope.recipients else d

    def _handLater(self, queueID: str, lease: Lease) -> str:
        """
        Hand a committed message's lease to the scheduler on the reactor's
        next turn (through C{deliver}, Twisted's C{callFromThread}, which
        runs what the reactor thread itself queues only after the next
        poll), not in this callback chain: the session's 250 then goes out
        before delivery starts, instead of waiting for the scheduler to
        route, deliver (the discard agent delivers at once) and log.
        """

        def hand() -> None:
            self._offers.hand(queueID, lease)

        self._deliver(hand)
        return queueID

    def _insert(self, message: NewMessage, lease: Lease | None, db: Database) -> str:
        """
        Insert one message: its row, its body and its recipient rows (leased
        to this process under C{lease}, if given).
        """
        queueID, envelope, size = message.queueID, message.envelope, message.size
        if not envelope.recipients or not self._insertMessageRow(db, queueID, envelope, size):
            return queueID
        if message.spooled is None:
            db.execute(
                "INSERT INTO message_bodies (message_id, body) VALUES (?, ?)", (queueID, message.body or b"")
            )
        else:
            self._copyBody(db, queueID, message.head, message.spooled, size)
        if message.hold:
            state = RecipientState.HOLD
        else:
            state = RecipientState.READY if lease is None else RecipientState.LEASED
        rows = recipientRows(queueID, envelope, message.now, state)
        if lease is None:
            db.executemany(INSERT_RECIPIENT, list(rows))
        else:
            db.executemany(
                INSERT_LEASED_RECIPIENT, [(*row, lease.token, self._owner, lease.expires) for row in rows]
            )
        return queueID

    # --- the scheduler's side ---------------------------------------------------

    def claimMatching(self, selector: Selector, now: float, limit: int) -> Deferred[Sequence[Lease]]:
        return self.claim(now, limit, selector)

    def claim(self, now: float, limit: int, selector: Selector | None = None) -> Deferred[Sequence[Lease]]:
        expires = now + self.leaseSeconds
        owner, skipLocked = self._owner, self._dialect.skipLocked

        def claim(db: Database) -> Sequence[Lease]:
            self._touch(db, now)
            if selector is not None:
                query, params = matchingClaim(f"message_id, {_RECIPIENT_COLUMNS}", selector, limit)
                rows = db.execute(query + skipLocked, params).fetchall()
            else:
                rows = db.execute(
                    f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipients WHERE state IN (?, ?)"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, message_id, idx LIMIT ?"
                    + skipLocked,
                    (READY, ETRN, now, max(limit, 0)),
                ).fetchall()
            if len(rows) < limit and selector is None:
                rows += db.execute(
                    f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipients WHERE state = ?"
                    " AND lease_expires <= ? ORDER BY lease_expires, message_id, idx LIMIT ?" + skipLocked,
                    (LEASED, now, limit - len(rows)),
                ).fetchall()
            chosen: dict[str, list[Sequence[Any]]] = {}
            for row in rows:
                chosen.setdefault(row[0], []).append(row[1:])
            envelopes: dict[str, tuple[Envelope, int]] = {}
            for queueID in chosen:
                cached = None if self._recent is None else self._recent.get(queueID)
                if cached is not None:
                    envelopes[queueID] = (cached[0], len(cached[1]))
            missing = [queueID for queueID in chosen if queueID not in envelopes]
            if missing:
                for queueID, text, size in db.execute(
                    f"SELECT id, envelope, size FROM messages WHERE id IN ({marks(missing)})", missing
                ):
                    envelopes[queueID] = (envelopeFromJSON(text), size)
            leases = []
            for queueID, group in chosen.items():
                group.sort(key=lambda row: row[0])
                indexes = [row[0] for row in group]
                token = self._newToken()
                db.execute(
                    "UPDATE recipients SET state = ?, lease_token = ?, lease_owner = ?,"
                    f" lease_expires = ? WHERE message_id = ? AND idx IN ({marks(indexes)})",
                    (LEASED, token, owner, expires, queueID, *indexes),
                )
                envelope, size = envelopes[queueID]
                recipients = tuple(_queuedRecipient(envelope, LEASED, row) for row in group)
                leases.append(Lease(queueID, envelope, recipients, token, expires, size))
            return leases

        return self._transact(claim, durable=False)

    def record(
        self, lease: Lease, dispositions: Sequence[Disposition], notices: Sequence[Notice] = ()
    ) -> Deferred[None]:
        now = self._clock.seconds()
        noticeIDs = [self._ids() for _ in notices]
        lockRows = self._dialect.lockRows
        queueID = lease.queueID
        claimed = [r.index for r in lease.recipients]

        def record(db: Database) -> bool:
            if not notices and _allFinal(dispositions, claimed):
                # The common case: the lease token fences the delete, and a
                # short count means the lease was lost (the transaction or
                # savepoint then undoes the partial delete).  Locking the
                # message row makes records of one message take turns: two
                # nodes recording its last recipients at once would
                # otherwise each see the other's row and leave the message
                # behind with none.
                if lockRows:
                    db.execute("SELECT 1 FROM messages WHERE id = ?" + lockRows, (queueID,))
                deleted = db.execute(
                    "DELETE FROM recipients WHERE message_id = ? AND state = ?"
                    f" AND lease_token = ? AND idx IN ({marks(claimed)})",
                    (queueID, LEASED, lease.token, *claimed),
                ).rowcount
                if deleted != len(claimed):
                    raise LeaseLost(queueID)
                self._dropIfDone(db, [queueID])
                return False
            rows = db.execute(
                "SELECT r.idx, r.state, r.lease_token FROM recipients r JOIN messages m ON m.id = r.message_id"
                f" WHERE r.message_id = ? AND r.idx IN ({marks(claimed)})" + lockRows,
                (queueID, *claimed),
            ).fetchall()
            if len(rows) != len(claimed) or any(
                state != LEASED or token != lease.token for _, state, token in rows
            ):
                raise LeaseLost(queueID)
            decided = {d.index: d for d in dispositions}
            unknown = set(decided) - set(claimed)
            if unknown:
                raise ValueError(f"recipients {sorted(unknown)} are not in the lease")
            undecided = [index for index in claimed if index not in decided]
            if undecided:
                db.execute(
                    f"UPDATE recipients SET state = ?, {CLEAR_LEASE}"
                    f" WHERE message_id = ? AND idx IN ({marks(undecided)})",
                    (READY, queueID, *undecided),
                )
            gone = []
            for index, disposition in decided.items():
                if disposition.hold or disposition.outcome.deferred:
                    db.execute(
                        "UPDATE recipients SET state = ?, attempts = attempts + ?,"
                        " next_attempt_at = COALESCE(?, next_attempt_at),"
                        " warned = CASE WHEN ? = 1 THEN 1 ELSE warned END,"
                        " reply_code = ?, reply_enhanced = ?, reply_text = ?,"
                        " route = COALESCE(?, route), released = CASE WHEN ? = 1 THEN released ELSE 0 END,"
                        f" {CLEAR_LEASE} WHERE message_id = ? AND idx = ?",
                        (
                            ETRN if disposition.hold else READY,
                            int(disposition.counted),
                            disposition.nextAttempt,
                            int(disposition.warned),
                            *replyColumns(disposition.outcome.reply),
                            disposition.route,
                            int(disposition.keepsRelease),
                            queueID,
                            index,
                        ),
                    )
                else:
                    gone.append(index)
            if gone:
                db.execute(
                    f"DELETE FROM recipients WHERE message_id = ? AND idx IN ({marks(gone)})",
                    (queueID, *gone),
                )
                if len(gone) == len(claimed):
                    self._dropIfDone(db, [queueID])
            for noticeID, notice in zip(noticeIDs, notices, strict=True):
                envelope = notice.envelope
                if not envelope.arrival:
                    envelope = replace(envelope, arrival=now)
                if envelope.size is None:
                    envelope = replace(envelope, size=len(notice.body))
                self._insert(
                    NewMessage(noticeID, envelope, now, notice.body, None, len(notice.body)), None, db
                )
            return bool(notices) or bool(undecided)

        def done(wake: bool) -> None:
            if wake:
                self._notify(None)

        return self._transact(record, durable=False).addCallback(done)

    def _dropIfDone(self, db: Database, queueIDs: Sequence[str]) -> None:
        """
        Delete the messages among C{queueIDs} that have no recipients left.
        """
        db.execute(
            f"DELETE FROM message_bodies WHERE message_id IN ({marks(queueIDs)}) AND NOT EXISTS"
            " (SELECT 1 FROM recipients r WHERE r.message_id = message_bodies.message_id)",
            queueIDs,
        )
        gone = db.execute(
            f"DELETE FROM messages WHERE id IN ({marks(queueIDs)}) AND NOT EXISTS"
            " (SELECT 1 FROM recipients r WHERE r.message_id = messages.id) RETURNING id",
            queueIDs,
        ).fetchall()
        if gone and self._recent is not None:
            for (queueID,) in gone:
                self._recent.discard(queueID)

    def openBody(self, queueID: str) -> Deferred[IMessageBody]:
        cached = None if self._recent is None else self._recent.get(queueID)
        if cached is not None:
            return succeed(MemoryBody(cached[1]))

        def find(db: Database) -> IMessageBody:
            self._beginSnapshot(db)
            row = db.execute("SELECT size FROM messages WHERE id = ?", (queueID,)).fetchone()
            if row is None:
                raise KeyError(queueID)
            if row[0] > self.spillThreshold:
                return self._largeBody(db, queueID, row[0])
            body = db.execute("SELECT body FROM message_bodies WHERE message_id = ?", (queueID,)).fetchone()
            if body is None:
                raise KeyError(queueID)
            return MemoryBody(bytes(body[0]))

        return self._read(find)

    def nextDue(self) -> Deferred[float | None]:
        def nextDue(db: Database) -> float | None:
            row = db.execute(
                "SELECT (SELECT MIN(next_attempt_at) FROM recipients WHERE state IN (?, ?)),"
                " (SELECT MIN(lease_expires) FROM recipients WHERE state = ?)",
                (READY, ETRN, LEASED),
            ).fetchone()
            times = [t for t in row if t is not None]
            return min(times) if times else None

        return self._read(nextDue)

    # --- the operator's side ----------------------------------------------------

    def list(self, selector: Selector) -> Deferred[Sequence[QueuedMessage]]:
        where, params = selectorWhere(selector)

        def list_(db: Database) -> Sequence[QueuedMessage]:
            rows = db.execute(
                "SELECT m.id, m.envelope, m.size, r.state, r.idx, r.attempts,"
                " r.next_attempt_at, r.warned, r.reply_code, r.reply_enhanced, r.reply_text,"
                " r.released, r.bounce FROM recipients r JOIN messages m ON m.id = r.message_id"
                f" WHERE {where} ORDER BY m.arrival, m.id, r.idx",
                params,
            ).fetchall()
            found: list[tuple[str, Envelope, int, list[QueuedRecipient]]] = []
            for row in rows:
                queueID, envelopeText, size, state = row[:4]
                if not found or found[-1][0] != queueID:
                    found.append((queueID, envelopeFromJSON(envelopeText), size, []))
                found[-1][3].append(_queuedRecipient(found[-1][1], state, row[4:]))
            return [QueuedMessage(q, e, s, tuple(r)) for q, e, s, r in found]

        return self._read(list_)

    def _update(self, selector: Selector, change: str, params: Sequence[Any], wake: bool) -> Deferred[int]:
        """
        Change the selected recipients: C{change} is C{SET ... WHERE ...}
        (its C{?}s take C{params}), the selector's condition is added; when
        C{wake}, a change wakes every scheduler.
        """
        condition, selected = _selected(selector)

        def update(db: Database) -> int:
            count = db.execute(
                f"UPDATE recipients SET {change} AND {condition}", (*params, *selected)
            ).rowcount
            if count and wake:
                self._wakeOthers(db)
            return count

        d = self._transact(update)
        return d.addCallback(self._notifyIf) if wake else d

    def hold(self, selector: Selector) -> Deferred[int]:
        return self._update(selector, "state = ? WHERE state IN (?, ?)", (HOLD, READY, ETRN), False)

    def release(self, selector: Selector) -> Deferred[int]:
        now = self._clock.seconds()
        return self._update(
            selector, "state = ?, next_attempt_at = ? WHERE state = ?", (READY, now, HOLD), True
        )

    def flush(self, selector: Selector) -> Deferred[int]:
        now = self._clock.seconds()
        return self._update(
            selector,
            "state = ?, released = 1, next_attempt_at ="
            " CASE WHEN next_attempt_at > ? THEN ? ELSE next_attempt_at END WHERE state IN (?, ?)",
            (READY, now, now, READY, ETRN),
            True,
        )

    def bounce(self, selector: Selector) -> Deferred[int]:
        now = self._clock.seconds()
        return self._update(
            selector,
            "state = ?, bounce = 1, next_attempt_at = ? WHERE state IN (?, ?, ?)",
            (READY, now, READY, HOLD, ETRN),
            True,
        )

    def delete(self, selector: Selector) -> Deferred[int]:
        condition, params = _selected(selector)

        def delete(db: Database) -> int:
            affected = [
                row[0]
                for row in db.execute(
                    f"DELETE FROM recipients WHERE {condition} RETURNING message_id", params
                )
            ]
            if affected:
                self._dropIfDone(db, sorted(set(affected)))
            return len(affected)

        return self._transact(delete)

    # --- shared state (ISharedState) ----------------------------------------------

    def count(self, key: str, amount: int, window: float, now: float) -> Deferred[int]:
        if amount == 0:
            return self._read(
                lambda db: int(
                    (
                        db.execute(
                            "SELECT value FROM shared_state WHERE name = ? AND expires > ?", (key, now)
                        ).fetchone()
                        or (0,)
                    )[0]
                )
            )
        return self._shared(_COUNT + " RETURNING value", (key, amount, now, now + window, now, now, now), now)

    def mark(self, key: str, lifetime: float, now: float) -> Deferred[float]:
        return self._shared(
            "INSERT INTO shared_state (name, value, started, expires) VALUES (?, 0, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET"
            " started = CASE WHEN shared_state.expires <= ? THEN excluded.started ELSE shared_state.started END,"
            " expires = CASE WHEN shared_state.expires <= ? THEN excluded.expires ELSE shared_state.expires END"
            " RETURNING started",
            (key, now, now + lifetime, now, now),
            now,
        )

    def forget(self, key: str) -> Deferred[None]:
        def forget(db: Database) -> None:
            db.execute("DELETE FROM shared_state WHERE name = ?", (key,))

        return self._transact(forget, durable=False)

    def _shared(self, statement: str, params: Sequence[Any], now: float) -> Deferred[Any]:
        """
        Run one shared-state upsert and return its one value, purging a
        batch of expired rows first when that is due.
        """
        purge = now >= self._purgeAt
        if purge:
            self._purgeAt = now + PURGE_SECONDS

        def upsert(db: Database) -> tuple[Any, int]:
            purged = 0
            if purge:
                purged = db.execute(
                    "DELETE FROM shared_state WHERE name IN"
                    " (SELECT name FROM shared_state WHERE expires <= ? LIMIT ?)",
                    (now, PURGE_BATCH),
                ).rowcount
            return db.execute(statement, params).fetchone()[0], purged

        def done(result: tuple[Any, int]) -> Any:
            value, purged = result
            if purged >= PURGE_BATCH:
                self._purgeAt = 0.0  # more are waiting: purge with the next write
            return value

        return self._transact(upsert, durable=False).addCallback(done)
