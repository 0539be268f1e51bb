"""
The session's input: one buffer walked with an offset, cut into command
lines or handed on as raw octets (DATA, BDAT), and paused for as long as
any reason holds (a reply that a later command depends on, a policy
deciding on the header section, a full write buffer).

The framer is the session's own (no private L{LineReceiver} state): it
answers an over-long line once and skips it to its CRLF, never lets a
line's tail be read as a new command, and when called again from inside
its loop (a reply resumed input) only appends, so the running loop reads
on in order.  Input held while paused is limited: a client that sends on
and on without reading the replies is cut off.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from zope.interface import implementer

from mailfw.smtp._state import ConnectionState

__all__ = ["MAX_UNREAD", "FramingOwner", "InputFramer"]

# How much unprocessed input is held while processing is paused and the
# transport keeps reading (TLS with a full write buffer).
MAX_UNREAD = 1024 * 1024


class FramingOwner(Protocol):
    """
    What an L{InputFramer} needs from its session.
    """

    state: ConnectionState
    """The connection's lifecycle: once C{state.closing} is set input is dropped."""

    def lineReceived(self, line: bytes) -> None:
        """
        One command line, without its CRLF.
        """

    def rawDataReceived(self, data: bytes) -> None:
        """
        Octets while L{InputFramer.raw} is set.  What belongs to the next
        command goes back with L{InputFramer.unread}.
        """

    def lineTooLong(self) -> None:
        """
        A line without CRLF within L{InputFramer.lineLimit}: refuse it (it
        is skipped up to its CRLF).
        """

    def overrun(self) -> None:
        """
        More than L{MAX_UNREAD} octets arrived while paused: drop the
        client.
        """


_NO_REASONS: frozenset[str] = frozenset()


@implementer(IPushProducer)
class InputFramer:
    """
    The input state of one session.

    @ivar raw: hand octets to L{FramingOwner.rawDataReceived} instead of
        cutting lines (DATA and BDAT).
    @ivar lineLimit: the longest line, in octets including CRLF.
    @ivar reasons: why input is paused now (read only; a new frozenset on
        every change, so that an idle session shares the empty one instead
        of holding a set of its own: 10,000 idle sessions are the memory
        benchmark).
    """

    __slots__ = (
        "_buffer",
        "_discarding",
        "_offset",
        "_owner",
        "_paused",
        "_receiving",
        "_transport",
        "_transportPaused",
        "lineLimit",
        "raw",
        "reasons",
    )

    def __init__(self, owner: FramingOwner, lineLimit: int) -> None:
        self._owner = owner
        self.lineLimit = lineLimit
        self.raw = False
        self.reasons: frozenset[str] = _NO_REASONS
        self._transport: Any = None
        self._buffer = b""
        self._offset = 0
        self._discarding = False
        self._receiving = False
        self._paused = False
        self._transportPaused = False

    def attach(self, transport: Any) -> None:
        """
        Read from C{transport} (whose reading L{pause} stops).
        """
        self._transport = transport

    def feed(self, data: bytes) -> None:
        """
        Take C{data} from the transport (C{b""}: read on after a pause).
        """
        if self._receiving:
            self._buffer += data
            return
        if self._paused and len(self._buffer) - self._offset + len(data) > MAX_UNREAD:
            # Sending on and on without reading our replies (see
            # _syncTransport): no more buffering.
            self._owner.overrun()
            return
        owner = self._owner
        self._receiving = True
        try:
            if self._offset:
                self._buffer = self._buffer[self._offset :]
                self._offset = 0
            if data:
                self._buffer += data
            while not self._paused and not owner.state.closing and self._offset < len(self._buffer):
                if not self.raw:
                    if not self._nextLine():
                        break
                else:
                    chunk = self._buffer[self._offset :] if self._offset else self._buffer
                    self._buffer, self._offset = b"", 0
                    owner.rawDataReceived(chunk)
        finally:
            self._receiving = False
            if self._offset:
                self._buffer = self._buffer[self._offset :]
                self._offset = 0

    def _nextLine(self) -> bool:
        """
        Take one line from the buffer, if there is a whole one.
        """
        buf, start = self._buffer, self._offset
        limit = self.lineLimit - 2
        if self._discarding:
            end = buf.find(b"\r\n", start)
            if end < 0:
                # Keep a final CR: it may begin the CRLF that ends the line.
                self._buffer = b"\r" if buf.endswith(b"\r") else b""
                self._offset = 0
                return False
            self._discarding = False
            self._offset = end + 2
            return True
        end = buf.find(b"\r\n", start, start + limit + 2)
        if end < 0:
            if len(buf) - start > limit + 1:
                # No CRLF within the limit: refuse now, skip to the CRLF.
                self._discarding = True
                self._owner.lineTooLong()
                return True
            return False
        self._offset = end + 2
        self._owner.lineReceived(buf[start:end])
        return True

    def unread(self, data: bytes) -> None:
        """
        Put back octets the raw reader did not take: they come next.
        """
        self._buffer = data + self._buffer[self._offset :]
        self._offset = 0

    def hasUnread(self) -> bool:
        """
        Whether input follows the line being handled (it was pipelined).
        """
        return self._offset < len(self._buffer)

    def clear(self) -> bytes:
        """
        Drop and return everything received but not yet handled.
        """
        data = self._buffer[self._offset :]
        self._buffer, self._offset = b"", 0
        return data

    def pause(self, reason: str) -> None:
        """
        Stop handling input until L{unpause} with every reason given.
        """
        self.reasons = self.reasons | {reason}
        self._paused = True
        self._syncTransport()

    def unpause(self, reason: str) -> None:
        """
        C{reason} no longer holds; read on if no other does.
        """
        if reason not in self.reasons:
            return
        self.reasons = self.reasons - {reason}
        if self.reasons or self._owner.state.closing:
            self._syncTransport()
            return
        self._paused = False
        self._syncTransport()
        self.feed(b"")

    def pauseProducing(self) -> None:
        """
        C{IPushProducer}: the transport's write buffer is full, so stop
        reading commands.
        """
        self.pause("write")

    def resumeProducing(self) -> None:
        """
        C{IPushProducer}: the write buffer has drained; read on.
        """
        self.unpause("write")

    def stopProducing(self) -> None:
        """
        C{IPushProducer}: the transport is going away (the session's
        C{connectionLost} cleans up).
        """
        self.pause("stopped")

    def stop(self) -> None:
        """
        The session hangs up: handle no more input, but let the transport
        read, since a TLS transport must read to see the peer's
        close_notify or EOF (what it reads is dropped).
        """
        self._paused = True
        if self._transportPaused and self._transport is not None:
            self._transportPaused = False
            self._transport.resumeProducing()

    def _syncTransport(self) -> None:
        """
        Stop or resume reading from the transport to match the pause
        reasons.  A full write buffer of a TLS transport does not stop
        reading: TLS may need to read before it can write (the handshake of
        an implicit-TLS session starts with the greeting buffered), so
        stopping would deadlock.  Input is then held in our buffer instead,
        up to L{MAX_UNREAD} octets.
        """
        transport = self._transport
        if self._owner.state.closing or transport is None:
            return
        reasons = self.reasons
        if "write" in reasons and ISSLTransport.providedBy(transport):
            reasons = reasons - {"write"}
        want = bool(reasons)
        if want != self._transportPaused:
            self._transportPaused = want
            if want:
                transport.pauseProducing()
            else:
                transport.resumeProducing()
