"""
Tests for L{mailfw.delivery._pipe}, with a fake process reactor (no real
processes; those are in tests/integration/test_pipe_processes.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._contract import TrackingBody, UnreadableBody
from mailfw.delivery._memory import BytesBody
from mailfw.delivery._pipe import (
    PipeDeliveryAgent,
    checkCommand,
    fromConfig,
    replyForExit,
    summarise,
)
from mailfw.envelope import Envelope, Recipient
from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory
from mailfw.plugin import findPlugin

ALICE = Address("Alice+Box", "example.org")
BOB = Address("bob", "example.org")
MESSAGE = b"Subject: x\r\n\r\n" + b"0123456789abcdef" * 30000  # several chunks


class FakeProcess:
    """
    The parts of a process transport the pipe agent uses, recording what
    happens to it.
    """

    def __init__(self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: Any):
        self.protocol = protocol
        self.executable = executable
        self.args = args
        self.env = env
        self.childFDs = childFDs
        self.stdin = b""
        self.stdinClosed = False
        self.producer: Any = None
        self.signals: list[str] = []
        self.ended = False

    def write(self, data: bytes) -> None:
        self.stdin += data
        if self.producer is not None:
            # A pipe whose buffer is full: no more until it drains.
            self.producer.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def closeStdin(self) -> None:
        self.stdinClosed = True

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def pump(self) -> None:
        """
        Let the producer write everything, as a draining pipe would.
        """
        for _ in range(10_000):
            if self.producer is None:
                return
            self.producer.resumeProducing()
        raise AssertionError("producer never finished")

    def brokenPipe(self) -> None:
        """
        The child closed its input: the writer stops the producer.
        """
        producer, self.producer = self.producer, None
        producer.stopProducing()

    def end(self, exitCode: int | None = 0, signal: int | None = None, stderr: bytes = b"") -> None:
        if stderr:
            self.protocol.errReceived(stderr)
        self.ended = True
        reason = Failure(ProcessDone(0)) if exitCode == 0 else Failure(ProcessTerminated(exitCode, signal))
        self.protocol.processEnded(reason)


class FakeProcessReactor(Clock):
    """
    A clock that also records C{spawnProcess}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.spawnError: OSError | None = None

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any = None, childFDs: Any = None
    ) -> FakeProcess:
        if self.spawnError is not None:
            raise self.spawnError
        process = FakeProcess(protocol, executable, args, env, childFDs)
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


def envelopeTo(*addresses: Address) -> Envelope:
    return Envelope(
        sender=Address("sender", "example.net"), recipients=tuple(Recipient(a) for a in addresses)
    )


class ReplyMappingTests(SynchronousTestCase):
    """
    How a command's end maps to a reply.
    """

    def test_exitCodes(self) -> None:
        """
        0 delivers, 75 defers with 451 4.3.0, others fail with 554 5.3.0.
        """
        self.assertEqual(replyForExit(0, None, False, b"").code, 250)
        tempfail = replyForExit(75, None, False, b"busy")
        self.assertEqual((tempfail.code, tempfail.enhanced), (451, "4.3.0"))
        failed = replyForExit(1, None, False, b"")
        self.assertEqual((failed.code, failed.enhanced), (554, "5.3.0"))
        self.assertEqual(failed.text, "Delivery command failed (exit status 1)")

    def test_signal(self) -> None:
        """
        Death by a signal fails, naming the signal.
        """
        reply = replyForExit(None, 11, False, b"")
        self.assertEqual((reply.code, reply.text), (554, "Delivery command failed (signal 11)"))

    def test_timeout(self) -> None:
        """
        A killed command that ran out of time defers, whatever its status.
        """
        reply = replyForExit(None, 9, True, b"killed")
        self.assertEqual(
            (reply.code, reply.enhanced, reply.text), (451, "4.3.0", "Delivery command timed out")
        )

    def test_stderrSummary(self) -> None:
        """
        The first non-empty stderr line is kept, made printable ASCII and
        cut to 100 characters.
        """
        self.assertEqual(summarise(b"\n  \nno such user\nmore\n"), "no such user")
        self.assertEqual(summarise(b"bad\x1b[31m\xff\r\n"), "bad?[31m?")
        long = summarise(b"x" * 500)
        self.assertEqual(len(long), 100)
        self.assertTrue(long.endswith("..."))
        reply = replyForExit(67, None, False, b"user unknown\r\n")
        self.assertEqual(reply.text, "Delivery command failed (exit status 67): user unknown")


