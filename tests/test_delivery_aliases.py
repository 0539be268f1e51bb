"""
Tests for L{mailfw.delivery._aliases}: the alias file's syntax, lookups,
expansion into queued mail, commands, loops and reloading, without threads
or processes (a synchronous runner, a memory queue and fake pipe agents).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._aliases import (
    CHUNK_SIZE,
    AliasDeliveryAgent,
    AliasSyntaxError,
    AliasTable,
    deliveredToHeaders,
    fromConfig,
    loadTable,
    parseAliases,
)
from mailfw.delivery._contract import SAMPLE, DeliveryAgentContractTests, runInOtherThread
from mailfw.delivery._memory import BytesBody, MemoryDeliveryAgent
from mailfw.delivery._pipe import PipeDeliveryAgent
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import QueueFull
from mailfw.reply import SMTPReply

_T = TypeVar("_T")

SENDER = Address("sender", "example.net")
MESSAGE = b"From: sender@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"
CAT = "/bin/cat"

FILE = f"""\
# The team.
team: alice@example.org, Bob@Example.NET,
      carol
  # a comment inside a continuation
      , dave
sales@lists.example.org: sales-desk@example.org
sales: other-sales@example.org
archive: "|{CAT} --to {{recipient}}", keeper@example.org
self: self
"""


def tableOf(text: str, maxTargets: int = 1000) -> AliasTable:
    return parseAliases(text, "aliases", maxTargets, isExecutable=lambda path: True)


class SyncRunner:
    """
    Runs thread work in another thread and waits for it, counting the
    calls: the result is ready at once, and reads on the test's thread
    (the reactor's, in production) are caught by L{TrackingBody}.
    """

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        self.calls += 1
        return runInOtherThread(work)


class FakePipes:
    """
    A pipe factory making L{MemoryDeliveryAgent}s, one per argument vector.
    """

    def __init__(self) -> None:
        self.made: list[tuple[str, ...]] = []
        self.agents: dict[tuple[str, ...], MemoryDeliveryAgent] = {}
        self.reply = SMTPReply(250, "2.0.0", "Delivered")

    def __call__(self, argv: Sequence[str]) -> IDeliveryAgent:
        key = tuple(argv)
        self.made.append(key)
        agent = self.agents[key] = MemoryDeliveryAgent("pipe", defaultReply=self.reply)
        return agent


def envelopeTo(*addresses: str, sender: Address | None = SENDER, **kw: Any) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=tuple(Recipient(Address.parse(a), **kw) for a in addresses),
        size=len(MESSAGE),
        arrival=1_700_000_000.0,
        queueID="ORIG",
    )


class AgentMixin(SynchronousTestCase):
    def buildAgent(self, text: str = FILE, **kwargs: Any) -> AliasDeliveryAgent:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text, "utf-8")
        stamp, table = loadTable(self.path, 1000)
        self.queue = MemoryQueue()
        self.runner = SyncRunner()
        self.pipes = FakePipes()
        return AliasDeliveryAgent(
            "aliases",
            self.path,
            self.queue,
            self.runner,
            self.pipes,
            table=table,
            stamp=stamp,
            **kwargs,
        )

    def deliver(
        self, agent: AliasDeliveryAgent, envelope: Envelope, message: bytes = MESSAGE
    ) -> list[RecipientOutcome]:
        outcomes: Sequence[RecipientOutcome] = self.successResultOf(
            agent.deliver(envelope, BytesBody(message), None)
        )
        return list(outcomes)

    def replies(self, outcomes: Sequence[RecipientOutcome]) -> list[tuple[int, str]]:
        return [(o.reply.code, o.reply.enhanced) for o in outcomes]


class ParseTests(SynchronousTestCase):
    """
    The alias file syntax.
    """

    def test_goodFile(self) -> None:
        """
        Comments, continuation lines, bare local parts, full addresses and
        quoted commands are read into aliases.
        """
        table = tableOf(FILE)
        team = table.lookup(Address("team", "example.org"))
        assert team is not None
        self.assertEqual(team.addresses, (Address("alice", "example.org"), Address("Bob", "example.net")))
        self.assertEqual(team.localparts, ("carol", "dave"))
        self.assertEqual(team.line, 2)
        archive = table.lookup(Address("archive", "x.test"))
        assert archive is not None
        self.assertEqual(archive.commands, ((CAT, "--to", "{recipient}"),))
        self.assertEqual(archive.addresses, (Address("keeper", "example.org"),))
        self.assertEqual(len(table), 5)

    def test_commandWithCommaAndQuotes(self) -> None:
        """
        A quoted command may hold commas and escaped quotes, and an unquoted
        one without spaces is accepted too.
        """
        table = tableOf('a: "|/bin/prog \\"x, y\\" z", |/bin/other\n')
        alias = table.lookup(Address("a", "d.test"))
        assert alias is not None
        self.assertEqual(alias.commands, (("/bin/prog", "x, y", "z"), ("/bin/other",)))

    def test_lookupCaseInsensitive(self) -> None:
        """
        Names match local parts whatever their case, at any domain.
        """
        table = tableOf(FILE)
        self.assertIsNotNone(table.lookup(Address("TEAM", "other.test")))
        self.assertIsNone(table.lookup(Address("teams", "example.org")))

    def test_exactAddressWins(self) -> None:
        """
        A full-address name wins over a bare local part for its domain only.
        """
        table = tableOf(FILE)
        exact = table.lookup(Address("Sales", "LISTS.example.org".lower()))
        bare = table.lookup(Address("sales", "example.org"))
        assert exact is not None and bare is not None
        self.assertEqual(exact.addresses, (Address("sales-desk", "example.org"),))
        self.assertEqual(bare.addresses, (Address("other-sales", "example.org"),))

    def test_addressesAtDomain(self) -> None:
        """
        Bare local part targets take the recipient's domain, and duplicate
        targets (compared case-insensitively) are dropped.
        """
        table = tableOf("a: b, x@d.test, B, X@D.test, c\n")
        alias = table.lookup(Address("a", "d.test"))
        assert alias is not None
        self.assertEqual(
            alias.addressesAt("d.test"),
            [Address("x", "d.test"), Address("b", "d.test"), Address("c", "d.test")],
        )

    def assertRefused(self, text: str, *fragments: str, maxTargets: int = 1000) -> None:
        with self.assertRaises(AliasSyntaxError) as raised:
            tableOf(text, maxTargets)
        for fragment in fragments:
            self.assertIn(fragment, str(raised.exception))

    def test_missingColon(self) -> None:
        """
        A line without C{name:} is refused, naming the file and line.
        """
        self.assertRefused("# c\n\nalice bob\n", "aliases, line 3", "name: target")

    def test_duplicate(self) -> None:
        """
        A name defined twice (in any case) is refused, naming both lines.
        """
        self.assertRefused("a: b\nA: c\n", "line 2", "already defined on line 1")

    def test_include(self) -> None:
        """
        C{:include:} is refused with a message saying it is not supported.
        """
        self.assertRefused("a: :include:/etc/list\n", "line 1", ":include: is not supported")

    def test_fileTarget(self) -> None:
        """
        Delivery to a file is refused with a message saying so.
        """
        self.assertRefused('a: "/var/log/mail"\n', "delivery to files is not supported")

    def test_badAddress(self) -> None:
        """
        An invalid target address is refused.
        """
        self.assertRefused("a: b@@c\n", "line 1", "bad target")

    def test_badName(self) -> None:
        """
        An invalid alias name is refused.
        """
        self.assertRefused("a b: c\n", "bad alias name")

    def test_unterminatedQuote(self) -> None:
        """
        An unterminated quoted target is refused.
        """
        self.assertRefused('a: "|/bin/x\n', "unterminated")

    def test_leadingContinuation(self) -> None:
        """
        A continuation line before any alias is refused.
        """
        self.assertRefused("  b\na: c\n", "aliases, line 1", "continuation")

    def test_emptyTarget(self) -> None:
        """
        A stray comma (an empty target) is refused.
        """
        self.assertRefused("a: b,,c\n", "empty target")

    def test_relativeProgram(self) -> None:
        """
        A command whose program is not an absolute path is refused.
        """
        self.assertRefused('a: "|prog x"\n', "absolute path")

    def test_unknownField(self) -> None:
        """
        A command argument with an unknown template field is refused.
        """
        self.assertRefused('a: "|/bin/x {nope}"\n', "unknown field")

    def test_notExecutable(self) -> None:
        """
        A command whose program is not executable is refused.
        """
        with self.assertRaises(AliasSyntaxError) as raised:
            parseAliases('a: "|/no/such/program"\n', "f", isExecutable=lambda p: False)
        self.assertIn("not an executable file", str(raised.exception))

    def test_maxTargets(self) -> None:
        """
        An alias with more than C{max_targets} targets is refused.
        """
        self.assertRefused("a: b, c, d\n", "3 targets", maxTargets=2)
        tableOf("a: b, c\n", maxTargets=2)

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 is refused by L{loadTable}.
        """
        path = Path(self.mktemp())
        path.write_bytes(b"a: b\xff\n")
        with self.assertRaises(AliasSyntaxError) as raised:
            loadTable(path, 1000)
        self.assertIn("not UTF-8", str(raised.exception))


class DeliveredToTests(SynchronousTestCase):
    """
    Finding C{Delivered-To:} fields in the header section.
    """

    def test_fields(self) -> None:
        """
        Fields are found in any case, unfolded, lowercased; fields in the
        body are ignored.
        """
        message = (
            b"delivered-TO: Alice@Example.org\r\n"
            b"Subject: x\r\n"
            b"Delivered-To:\r\n bob@example.org\r\n"
            b"\r\n"
            b"Delivered-To: carol@example.org\r\n"
        )
        self.assertEqual(deliveredToHeaders(message), ["alice@example.org", "bob@example.org"])

    def test_noHeaders(self) -> None:
        """
        A message starting with an empty line has no header fields.
        """
        self.assertEqual(deliveredToHeaders(b"\r\nDelivered-To: a@b\r\n"), [])


class ExpansionTests(AgentMixin):
    """
    Expanding recipients into new queued mail.
    """

    def test_provides(self) -> None:
        """
        The agent provides L{IDeliveryAgent}.
        """
        self.assertTrue(verifyObject(IDeliveryAgent, self.buildAgent()))

    def test_expandsIntoQueuedMessage(self) -> None:
        """
        One new message is queued with the original sender, every target as
        a recipient (bare local parts at the recipient's domain), the
        recipient's NOTIFY and an ORCPT naming the alias, and the body
        prefixed with C{Delivered-To:}; the recipient gets 250 2.1.5.
        """
        agent = self.buildAgent()
        [outcome] = self.deliver(agent, envelopeTo("Team@lists.test", notify=frozenset({"NEVER"})))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (250, "2.1.5"))
        self.assertEqual(outcome.reply.text, "Expanded to 4 targets")
        [queueID] = self.queue.queueIDs()
        stored = self.queue.envelope(queueID)
        self.assertEqual(stored.sender, SENDER)
        self.assertEqual(
            [r.address for r in stored.recipients],
            [
                Address("alice", "example.org"),
                Address("Bob", "example.net"),
                Address("carol", "lists.test"),
                Address("dave", "lists.test"),
            ],
        )
        self.assertEqual({r.notify for r in stored.recipients}, {frozenset({"NEVER"})})
        self.assertEqual({r.orcpt for r in stored.recipients}, {"rfc822;Team@lists.test"})
        self.assertEqual(stored.size, len(self.queue.body(queueID)))
        self.assertNotEqual(stored.queueID, "ORIG")
        self.assertEqual(self.queue.body(queueID), b"Delivered-To: Team@lists.test\r\n" + MESSAGE)

    def test_orcptKept(self) -> None:
        """
        A recipient's own ORCPT is passed on to its expansion.
        """
        agent = self.buildAgent()
        self.deliver(agent, envelopeTo("team@lists.test", orcpt="rfc822;first@origin.test"))
        [queueID] = self.queue.queueIDs()
        self.assertEqual(
            {r.orcpt for r in self.queue.envelope(queueID).recipients}, {"rfc822;first@origin.test"}
        )

    def test_nullSender(self) -> None:
        """
        A message from C{<>} is expanded with the null sender.
        """
        agent = self.buildAgent()
        self.deliver(agent, envelopeTo("sales@lists.example.org", sender=None))
        [queueID] = self.queue.queueIDs()
        self.assertIsNone(self.queue.envelope(queueID).sender)

    def test_oneMessagePerRecipient(self) -> None:
        """
        Each recipient gets its own expansion, and outcomes keep the
        envelope order, unknown recipients refused with 550 5.1.1.
        """
        agent = self.buildAgent()
        outcomes = self.deliver(
            agent, envelopeTo("sales@lists.example.org", "nobody@lists.test", "sales@lists.test")
        )
        self.assertEqual(self.replies(outcomes), [(250, "2.1.5"), (550, "5.1.1"), (250, "2.1.5")])
        self.assertEqual([o.recipient.address.localpart for o in outcomes], ["sales", "nobody", "sales"])
        first, second = self.queue.queueIDs()
        self.assertEqual(
            [r.address for r in self.queue.envelope(first).recipients],
            [Address("sales-desk", "example.org")],
        )
        self.assertEqual(
            [r.address for r in self.queue.envelope(second).recipients],
            [Address("other-sales", "example.org")],
        )
        self.assertTrue(self.queue.body(second).startswith(b"Delivered-To: sales@lists.test\r\n"))

    def test_bodyReadOnceInChunks(self) -> None:
        """
        A large body is read once, in chunks through the runner, and copied
        whole into every expansion.
        """
        agent = self.buildAgent()
        big = MESSAGE + b"x" * (CHUNK_SIZE * 2 + 10) + b"\r\n"
        body = BytesBody(big)
        envelope = envelopeTo("team@lists.test", "sales@lists.test")
        self.successResultOf(agent.deliver(envelope, body, None))
        for queueID in self.queue.queueIDs():
            self.assertTrue(self.queue.body(queueID).endswith(big))
        # One reader for the header scan, one for the copy.
        self.assertEqual(body.opened, 2)
        # Reload check, header scan, open, four reads.
        self.assertEqual(self.runner.calls, 7)

    def test_queueFailure(self) -> None:
        """
        When the queue cannot store the expansion the recipient is deferred
        with 451 4.3.0.
        """
        agent = self.buildAgent()
        self.queue.failure = RuntimeError("disk on fire")
        [outcome] = self.deliver(agent, envelopeTo("team@lists.test"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_queueFull(self) -> None:
        """
        A full queue defers the recipient too.
        """
        agent = self.buildAgent()
        self.queue.full = True
        [outcome] = self.deliver(agent, envelopeTo("team@lists.test"))
        self.assertEqual(outcome.reply.code, 451)
        self.assertEqual(len(self.flushLoggedErrors(QueueFull)), 1)

    def test_commitAwaited(self) -> None:
        """
        The recipient's outcome waits until the expansion is durable.
        """
        agent = self.buildAgent()
        self.queue.holdCommits = True
        d = agent.deliver(envelopeTo("team@lists.test"), BytesBody(MESSAGE), None)
        self.assertNoResult(d)
        self.queue.releaseCommits()
        [outcome] = self.successResultOf(d)
        self.assertEqual(outcome.reply.code, 250)


class LoopTests(AgentMixin):
    """
    Loop protection with C{Delivered-To:}.
    """

    def test_deliveredToNamesRecipient(self) -> None:
        """
        A message already delivered to the recipient (by its
        C{Delivered-To:}, in any case) is refused with 554 5.4.6 and nothing
        is queued.
        """
        agent = self.buildAgent()
        message = b"Delivered-To: TEAM@lists.test\r\n" + MESSAGE
        [outcome] = self.deliver(agent, envelopeTo("team@lists.test"), message)
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (554, "5.4.6"))
        self.assertEqual(self.queue.queueIDs(), [])

    def test_selfAliasStopsAfterOneRound(self) -> None:
        """
        An alias expanding to itself is queued once, and its expansion is
        refused as a loop.
        """
        agent = self.buildAgent()
        [first] = self.deliver(agent, envelopeTo("self@lists.test"))
        self.assertEqual(first.reply.code, 250)
        [queueID] = self.queue.queueIDs()
        envelope = self.queue.envelope(queueID)
        self.assertEqual([r.address for r in envelope.recipients], [Address("self", "lists.test")])
        [second] = self.deliver(agent, envelope, self.queue.body(queueID))
        self.assertEqual((second.reply.code, second.reply.enhanced), (554, "5.4.6"))
        self.assertEqual(self.queue.queueIDs(), [queueID])

    def test_depthLimit(self) -> None:
        """
        More than C{max_depth} C{Delivered-To:} fields is a loop; exactly
        C{max_depth} is not.
        """
        agent = self.buildAgent(maxDepth=3)
        headers = b"".join(b"Delivered-To: x%d@else.test\r\n" % i for i in range(3))
        [ok] = self.deliver(agent, envelopeTo("team@lists.test"), headers + MESSAGE)
        self.assertEqual(ok.reply.code, 250)
        more = headers + b"Delivered-To: x9@else.test\r\n"
        [refused] = self.deliver(agent, envelopeTo("team@lists.test"), more + MESSAGE)
        self.assertEqual((refused.reply.code, refused.reply.enhanced), (554, "5.4.6"))


class CommandTests(AgentMixin):
    """
    C{|command} targets, through the pipe factory.
    """

    def test_commandGetsRecipientAndDeliveredTo(self) -> None:
        """
        The command's agent is asked to deliver to the alias with the
        message prefixed by C{Delivered-To:}; with the address target
        queued, the recipient is expanded to two targets.
        """
        agent = self.buildAgent()
        [outcome] = self.deliver(agent, envelopeTo("archive@lists.test"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (250, "2.1.5"))
        self.assertEqual(outcome.reply.text, "Expanded to 2 targets")
        pipe = self.pipes.agents[(CAT, "--to", "{recipient}")]
        [delivery] = pipe.deliveries
        self.assertEqual(delivery.recipients, [Address("archive", "lists.test")])
        self.assertEqual(delivery.envelope.sender, SENDER)
        self.assertEqual(delivery.message, b"Delivered-To: archive@lists.test\r\n" + MESSAGE)
        [queueID] = self.queue.queueIDs()
        self.assertEqual(
            [r.address for r in self.queue.envelope(queueID).recipients],
            [Address("keeper", "example.org")],
        )

    def test_pipeAgentsCached(self) -> None:
        """
        One pipe agent is built per command, and reused.
        """
        agent = self.buildAgent()
        self.deliver(agent, envelopeTo("archive@lists.test"))
        self.deliver(agent, envelopeTo("archive@lists.test"))
        self.assertEqual(self.pipes.made, [(CAT, "--to", "{recipient}")])

    def test_transientCommandQueuesNothing(self) -> None:
        """
        A command asking to try later defers the recipient, and the address
        targets are not queued (the retry expands them).
        """
        agent = self.buildAgent()
        self.pipes.reply = SMTPReply(451, "4.3.0", "later")
        [outcome] = self.deliver(agent, envelopeTo("archive@lists.test"))
        self.assertEqual(outcome.reply, SMTPReply(451, "4.3.0", "later"))
        self.assertEqual(self.queue.queueIDs(), [])

    def test_permanentCommandStillQueues(self) -> None:
        """
        A failing command bounces the recipient with its reply while the
        address targets are still queued.
        """
        agent = self.buildAgent()
        failed = SMTPReply(554, "5.3.0", "Delivery command failed (exit status 1)")
        self.pipes.reply = failed
        [outcome] = self.deliver(agent, envelopeTo("archive@lists.test"))
        self.assertEqual(outcome.reply, failed)
        self.assertEqual(len(self.queue.queueIDs()), 1)

    def test_queueFailureWinsOverCommandFailure(self) -> None:
        """
        A transient queue failure outranks a permanent command failure, so
        the recipient is retried.
        """
        agent = self.buildAgent()
        self.pipes.reply = SMTPReply(554, "5.3.0", "failed")
        self.queue.failure = RuntimeError("queue down")
        [outcome] = self.deliver(agent, envelopeTo("archive@lists.test"))
        self.assertEqual(outcome.reply.code, 451)
        self.flushLoggedErrors(RuntimeError)

    def test_buggyPipeAgent(self) -> None:
        """
        A pipe agent whose result fails defers the recipient and is logged.
        """
        agent = self.buildAgent()
        agent._pipe((CAT, "--to", "{recipient}"))
        self.pipes.agents[(CAT, "--to", "{recipient}")].failNext(ZeroDivisionError())
        [outcome] = self.deliver(agent, envelopeTo("archive@lists.test"))
        self.assertEqual(outcome.reply.code, 451)
        self.assertEqual(self.queue.queueIDs(), [])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class ReloadTests(AgentMixin):
    """
    Re-reading the alias file when it changes.
    """

    def rewrite(self, text: str) -> None:
        self.path.write_text(text, "utf-8")
        stat = os.stat(self.path)
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    def test_changedFileReread(self) -> None:
        """
        After the file changes, deliveries use the new aliases.
        """
        agent = self.buildAgent()
        self.rewrite("newbie: n@example.org\n")
        outcomes = self.deliver(agent, envelopeTo("newbie@lists.test", "team@lists.test"))
        self.assertEqual(self.replies(outcomes), [(250, "2.1.5"), (550, "5.1.1")])

    def test_unchangedFileNotReparsed(self) -> None:
        """
        An unchanged file keeps the same table object.
        """
        agent = self.buildAgent()
        table = agent.table
        self.deliver(agent, envelopeTo("team@lists.test"))
        self.assertIs(agent.table, table)

    def test_brokenFileDefersUntilFixed(self) -> None:
        """
        A file that became invalid defers every recipient with 451 4.3.0;
        once fixed, delivery resumes.
        """
        agent = self.buildAgent()
        self.rewrite("team alice\n")
        outcomes = self.deliver(agent, envelopeTo("team@lists.test", "x@lists.test"))
        self.assertEqual(self.replies(outcomes), [(451, "4.3.0"), (451, "4.3.0")])
        self.assertIsNone(agent.table)
        self.rewrite("team: alice@example.org\n")
        [outcome] = self.deliver(agent, envelopeTo("team@lists.test"))
        self.assertEqual(outcome.reply.code, 250)

    def test_deletedFileDefers(self) -> None:
        """
        A file that disappeared defers every recipient.
        """
        agent = self.buildAgent()
        self.path.unlink()
        [outcome] = self.deliver(agent, envelopeTo("team@lists.test"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.3.0"))


class FromConfigTests(SynchronousTestCase):
    """
    Building the agent from C{[delivery.NAME]}.
    """

    def setUp(self) -> None:
        self.dataDir = Path(self.mktemp())
        self.dataDir.mkdir()
        self.queue = MemoryQueue()
        self.context = ComponentContext(
            reactor=object(), hostname="mx.test", dataDir=self.dataDir, queue=self.queue
        )

    def test_built(self) -> None:
        """
        C{file} is read relative to the data directory, and commands run
        through a L{PipeDeliveryAgent} with C{command_timeout}.
        """
        (self.dataDir / "aliases").write_text(f'a: b@c.test, "|{CAT} -u"\n')
        agent = fromConfig(self.context, "al", {"plugin": "aliases", "file": "aliases", "command_timeout": 7})
        self.assertEqual(agent.name, "al")
        self.assertIs(agent.queue, self.queue)
        self.assertEqual(agent.path, self.dataDir / "aliases")
        self.assertIsNotNone(agent.table)
        pipe = agent._pipe((CAT, "-u"))
        assert isinstance(pipe, PipeDeliveryAgent)
        self.assertEqual((pipe.command, pipe.timeout, pipe.name), ([CAT, "-u"], 7.0, "al"))

    def test_needsQueue(self) -> None:
        """
        Without the server's queue in the context the agent is refused.
        """
        (self.dataDir / "aliases").write_text("a: b@c.test\n")
        self.context.queue = None
        with self.assertRaises(ConfigError) as raised:
            fromConfig(self.context, "al", {"file": "aliases"})
        self.assertIn("[delivery.al]", str(raised.exception))
        self.assertIn("queue", str(raised.exception))

    def test_missingFile(self) -> None:
        """
        A file that cannot be read stops the start-up.
        """
        with self.assertRaises(ConfigError) as raised:
            fromConfig(self.context, "al", {"file": "nope"})
        self.assertIn("cannot read", str(raised.exception))

    def test_fileRequired(self) -> None:
        """
        C{file} is required.
        """
        with self.assertRaises(ConfigError):
            fromConfig(self.context, "al", {})

    def test_syntaxError(self) -> None:
        """
        A syntax error stops the start-up, naming the section, file and line.
        """
        (self.dataDir / "aliases").write_text("a: b@c.test\nbroken\n")
        with self.assertRaises(ConfigError) as raised:
            fromConfig(self.context, "al", {"file": "aliases"})
        message = str(raised.exception)
        self.assertIn("[delivery.al] file:", message)
        self.assertIn(f"{self.dataDir / 'aliases'}, line 2", message)

    def test_unknownOption(self) -> None:
        """
        Unknown options are refused.
        """
        (self.dataDir / "aliases").write_text("a: b@c.test\n")
        with self.assertRaises(ConfigError) as raised:
            fromConfig(self.context, "al", {"file": "aliases", "fallback": "local"})
        self.assertIn("fallback", str(raised.exception))


class AliasContractTests(DeliveryAgentContractTests, AgentMixin):
    """
    The delivery agent contract, for the alias agent.
    """

    def makeAgent(self) -> IDeliveryAgent:
        return self.buildAgent("alice: a@x.test\nbob: b@x.test\ncarol: c@x.test\n")

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        prefix = f"Delivered-To: {recipient}\r\n".encode()
        found = [self.queue.body(q) for q in self.queue.queueIDs() if self.queue.body(q).startswith(prefix)]
        return found[-1] if found else None

    def test_storedMessageSeen(self) -> None:
        """
        The contract's stored message is the queued expansion (so the
        contract's body checks are not vacuous here).
        """
        agent = self.makeAgent()
        address = Address("alice", "example.org")
        self.deliverTo(agent, [address], BytesBody(SAMPLE))
        stored = self.storedMessage(agent, address)
        assert stored is not None
        self.assertTrue(stored.endswith(SAMPLE))
