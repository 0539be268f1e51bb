"""
The pipe agent with real processes on the real reactor (pytest-twisted).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]

from mailfw.address import Address
from mailfw.delivery._memory import BytesBody
from mailfw.delivery._pipe import PipeDeliveryAgent
from mailfw.envelope import Envelope, Recipient

pytestmark = pytest.mark.integration

BOB = Address("bob+box", "example.org")
ENVELOPE = Envelope(sender=Address("s", "example.net"), recipients=(Recipient(BOB),))
BIG = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
BIG = BIG * 2000  # about 2 MB: more than any pipe buffer


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def agent(*arguments: str, **kwargs: Any) -> PipeDeliveryAgent:
    return PipeDeliveryAgent(reactor(), "pipe", [sys.executable, "-c", *arguments], **kwargs)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_messageReachesCommand(tmp_path: Path) -> None:
    """
    The command gets the whole message on stdin and its arguments from the
    template; exit 0 delivers.
    """
    out = tmp_path / "out"
    script = (
        "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read());"
        "open(sys.argv[1] + '.args', 'w').write(' '.join(sys.argv[2:]))"
    )
    pipe = agent(script, str(out), "{sender}", "{user}", "{detail}")
    [outcome] = await pipe.deliver(ENVELOPE, BytesBody(BIG), None)
    assert (outcome.reply.code, outcome.reply.enhanced) == (250, "2.0.0")
    assert out.read_bytes() == BIG
    assert (tmp_path / "out.args").read_text() == "s@example.net bob box"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_exitCodes() -> None:
    """
    Exit 75 defers, another non-zero exit bounces with stderr summarised.
    """
    [deferred] = await agent("import sys; sys.exit(75)").deliver(ENVELOPE, BytesBody(BIG), None)
    assert (deferred.reply.code, deferred.reply.enhanced) == (451, "4.3.0")
    failing = agent("import sys; sys.stderr.write('no such mailbox\\nmore\\n'); sys.exit(67)")
    [failed] = await failing.deliver(ENVELOPE, BytesBody(BIG), None)
    assert (failed.reply.code, failed.reply.enhanced) == (554, "5.3.0")
    assert failed.reply.text == "Delivery command failed (exit status 67): no such mailbox"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_binFalseWithoutReading() -> None:
    """
    /bin/false exits without reading a large message: a clean 554, no hang.
    """
    pipe = PipeDeliveryAgent(reactor(), "pipe", ["/bin/false"])
    [outcome] = await pipe.deliver(ENVELOPE, BytesBody(BIG), None)
    assert outcome.reply.code == 554


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_timeoutKills() -> None:
    """
    A command that runs too long is killed and the recipient deferred.
    """
    pipe = agent("import time; time.sleep(60)", timeout=0.5)
    start = reactor().seconds()
    [outcome] = await pipe.deliver(ENVELOPE, BytesBody(b"x\r\n"), None)
    assert (outcome.reply.code, outcome.reply.text) == (451, "Delivery command timed out")
    assert reactor().seconds() - start < 30
