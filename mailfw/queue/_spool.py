"""
Receiving a message into an SQL queue: small bodies stay in memory, large
ones are spilled to an unlinked temporary file as they arrive, so that a
35 MiB message never has to fit in memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.envelope import Envelope
from mailfw.interfaces import IIncomingMessage
from mailfw.queue._io import Executor
from mailfw.queued import Lease, QueuedRecipient, RecipientState

__all__ = ["SPOOL_BATCH", "Executor", "LeaseOffers", "NewMessage", "SpoolingIncoming", "SpoolingQueue"]

# Spilled bodies are handed to the spool thread in batches of this size.
SPOOL_BATCH = 256 * 1024


class LeaseOffers:
    """
    The queue's side of L{mailfw.interfaces.ILeaseOffers}, for the SQL
    queues to share: whether a new message is stored leased, its lease,
    and handing it over.
    """

    log = Logger()

    def __init__(self) -> None:
        self._room: Callable[[], int] | None = None
        self._take: Callable[[Lease], None] | None = None
        self._committing = 0

    def register(self, room: Callable[[], int], take: Callable[[Lease], None]) -> None:
        self._room, self._take = room, take

    def leaseFor(
        self, queueID: str, envelope: Envelope, now: float, size: int, token: str, expires: float
    ) -> Lease | None:
        """
        The lease to store a new message under (with C{token}, until
        C{expires}), or L{None} to store it ready: nobody takes offers, or
        the taker has no room for all its recipients besides those of the
        leased messages still committing (a group commit holds many).
        Pass the commit's outcome to L{hand} or L{withdraw}.
        """
        count = len(envelope.recipients)
        if self._room is None or not count or self._room() - self._committing < count:
            return None
        self._committing += count
        recipients = tuple(
            QueuedRecipient(index, recipient, RecipientState.LEASED, 0, now)
            for index, recipient in enumerate(envelope.recipients)
        )
        return Lease(queueID, envelope, recipients, token, expires, size)

    def hand(self, queueID: str, lease: Lease) -> str:
        """
        Give the taker C{lease}, once its message is committed (a callback
        on the commit's L{Deferred}): a failing taker must not turn the
        client's 250 into an error, and the lease is recovered anyway.
        """
        assert self._take is not None
        self._committing -= len(lease.recipients)
        try:
            self._take(lease)
        except Exception:
            self.log.failure("handing {queueID} to the scheduler failed", queueID=queueID)
        return queueID

    def withdraw(self, failure: Failure, lease: Lease) -> Failure:
        """
        The commit of C{lease}'s message failed (an errback): its room is
        free again.
        """
        self._committing -= len(lease.recipients)
        return failure


@dataclass(frozen=True)
class NewMessage:
    """
    A received message on its way into an SQL store: its body is in
    memory (C{body}) or spilled to an unlinked file (C{spooled}, stored
    after C{head}).

    @ivar size: the whole message's size, C{head} included.
    @ivar hold: store the recipients held (quarantine).
    """

    queueID: str
    envelope: Envelope
    now: float
    body: bytes | None
    spooled: IO[bytes] | None
    size: int
    head: bytes = b""
    hold: bool = False


class SpoolingQueue(Protocol):
    """
    What L{SpoolingIncoming} needs from its queue.
    """

    spillThreshold: int
    spoolDirectory: Path
    _spool: Executor
    _clock: IReactorTime

    def _deliver(self, call: Callable[[], None]) -> None:
        """
        Call C{call} on the reactor thread.
        """

    def _insertMessage(self, message: NewMessage) -> Deferred[str]:
        """
        Store C{message} durably; if it was spilled, close its file once
        it is no longer needed.
        """


@implementer(IIncomingMessage)
class SpoolingIncoming:
    """
    A message being received: in memory while small, then spilled to an
    unlinked temporary file by the queue's spool thread.  The SQL queues
    share it; each inserts the result its own way (L{SpoolingQueue}).
    """

    def __init__(
        self,
        queue: SpoolingQueue,
        queueID: str,
        envelope: Envelope,
        translate: Callable[[BaseException], BaseException],
    ) -> None:
        self.queueID = queueID
        self._queue = queue
        self._envelope = envelope
        self._translate = translate
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._finished = False
        # Spill state; _file and _error are touched only by spool jobs until
        # the spool hands over to the writer.
        self._spilling = False
        self._file: IO[bytes] | None = None
        self._error: BaseException | None = None

    def write(self, data: bytes) -> None:
        if self._finished:
            raise ValueError("write after commit or abort")
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._size += len(data)
        if self._spilling:
            if self._buffered >= SPOOL_BATCH:
                self._spill()
        elif self._buffered > self._queue.spillThreshold:
            self._spilling = True
            self._spill()

    def _spill(self) -> None:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        directory = self._queue.spoolDirectory

        def job() -> None:
            if self._error is not None:
                return
            try:
                if self._file is None:
                    self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (kept open)
                for chunk in chunks:
                    self._file.write(chunk)
            except BaseException as e:
                self._error = e

        self._queue._spool.submit(job)

    def rewind(self) -> None:
        if self._finished:
            raise ValueError("rewind after commit or abort")
        self._chunks, self._buffered, self._size = [], 0, 0
        if self._spilling:
            self._spilling = False

            def forget() -> None:
                self._closeFile()
                self._error = None

            self._queue._spool.submit(forget)

    def commit(
        self, header: bytes = b"", envelope: Envelope | None = None, hold: bool = False
    ) -> Deferred[str]:
        if self._finished:
            return fail(ValueError("commit after commit or abort"))
        self._finished = True
        envelope = envelope or self._envelope
        now = self._queue._clock.seconds()
        size = len(header) + self._size
        if not envelope.arrival:
            envelope = replace(envelope, arrival=now)
        if envelope.size is None:
            envelope = replace(envelope, size=size)
        if not self._spilling:
            body = b"".join([header, *self._chunks])
            self._chunks = []
            return self._queue._insertMessage(
                NewMessage(self.queueID, envelope, now, body, None, size, hold=hold)
            )
        self._spill()
        ready: Deferred[IO[bytes]] = Deferred()

        def handOver() -> None:
            error, spooled = self._error, self._file
            if error is None and spooled is not None:
                try:
                    spooled.flush()
                except BaseException as e:
                    error = e
            if error is not None:
                self._closeFile()
                self._queue._deliver(lambda: ready.errback(Failure(self._translate(error))))
            else:
                assert spooled is not None
                self._queue._deliver(lambda: ready.callback(spooled))

        self._queue._spool.submit(handOver)
        return ready.addCallback(
            lambda spooled: self._queue._insertMessage(
                NewMessage(self.queueID, envelope, now, None, spooled, size, header, hold)
            )
        )

    def _closeFile(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def abort(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._chunks = []
        if self._spilling:
            self._queue._spool.submit(self._closeFile)
