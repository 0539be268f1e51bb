"""
Decoders for message text as it arrives after DATA or BDAT: pure, and
working on whole chunks with C{bytes} methods rather than one Python call
per line (ARCHITECTURE.md, "Where the time goes").

Both decoders also watch the line structure: a lone CR or LF anywhere in the
text, or a line longer than the text line limit, is noted, never repaired,
so the server can refuse the message once it has read it to its real end
(the policy of chasquid's C{dotreader.go}).
"""

from __future__ import annotations

__all__ = ["ChunkReader", "DotReader"]

_END = b"\r\n.\r\n"


class _LineChecker:
    """
    Notes lone CR or LF and over-long lines in a stream of text given as
    consecutive segments that never split a CRLF pair.

    One C{splitlines} (which for bytes breaks at CR, LF and CRLF) serves
    both checks: the text has no lone CR or LF exactly when every line
    break is two octets long, and the longest line is the longest part.
    """

    def __init__(self, maxTextLine: int) -> None:
        self._limit = maxTextLine - 2 if maxTextLine else 0  # octets before CRLF
        self._run = 0
        self.bareLineEnding = False
        self.lineTooLong = False

    def check(self, segment: bytes) -> None:
        if not segment:
            return
        lengths = list(map(len, segment.splitlines()))
        endsWithBreak = segment[-1] in (10, 13)
        breaks = len(lengths) if endsWithBreak else len(lengths) - 1
        if not self.bareLineEnding and len(segment) - sum(lengths) != 2 * breaks:
            self.bareLineEnding = True
        limit = self._limit
        if not limit or self.lineTooLong:
            return
        if not breaks:
            self._run += lengths[0]
        else:
            complete = lengths[1:breaks]
            if self._run + lengths[0] > limit or (complete and max(complete) > limit):
                self.lineTooLong = True
            self._run = 0 if endsWithBreak else lengths[-1]
        if self._run > limit:
            self.lineTooLong = True


class DotReader:
    """
    Decode the text after DATA (RFC 5321 4.5.2): only CRLF.CRLF ends it, and
    a leading dot is removed from every line.

    The reader keeps back at most four octets between calls: a suffix that
    could begin the end marker.  Everything before it is decoded at once,
    so dot-stuffing and the end marker are never split across chunks.

    @ivar bareLineEnding: a CR not followed by LF, or an LF not preceded by
        CR, was seen.  Sequences such as C{<LF>.<LF>} or C{<CR>.<CR>} do
        not end the data; they set this flag.
    @ivar lineTooLong: a line was longer than the limit.
    """

    def __init__(self, maxTextLine: int = 0) -> None:
        # The CRLF that ended the DATA command counts as the start of the
        # first line, so ".\r\n" at once is an empty message and a dot at the
        # very start is unstuffed like any other.
        self._tail = b"\r\n"
        self._first = True
        self._checker = _LineChecker(maxTextLine)
        self.done = False

    @property
    def bareLineEnding(self) -> bool:
        return self._checker.bareLineEnding

    @property
    def lineTooLong(self) -> bool:
        return self._checker.lineTooLong

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        Decode the next chunk.

        @return: the decoded text that is now certain, and C{None} while the
            end has not been seen; once it has, the octets that followed the
            end marker (the next commands).
        """
        if self.done:
            raise RuntimeError("data already ended")
        buf = self._tail + data if self._tail else data
        # One search serves both purposes: without CRLF "." there is neither
        # an end marker nor a stuffed dot in this chunk.
        dot = buf.find(b"\r\n.")
        if dot >= 0:
            end = buf.find(_END, dot)
            if end >= 0:
                self._tail = b""
                self.done = True
                return self._decode(buf[: end + 2], True), buf[end + 5 :]
        for keep in (4, 3, 2, 1):
            if buf.endswith(_END[:keep]):
                self._tail = buf[-keep:]
                segment = buf[:-keep]
                break
        else:
            self._tail = b""
            segment = buf
        return self._decode(segment, 0 <= dot < len(segment)), None

    def _decode(self, segment: bytes, stuffed: bool) -> bytes:
        if not segment:
            return b""
        self._checker.check(segment)
        out = segment.replace(b"\r\n.", b"\r\n") if stuffed else segment
        if self._first:
            self._first = False
            out = out[2:]
        return out


class ChunkReader:
    """
    Watch the text of BDAT chunks (RFC 3030), which arrive unstuffed and
    counted: only the line structure needs checking, and a CRLF may be
    split between two chunks.
    """

    def __init__(self, maxTextLine: int = 0) -> None:
        self._checker = _LineChecker(maxTextLine)
        self._cr = False

    @property
    def bareLineEnding(self) -> bool:
        return self._checker.bareLineEnding

    @property
    def lineTooLong(self) -> bool:
        return self._checker.lineTooLong

    def feed(self, data: bytes) -> bytes:
        """
        Check C{data} and return the part of it that is certain: a final CR
        is held back until the next octet shows whether it starts a CRLF.
        """
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        self._checker.check(data)
        return data

    def finish(self) -> bytes:
        """
        The message has ended: return a held CR (which is now a lone one).
        """
        if self._cr:
            self._cr = False
            self._checker.check(b"\r")
            return b"\r"
        return b""