class CommandTemplateTests(SynchronousTestCase):
    """
    Argument templates.
    """

    def test_fields(self) -> None:
        """
        Each argument may use the address fields; values are substituted
        without any shell.
        """
        agent = PipeDeliveryAgent(
            FakeProcessReactor(),
            "pipe",
            [
                "/usr/bin/deliver",
                "-f",
                "{sender}",
                "--",
                "{recipient}",
                "{localpart}",
                "{user}",
                "{detail}",
                "{domain}",
                "x={user}@{domain}",
            ],
        )
        self.assertEqual(
            agent.argumentsFor("s@example.net", [ALICE]),
            [
                "/usr/bin/deliver",
                "-f",
                "s@example.net",
                "--",
                "Alice+Box@example.org",
                "Alice+Box",
                "alice",
                "Box",
                "example.org",
                "x=alice@example.org",
            ],
        )

    def test_quotedLocalPartIsOneArgument(self) -> None:
        """
        A local part with spaces and shell characters stays one argument.
        """
        agent = PipeDeliveryAgent(FakeProcessReactor(), "pipe", ["/bin/x", "{localpart}"])
        self.assertEqual(
            agent.argumentsFor("", [Address('"a b;$(rm)"', "example.org")]), ["/bin/x", "a b;$(rm)"]
        )

    def test_groupExpandsRecipients(self) -> None:
        """
        Run once per group, an argument that is exactly C{{recipient}}
        becomes one argument per recipient.
        """
        agent = PipeDeliveryAgent(
            FakeProcessReactor(), "pipe", ["/bin/x", "{sender}", "{recipient}"], perRecipient=False
        )
        self.assertEqual(
            agent.argumentsFor("s@x", [ALICE, BOB]),
            ["/bin/x", "s@x", "Alice+Box@example.org", "bob@example.org"],
        )

    def test_badTemplates(self) -> None:
        """
        Unknown fields, conversions, relative programs and per-recipient
        fields in group mode are refused.
        """
        for command, perRecipient in [
            ([], True),
            (["deliver"], True),
            (["/bin/x", "{home}"], True),
            (["/bin/x", "{sender!r}"], True),
            (["/bin/x", "{sender.__class__}"], True),
            (["/bin/x", "{"], True),
            (["/bin/x", "{user}"], False),
            (["/bin/x", "to={recipient}"], False),
        ]:
            with self.assertRaises(ValueError, msg=repr(command)):
                checkCommand(command, perRecipient)


