"""
DKIM body hashes computed while the body streams (RFC 6376 3.4.3, 3.4.4,
3.5 C{l=}), shared by the C{dkim} (verify) and C{dkim-sign} policies.

dkimpy canonicalizes and hashes a body it holds whole in memory; a 35 MiB
message must not be held, so the body is canonicalized here chunk by chunk
and only the header signature is left to dkimpy.  Chunk boundaries fall
anywhere (inside a CRLF, inside a run of white space); what a canonicalizer
keeps between chunks is a few flags and a count of held-back empty lines,
never the text itself.  The result is byte for byte what dkimpy's own
C{canonicalize_body} gives for the whole body (the tests compare them at
every chunk boundary).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["HASHES", "BodyCanonicalizer", "BodyHashes"]

#: The body hash algorithm of each signature algorithm (the C{a=} tag).
HASHES: dict[bytes, str] = {
    b"rsa-sha256": "sha256",
    b"ed25519-sha256": "sha256",
    b"rsa-sha1": "sha1",
}

_CRLF = b"\r\n"
_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")
# Held-back empty lines are written in blocks of at most this many.
_BLOCK = 32 * 1024


class BodyCanonicalizer:
    """
    One canonicalization (C{simple} or C{relaxed}) of one body, written to
    C{sink} as the body arrives.

    Trailing empty lines are only known to be trailing at the end, so runs
    of CRLF are held back as a count and written when more text follows.
    """

    def __init__(self, relaxed: bool, sink: Callable[[bytes], None]) -> None:
        self.relaxed = relaxed
        self._sink = sink
        self._held = 0  # CRLFs held back (possibly trailing empty lines)
        self._cr = False  # the last chunk ended with a CR (maybe half a CRLF)
        self._ws = False  # relaxed: white space not yet written (maybe line-ending)
        self._content = False  # anything but CRLFs was written
        self._ended = False

    def write(self, data: bytes) -> None:
        """
        The next part of the body, CRLF lines as received.
        """
        if not data:
            return
        prefix = (b" " if self._ws else b"") + (b"\r" if self._cr else b"")
        text = prefix + data if prefix else data
        self._ws = self._cr = False
        if text.endswith(b"\r"):
            self._cr = True
            text = text[:-1]
        if not self.relaxed:
            self._emit(text)
            return
        cut = text.rfind(_CRLF) + 2 if _CRLF in text else 0
        lines, rest = text[:cut], text[cut:]
        stripped = rest.rstrip(b" \t")
        # White space that may end the line (before a held CR, too) waits.
        self._ws = len(stripped) < len(rest)
        self._emit(_relax(lines + stripped))

    def end(self) -> None:
        """
        The body is complete: write the final line end (and, for C{simple},
        the CRLF an empty body canonicalizes to).
        """
        if self._ended:
            return
        self._ended = True
        tail = (b" " if self._ws else b"") + (b"\r" if self._cr else b"")
        self._ws = self._cr = False
        if tail:
            self._emit(tail)
        if self._content or not self.relaxed:
            # Trailing empty lines collapse into one line end; a body that
            # did not end with one gets it (RFC 6376 3.4.3, 3.4.4).
            self._sink(_CRLF)

    def _emit(self, piece: bytes) -> None:
        if not piece:
            return
        body = piece.rstrip(b"\r\n")
        tail = len(piece) - len(body)
        if tail % 2 == 0 and piece.endswith(_CRLF * (tail // 2)):
            count = tail // 2
        else:
            # A lone CR or LF among the line ends: count real CRLFs only.
            count, end = 0, len(piece)
            while piece.endswith(_CRLF, 0, end):
                end -= 2
                count += 1
        content = piece[: len(piece) - 2 * count]
        if content:
            self._flushHeld()
            self._sink(content)
            self._content = True
        self._held += count

    def _flushHeld(self) -> None:
        while self._held:
            n = min(self._held, _BLOCK)
            self._sink(_CRLF * n)
            self._held -= n


def _relax(text: bytes) -> bytes:
    """
    Relaxed body canonicalization of whole lines (and of a line's start
    that does not end in white space): white space runs become one space,
    white space at line ends goes.  Built from C{bytes} methods, several
    times faster than a regular expression on text with many short runs.
    """
    text = text.translate(_TAB_TO_SPACE)
    while b"  " in text:
        text = text.replace(b"  ", b" ")
    return text.replace(b" \r\n", _CRLF)


class _LimitedHash:
    """
    A hash of at most C{limit} octets (the C{l=} tag), counting what it saw.
    """

    def __init__(self, algorithm: str, limit: int | None) -> None:
        self._hash: Any = hashlib.new(algorithm)
        self._limit = limit
        self.length = 0

    def update(self, data: bytes) -> None:
        if self._limit is not None:
            room = self._limit - self.length
            if room <= 0:
                self.length += len(data)
                return
            if len(data) > room:
                self._hash.update(data[:room])
                self.length += len(data)
                return
        self._hash.update(data)
        self.length += len(data)

    def digest(self) -> bytes:
        return bytes(self._hash.digest())


BodyHashKey = tuple[bool, str, "int | None"]


class BodyHashes:
    """
    The body hashes several signatures need, each computed once: one
    canonicalizer per canonicalization, one hash per (canonicalization,
    hash algorithm, length limit).

    Use: L{add} for each signature before the body, L{write} the body,
    L{end}, then L{digest} per key.
    """

    def __init__(self) -> None:
        self._canonicalizers: dict[bool, BodyCanonicalizer] = {}
        self._hashes: dict[BodyHashKey, _LimitedHash] = {}
        self._sinks: dict[bool, list[_LimitedHash]] = {}

    def add(self, relaxed: bool, algorithm: str, limit: int | None = None) -> BodyHashKey:
        """
        Ask for the body hash of C{relaxed} (else simple) canonicalization
        with hash C{algorithm} (C{"sha256"}), over at most C{limit} octets
        of the canonical body.
        """
        key: BodyHashKey = (relaxed, algorithm, limit)
        if key not in self._hashes:
            hasher = _LimitedHash(algorithm, limit)
            self._hashes[key] = hasher
            sinks = self._sinks.setdefault(relaxed, [])
            sinks.append(hasher)
            if relaxed not in self._canonicalizers:
                self._canonicalizers[relaxed] = BodyCanonicalizer(relaxed, _fanOut(sinks))
        return key

    def write(self, data: bytes) -> None:
        for canonicalizer in self._canonicalizers.values():
            canonicalizer.write(data)

    def end(self) -> None:
        for canonicalizer in self._canonicalizers.values():
            canonicalizer.end()

    def digest(self, key: BodyHashKey) -> bytes:
        """
        The hash for C{key} (after L{end}).
        """
        return self._hashes[key].digest()

    def length(self, key: BodyHashKey) -> int:
        """
        The length of the whole canonical body for C{key} (after L{end}).
        """
        return self._hashes[key].length


def _fanOut(sinks: Iterable[_LimitedHash]) -> Callable[[bytes], None]:
    hashers = sinks

    def write(data: bytes) -> None:
        for hasher in hashers:
            hasher.update(data)

    return write
