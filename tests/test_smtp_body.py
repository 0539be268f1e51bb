"""
Tests for L{mailfw.smtp._body}: the DATA and BDAT text decoders.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailfw.smtp._body import ChunkReader, DotReader


def decode(data: bytes, split: int = 0, maxTextLine: int = 0) -> tuple[bytes, bytes | None, DotReader]:
    """
    Feed C{data} in pieces of C{split} octets (0: all at once).
    """
    reader = DotReader(maxTextLine)
    pieces = [data] if not split else [data[i : i + split] for i in range(0, len(data), split)]
    out = []
    rest: bytes | None = None
    for piece in pieces:
        if rest is not None:
            rest += piece
            continue
        text, rest = reader.feed(piece)
        out.append(text)
    return b"".join(out), rest, reader


class DotReaderTests(SynchronousTestCase):
    CASES: tuple[tuple[bytes, bytes | None, bytes, bool], ...] = (
        # (input, decoded text or None if not ended, rest, bare line ending)
        (b".\r\n", b"", b"", False),
        (b"a\r\n.\r\n", b"a\r\n", b"", False),
        (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n", False),
        (b"..a\r\n.\r\n", b".a\r\n", b"", False),
        (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", b"", False),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", b"", False),
        (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n", b"", False),
        (b"\r\n.\r\n", b"\r\n", b"", False),
        # The smuggling variants: none of them ends the data.
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b"", True),
        (b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n", b"", True),
        (b"a\r.\rb\r\n.\r\n", b"a\r.\rb\r\n", b"", True),
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n", b"", True),
        (b"a\r.\nb\r\n.\r\n", b"a\r.\nb\r\n", b"", True),
        (b"a\r\r\n.\r\n", b"a\r\r\n", b"", True),
        (b"a\n\r\n.\r\n", b"a\n\r\n", b"", True),
        (b"a\r\n.", None, b"", False),
        (b"a\r\n.\r", None, b"", False),
        (b"a\n.\n", None, b"", True),
    )

    def test_table(self) -> None:
        """
        Only CRLF.CRLF ends the data, dots are unstuffed, lone CR or LF is
        flagged (not repaired), and whatever follows the end is returned;
        the result does not depend on how the input is split.
        """
        for data, expected, rest, bare in self.CASES:
            for split in (0, 1, 2, 3, 5):
                text, gotRest, reader = decode(data, split)
                label = (data, split)
                if expected is None:
                    self.assertIsNone(gotRest, label)
                    self.assertFalse(reader.done, label)
                else:
                    self.assertEqual(text, expected, label)
                    self.assertEqual(gotRest, rest, label)
                self.assertEqual(reader.bareLineEnding, bare, label)

    def test_heldBackIsShort(self) -> None:
        """
        At most four octets are held back between chunks.
        """
        reader = DotReader()
        text, rest = reader.feed(b"hello\r\n.\r")
        self.assertEqual((text, rest), (b"hello", None))
        text, rest = reader.feed(b"\n")
        self.assertEqual((text, rest), (b"\r\n", b""))

    def test_feedAfterEnd(self) -> None:
        """
        Feeding after the end is a bug and says so.
        """
        reader = DotReader()
        reader.feed(b".\r\n")
        self.assertRaises(RuntimeError, reader.feed, b"x")

    def test_lineLength(self) -> None:
        """
        A line of exactly the limit (CRLF included) passes; one octet more is
        flagged, however the input is split.
        """
        limit = 1000
        ok = b"x" * 998 + b"\r\n.\r\n"
        long = b"y\r\n" + b"x" * 999 + b"\r\nz\r\n.\r\n"
        unterminated = b"x" * 1000
        for split in (0, 1, 7, 500, 999):
            self.assertFalse(decode(ok, split, limit)[2].lineTooLong, split)
            self.assertTrue(decode(long, split, limit)[2].lineTooLong, split)
            self.assertTrue(decode(unterminated, split, limit)[2].lineTooLong, split)
        self.assertFalse(decode(long, 0, 0)[2].lineTooLong)

    def test_longLineInMiddle(self) -> None:
        """
        A long line between short ones in one chunk is found.
        """
        data = b"a\r\n" * 10 + b"b" * 1200 + b"\r\n" + b"c\r\n" * 10 + b".\r\n"
        self.assertTrue(decode(data, 0, 1000)[2].lineTooLong)
        data = b"a\r\n" * 10 + b"b" * 900 + b"\r\n" + b"c\r\n" * 10 + b".\r\n"
        self.assertFalse(decode(data, 0, 1000)[2].lineTooLong)


class ChunkReaderTests(SynchronousTestCase):
    def test_crlfAcrossChunks(self) -> None:
        """
        A CRLF split between chunks is a CRLF, not a lone CR and LF.
        """
        reader = ChunkReader()
        out = reader.feed(b"a\r") + reader.feed(b"\nb\r\n") + reader.finish()
        self.assertEqual(out, b"a\r\nb\r\n")
        self.assertFalse(reader.bareLineEnding)

    def test_loneEndings(self) -> None:
        """
        Lone CR or LF anywhere, including a final CR, is flagged.
        """
        for chunks in ([b"a\nb"], [b"a\rb"], [b"a\r", b"b"], [b"ab\r"], [b"\n"]):
            reader = ChunkReader()
            for chunk in chunks:
                reader.feed(chunk)
            reader.finish()
            self.assertTrue(reader.bareLineEnding, chunks)

    def test_noUnstuffing(self) -> None:
        """
        BDAT text is taken literally: dots and CRLF.CRLF are just text.
        """
        reader = ChunkReader()
        self.assertEqual(reader.feed(b"..a\r\n.\r\nb"), b"..a\r\n.\r\nb")