class PipeAgentTests(SynchronousTestCase):
    """
    Running the command and mapping its end to outcomes.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.agent = PipeDeliveryAgent(
            self.reactor, "pipe", ["/usr/bin/deliver", "{recipient}"], timeout=60, env={"LANG": "C"}
        )

    def test_interface(self) -> None:
        """
        The agent provides L{IDeliveryAgent}.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent))

    def test_deliversMessageOnStdin(self) -> None:
        """
        The command gets the whole message on stdin, which is then closed;
        exit 0 delivers.
        """
        d = self.agent.deliver(envelopeTo(BOB), BytesBody(MESSAGE), None)
        [process] = self.reactor.processes
        self.assertEqual(process.executable, "/usr/bin/deliver")
        self.assertEqual(process.args, ["/usr/bin/deliver", "bob@example.org"])
        self.assertEqual(process.env, {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"})
        self.assertEqual(process.childFDs, {0: "w", 1: "r", 2: "r"})
        process.pump()
        self.assertEqual(process.stdin, MESSAGE)
        self.assertTrue(process.stdinClosed)
        self.assertNoResult(d)
        process.end(0)
        [outcome] = self.successResultOf(d)
        self.assertEqual((outcome.recipient.address, outcome.reply.code), (BOB, 250))

    def test_perRecipientInTurn(self) -> None:
        """
        With one run per recipient, the runs happen one after another and
        each recipient gets its own run's outcome.
        """
        d = self.agent.deliver(envelopeTo(ALICE, BOB), BytesBody(MESSAGE), None)
        [first] = self.reactor.processes
        first.pump()
        first.end(75)
        second = self.reactor.processes[1]
        self.assertEqual(second.args[1], "bob@example.org")
        second.pump()
        second.end(1, stderr=b"mailbox locked\n")
        outcomes = self.successResultOf(d)
        self.assertEqual(
            [(o.recipient.address, o.reply.code, o.reply.enhanced) for o in outcomes],
            [(ALICE, 451, "4.3.0"), (BOB, 554, "5.3.0")],
        )
        self.assertEqual(outcomes[1].reply.text, "Delivery command failed (exit status 1): mailbox locked")

    def test_groupRun(self) -> None:
        """
        With C{per_recipient} off one run serves every recipient.
        """
        agent = PipeDeliveryAgent(
            self.reactor, "pipe", ["/usr/bin/deliver", "{recipient}"], perRecipient=False
        )
        d = agent.deliver(envelopeTo(ALICE, BOB), BytesBody(MESSAGE), None)
        [process] = self.reactor.processes
        self.assertEqual(process.args[1:], ["Alice+Box@example.org", "bob@example.org"])
        process.pump()
        process.end(75)
        self.assertEqual([o.reply.code for o in self.successResultOf(d)], [451, 451])

    def test_timeoutKills(self) -> None:
        """
        A command still running at the timeout is killed and the recipient
        deferred.
        """
        d = self.agent.deliver(envelopeTo(BOB), BytesBody(MESSAGE), None)
        [process] = self.reactor.processes
        process.pump()
        self.reactor.advance(59)
        self.assertEqual(process.signals, [])
        self.reactor.advance(1)
        self.assertEqual(process.signals, ["KILL"])
        process.end(None, signal=9)
        [outcome] = self.successResultOf(d)
        self.assertEqual((outcome.reply.code, outcome.reply.text), (451, "Delivery command timed out"))

    def test_timerCancelledOnExit(self) -> None:
        """
        A command that ends in time leaves no timer behind.
        """
        self.agent.deliver(envelopeTo(BOB), BytesBody(MESSAGE), None)
        [process] = self.reactor.processes
        process.pump()
        process.end(0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_commandIgnoresInput(self) -> None:
        """
        A command that closes its input early is judged by its exit status
        alone.
        """
        d = self.agent.deliver(envelopeTo(BOB), BytesBody(MESSAGE), None)
        [process] = self.reactor.processes
        process.producer.resumeProducing()
        process.brokenPipe()
        process.end(0)
        self.assertEqual(self.successResultOf(d)[0].reply.code, 250)

    def test_unreadableBody(self) -> None:
        """
        A body that cannot be opened (found out in the reader thread, once
        the command runs) kills the command and defers, whatever its exit.
        """
        d = self.agent.deliver(envelopeTo(BOB), UnreadableBody(), None)
        [process] = self.reactor.processes
        self.assertEqual((process.signals, process.stdin), (["KILL"], b""))
        process.end(0)
        [outcome] = self.successResultOf(d)
        self.assertEqual(outcome.reply.code, 451)

    def test_pausedGetsNoWrites(self) -> None:
        """
        While the pipe is full (the producer paused) nothing more is
        written; each drain lets exactly one more chunk through.
        """
        d = self.agent.deliver(envelopeTo(BOB), TrackingBody(MESSAGE), None)
        [process] = self.reactor.processes
        written = len(process.stdin)
        self.assertTrue(0 < written < len(MESSAGE))
        process.producer.resumeProducing()
        self.assertEqual(len(process.stdin), 2 * written)
        process.pump()
        self.assertEqual(process.stdin, MESSAGE)
        process.end(0)
        self.assertEqual(self.successResultOf(d)[0].reply.code, 250)

    def test_readFailsMidway(self) -> None:
        """
        A read error while streaming kills the command and defers, even if
        it then exits 0 (it saw only part of the message).
        """

        class Broken:
            closed = False
            reads = 0

            def read(self, size: int) -> bytes:
                self.reads += 1
                if self.reads > 1:
                    raise OSError(5, "Input/output error")
                return b"x" * size

            def close(self) -> None:
                self.closed = True

        body = TrackingBody(MESSAGE)
        reader = Broken()
        body.open = lambda: reader  # type: ignore[method-assign,assignment,return-value]
        d = self.agent.deliver(envelopeTo(BOB), body, None)
        [process] = self.reactor.processes
        self.assertEqual(process.signals, [])
        process.pump()
        self.assertEqual(process.signals, ["KILL"])
        self.assertTrue(reader.closed)
        process.end(0)
        self.assertEqual(self.successResultOf(d)[0].reply.code, 451)

    def test_spawnFails(self) -> None:
        """
        A command that cannot be started defers.
        """
        self.reactor.spawnError = OSError(24, "Too many open files")
        body = BytesBody(MESSAGE)
        [outcome] = self.successResultOf(self.agent.deliver(envelopeTo(BOB), body, None))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.3.0"))

    def test_noRecipients(self) -> None:
        """
        No recipients, no process.
        """
        d = self.agent.deliver(envelopeTo(), BytesBody(b""), None)
        outcomes = self.successResultOf(d)
        self.assertEqual(list(outcomes), [])
        self.assertEqual(self.reactor.processes, [])


class FromConfigTests(SynchronousTestCase):
    """
    Building the agent from C{[delivery.NAME]}.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.context = ComponentContext(reactor=self.reactor, hostname="mx", dataDir=Path("."))
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        self.program = os.path.join(directory, "deliver")
        with open(self.program, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(self.program, 0o755)

    def test_options(self) -> None:
        """
        Options are read and passed on, through the bundled C{pipe} plugin.
        """
        agent: Any = findPlugin(IDeliveryAgentFactory, "pipe").fromConfig(
            self.context,
            "prog",
            {
                "plugin": "pipe",
                "command": [self.program, "{recipient}"],
                "timeout": 10,
                "per_recipient": False,
                "env": {"HOME": "/nonexistent"},
            },
        )
        self.assertIsInstance(agent, PipeDeliveryAgent)
        self.assertEqual(
            (agent.name, agent.command, agent.timeout, agent.perRecipient, agent.env["HOME"]),
            ("prog", [self.program, "{recipient}"], 10.0, False, "/nonexistent"),
        )
        self.assertIs(agent.reactor, self.reactor)

    def test_errors(self) -> None:
        """
        Shell strings, missing programs, bad templates, bad values and
        unknown keys are refused at start-up.
        """
        optionSets: list[dict[str, object]] = [
            {},
            {"command": f"{self.program} {{recipient}}"},
            {"command": ["/nonexistent/deliver"]},
            {"command": [self.program, "{nope}"]},
            {"command": [self.program], "timeout": 0},
            {"command": [self.program], "env": {"A": 1}},
            {"command": [self.program], "shell": True},
        ]
        for options in optionSets:
            with self.assertRaises(ConfigError, msg=repr(options)) as raised:
                fromConfig(self.context, "prog", options)
            self.assertIn("[delivery.prog]", str(raised.exception))
