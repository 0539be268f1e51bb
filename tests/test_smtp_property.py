"""
Hypothesis properties of the SMTP server: no bytes inside DATA or a BDAT
chunk ever reach the command dispatcher, the DATA decoder agrees with a
simple model however the input is split, and no input makes the server
raise or write something that is not a reply.
"""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailfw.reply import SMTPReply
from mailfw.smtp._body import DotReader
from mailfw.smtp._parser import Command, parseCommandLine, parseMailFrom, parseRcptTo
from tests._smtpdoubles import EHLO, PROLOGUE, connect

TOKENS = [
    b"\r",
    b"\n",
    b".",
    b"\r\n",
    b"\r\n.",
    b".\r\n",
    b"\n.\n",
    b"\r.\r",
    b"MAIL FROM:<evil@example.com>",
    b"RCPT TO:<victim@example.org>",
    b"RSET",
    b"QUIT",
    b"DATA",
    b"BDAT 5 LAST",
    b"x",
    b" ",
    b"\x00",
    b"\xff",
]

tricky = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)
bodies = st.one_of(tricky, st.binary(max_size=120))
splits = st.lists(st.integers(min_value=1, max_value=40), max_size=12)


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out = []
    for size in sizes:
        if not data:
            break
        out.append(data[:size])
        data = data[size:]
    if data:
        out.append(data)
    return out


def recordingConnection() -> tuple[object, list[tuple[bytes, int]]]:
    """
    A connection whose dispatcher records each command line it executes,
    with how many replies had been sent at that moment.
    """
    conn = connect()
    dispatched: list[tuple[bytes, int]] = []
    original = conn.proto._dispatch

    def dispatch(line: bytes) -> None:
        dispatched.append((line, len(conn.codes())))
        original(line)

    conn.proto._dispatch = dispatch  # type: ignore[method-assign]
    return conn, dispatched


def model(body: bytes) -> bytes:
    """
    What DATA text C{body + CRLF.CRLF} decodes to, line by line.
    """
    lines = body.split(b"\r\n")
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


class DataProperties(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(body=bodies, sizes=splits)
    def test_bodyNeverExecuted(self, body: bytes, sizes: list[int]) -> None:
        """
        Whatever the text holds, only the real CRLF.CRLF ends it: the
        command after it is the first thing dispatched after DATA, and only
        once the end-of-data reply has been sent.
        """
        assume(b"\r\n.\r\n" not in b"\r\n" + body + b"\r\n")
        conn, dispatched = recordingConnection()
        for piece in chunks(PROLOGUE + body + b"\r\n.\r\nNOOP\r\n", sizes):
            conn.send(piece)  # type: ignore[attr-defined]
        lines = [line for line, sent in dispatched]
        self.assertEqual(
            lines,
            [
                EHLO[:-2],
                b"MAIL FROM:<sender@example.net>",
                b"RCPT TO:<rcpt@example.org>",
                b"DATA",
                b"NOOP",
            ],
        )
        self.assertEqual(dispatched[-1][1], 5)
        codes = conn.codes()  # type: ignore[attr-defined]
        self.assertEqual(codes[:4], [b"250", b"250", b"250", b"354"])
        self.assertEqual(codes[5], b"250")
        incoming = conn.queue.messages[0][1]  # type: ignore[attr-defined]
        if b"\r" in body.replace(b"\r\n", b"") or b"\n" in body.replace(b"\r\n", b""):
            self.assertEqual(codes[4], b"550")
            self.assertTrue(incoming.aborted)
        else:
            self.assertEqual(codes[4], b"250")
            stored = incoming.data
            self.assertEqual(stored[stored.index(b"+0000\r\n") + 7 :], model(body))

    @settings(max_examples=200, deadline=None)
    @given(content=st.one_of(tricky, st.binary(max_size=200)), sizes=splits)
    def test_chunkNeverExecuted(self, content: bytes, sizes: list[int]) -> None:
        """
        The octets of a BDAT chunk are never dispatched, whatever they hold.
        """
        conn, dispatched = recordingConnection()
        head = EHLO + b"MAIL FROM:<a@example.net>\r\nRCPT TO:<rcpt@example.org>\r\n"
        bdat = b"BDAT %d LAST" % len(content)
        for piece in chunks(head + bdat + b"\r\n" + content + b"NOOP\r\n", sizes):
            conn.send(piece)  # type: ignore[attr-defined]
        self.assertEqual([line for line, sent in dispatched][3:], [bdat, b"NOOP"])

    @settings(max_examples=300, deadline=None)
    @given(data=bodies, sizes=splits)
    def test_decoderSplitIndependent(self, data: bytes, sizes: list[int]) -> None:
        """
        The DATA decoder's output, end and flags do not depend on how the
        input is cut into chunks.
        """

        def run(pieces: list[bytes]) -> tuple[bytes, bytes | None, bool]:
            reader = DotReader(1000)
            out, rest = [], None
            for piece in pieces:
                if rest is not None:
                    rest += piece
                    continue
                text, rest = reader.feed(piece)
                out.append(text)
            return b"".join(out), rest, reader.bareLineEnding

        self.assertEqual(run([data]), run(chunks(data, sizes)))


class RobustnessProperties(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(data=st.lists(st.one_of(tricky, st.binary(max_size=60)), max_size=12), sizes=splits)
    def test_anyInput(self, data: list[bytes], sizes: list[int]) -> None:
        """
        Any input after EHLO gives only well-formed reply lines, and nothing
        is logged as a failure (SynchronousTestCase fails on logged errors).
        """
        conn = connect()
        stream = EHLO + b"\r\n".join(data) + b"\r\n"
        for piece in chunks(stream, sizes):
            conn.send(piece)
        conn.clock.pump([1.0] * 5)
        for line in conn.lines():
            self.assertRegex(line, rb"\A[2-5][0-9][0-9][ -]")

    @settings(max_examples=500, deadline=None)
    @given(line=st.binary(max_size=80), text=st.text(max_size=80))
    def test_parsersTotal(self, line: bytes, text: str) -> None:
        """
        The parsers return a command or a reply for any input; they never
        raise.
        """
        self.assertIsInstance(parseCommandLine(line), (Command, SMTPReply))
        for argument in (
            text,
            "FROM:<" + text + ">",
            "TO:<" + text + "> " + text,
            "FROM:<a@b.example> " + text,
        ):
            parseMailFrom(argument)
            parseRcptTo(argument, "mx.example.org", smtputf8=True)
