"""
Tests for L{mailfw.delivery._maildir}.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery import _maildir
from mailfw.delivery._contract import DeliveryAgentContractTests, runInOtherThread
from mailfw.delivery._maildir import (
    MaildirDeliveryAgent,
    ThreadPoolRunner,
    fromConfig,
    safeName,
)
from mailfw.delivery._memory import BytesBody
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IDeliveryAgentFactory, IMessageBody
from mailfw.plugin import findPlugin
from mailfw.queue._produce import produceBytes

_T = TypeVar("_T")

MESSAGE = b"Subject: hello\r\n\r\nline one\r\n.dotted line\r\n"
SENDER = Address("sender", "example.net")


def synchronously(work: Callable[[], _T]) -> Deferred[_T]:
    """
    A thread runner whose result is ready at once: the work runs in another
    thread, waited for, so that reads on the test's thread (the reactor's,
    in production) are caught by L{TrackingBody}.
    """
    return runInOtherThread(work)


def temporaryDirectory(case: SynchronousTestCase) -> Path:
    path = Path(tempfile.mkdtemp(prefix="mailfw-maildir-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


def makeAgent(base: Path, **kwargs: Any) -> MaildirDeliveryAgent:
    kwargs.setdefault("hostname", "host.example")
    kwargs.setdefault("template", "{domain}/{localpart}")
    return MaildirDeliveryAgent("local", base, synchronously, **kwargs)


def envelopeTo(*addresses: Address, sender: Address | None = SENDER) -> Envelope:
    return Envelope(sender=sender, recipients=tuple(Recipient(a) for a in addresses))


def deliver(
    case: SynchronousTestCase,
    agent: MaildirDeliveryAgent,
    *addresses: Address,
    body: IMessageBody | None = None,
    sender: Address | None = SENDER,
) -> Sequence[RecipientOutcome]:
    envelope = envelopeTo(*addresses, sender=sender)
    return case.successResultOf(agent.deliver(envelope, body or BytesBody(MESSAGE), None))


def messagesIn(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.iterdir())]


def allFiles(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, files in os.walk(root) for f in files}


class MaildirContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    The Maildir agent satisfies the delivery agent contract.
    """

    def makeAgent(self) -> IDeliveryAgent:
        self.base = temporaryDirectory(self)
        return makeAgent(self.base)

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        new = self.base / recipient.domain / recipient.localpart / "new"
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return files[-1].read_bytes() if files else None


class DeliveryTests(SynchronousTestCase):
    """
    Writing messages into Maildirs.
    """

    def setUp(self) -> None:
        self.base = temporaryDirectory(self)

    def test_createsMaildirAndDelivers(self) -> None:
        """
        A missing Maildir is created with tmp, new and cur, and the message
        lands in new/ with nothing left in tmp/.
        """
        agent = makeAgent(self.base)
        [outcome] = deliver(self, agent, Address("alice", "example.org"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (250, "2.0.0"))
        maildir = self.base / "example.org" / "alice"
        self.assertEqual(sorted(p.name for p in maildir.iterdir()), ["cur", "new", "tmp"])
        self.assertEqual(len(messagesIn(maildir / "new")), 1)
        self.assertEqual(messagesIn(maildir / "tmp"), [])
        self.assertEqual(messagesIn(maildir / "cur"), [])

    def test_headersAndLineEnds(self) -> None:
        """
        The stored message starts with Return-Path and Delivered-To and has
        LF line ends, the Maildir convention.
        """
        agent = makeAgent(self.base)
        deliver(self, agent, Address("alice", "example.org"))
        [stored] = messagesIn(self.base / "example.org" / "alice" / "new")
        self.assertEqual(
            stored,
            b"Return-Path: <sender@example.net>\n"
            b"Delivered-To: alice@example.org\n"
            b"Subject: hello\n\nline one\n.dotted line\n",
        )

    def test_nullSender(self) -> None:
        """
        A bounce (null sender) gets C{Return-Path: <>}.
        """
        agent = makeAgent(self.base)
        deliver(self, agent, Address("alice", "example.org"), sender=None)
        [stored] = messagesIn(self.base / "example.org" / "alice" / "new")
        self.assertTrue(stored.startswith(b"Return-Path: <>\nDelivered-To: alice@example.org\n"))

    def test_crlfSplitAcrossChunks(self) -> None:
        """
        A CRLF split between two reads still becomes a single LF.
        """
        agent = makeAgent(self.base)
        data = b"a" * (_maildir.CHUNK_SIZE - 1) + b"\r\nb\r\n"
        deliver(self, agent, Address("alice", "example.org"), body=BytesBody(data))
        [stored] = messagesIn(self.base / "example.org" / "alice" / "new")
        self.assertNotIn(b"\r", stored)
        self.assertTrue(stored.endswith(b"a\nb\n"))

    def test_uniqueNamesWithSize(self) -> None:
        """
        Each copy gets its own name (time, pid, sequence, encoded host) with
        a Maildir++ size that equals the file's size.
        """
        agent = makeAgent(self.base, hostname="odd/host:name", now=lambda: 1700000000.25)
        deliver(self, agent, Address("alice", "example.org"), Address("alice", "example.org"))
        new = self.base / "example.org" / "alice" / "new"
        names = sorted(p.name for p in new.iterdir())
        self.assertEqual(len(names), 2)
        pid = os.getpid()
        for sequence, name in enumerate(names):
            stem, size = name.split(",S=")
            self.assertEqual(stem, f"1700000000.M250000P{pid}Q{sequence}.odd\\057host\\072name")
            self.assertEqual(int(size), (new / name).stat().st_size)

    def test_outcomesInOrder(self) -> None:
        """
        Each recipient gets its own copy and outcome, in envelope order.
        """
        agent = makeAgent(self.base, create=False)
        os.makedirs(self.base / "example.org" / "bob" / "new")
        for sub in ("tmp", "cur"):
            os.makedirs(self.base / "example.org" / "bob" / sub)
        alice, bob = Address("alice", "example.org"), Address("bob", "example.org")
        outcomes = deliver(self, agent, alice, bob)
        self.assertEqual([o.recipient.address for o in outcomes], [alice, bob])
        self.assertEqual([o.reply.code for o in outcomes], [550, 250])

    def test_unknownMailboxWithoutCreate(self) -> None:
        """
        With C{create} off a missing Maildir is an unknown user: 550 5.1.1,
        and nothing is created.
        """
        agent = makeAgent(self.base, create=False)
        [outcome] = deliver(self, agent, Address("nobody", "example.org"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (550, "5.1.1"))
        self.assertEqual(list(self.base.iterdir()), [])

    def test_notAMaildirWithoutCreate(self) -> None:
        """
        With C{create} off a directory that is not a Maildir is a local
        problem to fix, so the recipient is deferred rather than bounced.
        """
        agent = makeAgent(self.base, create=False)
        os.makedirs(self.base / "example.org" / "half" / "new")
        [outcome] = deliver(self, agent, Address("half", "example.org"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.3.0"))

    def test_templateFields(self) -> None:
        """
        C{{user}} is the lowercased local part without the detail, and
        C{{detail}} the detail; C{{localpart}} keeps its case.
        """
        agent = makeAgent(self.base, template="{domain}/{user}/{detail}/{localpart}")
        deliver(self, agent, Address("Bob+Lists", "example.org"))
        self.assertTrue((self.base / "example.org" / "bob" / "Lists" / "Bob+Lists" / "new").is_dir())


class PathSafetyTests(SynchronousTestCase):
    """
    No address can make the agent write outside its base directory.
    """

    EVIL = (
        Address("../../etc", "example.org"),
        Address("..", "example.org"),
        Address(".", "example.org"),
        Address('"../../../etc"', "example.org"),
        Address('"a/b"', "example.org"),
        Address('"/etc/passwd"', "example.org"),
        Address(".hidden", "example.org"),
        Address('".."', "example.org"),
        Address('"a\\"b"', "example.org"),
        Address('"a b"', "example.org"),
        Address("a\x00b", "example.org"),
        Address("jürgen", "example.org"),
        Address("x", "../.."),
        Address("x", "[IPv6:::1]"),
        Address("%2E%2E", "example.org"),
    )

    def setUp(self) -> None:
        self.outer = temporaryDirectory(self)
        self.base = self.outer / "mail"
        self.base.mkdir()

    def test_nothingEscapes(self) -> None:
        """
        Every hostile local part or domain is delivered inside the base
        directory, each to a mailbox of its own, and nothing appears outside.
        """
        agent = makeAgent(self.base)
        outcomes = deliver(self, agent, *self.EVIL)
        self.assertEqual([o.reply.code for o in outcomes], [250] * len(self.EVIL))
        files = allFiles(self.outer)
        self.assertEqual(len(files), len(self.EVIL))
        for path in files:
            self.assertIn(self.base, path.parents)
            relative = path.relative_to(self.base).parts
            self.assertEqual(len(relative), 4)  # domain/localpart/new/name
            self.assertEqual(relative[2], "new")
            for part in relative[:2]:
                self.assertFalse(part.startswith("."), part)
                self.assertTrue(part.isascii(), part)

    def test_safeNameIsInjective(self) -> None:
        """
        Different texts never share a mailbox name.
        """
        texts = ["a/b", "a%2Fb", "a%252Fb", ".x", "%2Ex", "ü", "%C3%BC", "", "%"]
        names = [safeName(t) for t in texts]
        self.assertEqual(len(set(names)), len(texts))
        for name in names:
            self.assertNotIn("/", name)
            self.assertNotIn(name, ("", ".", ".."))

    def test_emptyAndPercent(self) -> None:
        """
        An empty text maps to a lone C{%}, which no other text gives (a
        C{%} in a text is always followed by two hex digits).
        """
        self.assertEqual(safeName(""), "%")
        self.assertEqual(safeName("%"), "%25")

    def test_templateEscapeRefused(self) -> None:
        """
        A template whose fixed parts climb out of the base directory gets
        550 5.1.3 instead of a write outside.
        """
        agent = makeAgent(self.base, template="{localpart}/../../../x")
        [outcome] = deliver(self, agent, Address("alice", "example.org"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (550, "5.1.3"))
        self.assertEqual(allFiles(self.outer), set())

    def test_detailCannotEscape(self) -> None:
        """
        A hostile detail becomes an encoded Maildir++ folder name.
        """
        agent = makeAgent(self.base, template="{domain}/{user}", detailFolder=True)
        [outcome] = deliver(self, agent, Address('"bob+../../x"', "example.org"))
        self.assertEqual(outcome.reply.code, 250)
        folders = sorted(p.name for p in (self.base / "example.org" / "bob").iterdir())
        self.assertEqual(folders, [".%2E.%2F..%2Fx", "cur", "new", "tmp"])


class DetailFolderTests(SynchronousTestCase):
    """
    C{user+detail@} goes to the Maildir++ folder C{.detail}.
    """

    def setUp(self) -> None:
        self.base = temporaryDirectory(self)

    def test_folderCreated(self) -> None:
        """
        With C{create} on, the folder is created, marked with
        C{maildirfolder}, and receives the message.
        """
        agent = makeAgent(self.base, template="{domain}/{user}", detailFolder=True)
        deliver(self, agent, Address("bob+lists", "example.org"))
        folder = self.base / "example.org" / "bob" / ".lists"
        self.assertTrue((folder / "maildirfolder").exists())
        self.assertEqual(len(messagesIn(folder / "new")), 1)
        self.assertEqual(messagesIn(self.base / "example.org" / "bob" / "new"), [])

    def test_missingFolderWithoutCreate(self) -> None:
        """
        With C{create} off, a detail without a folder goes to the inbox.
        """
        mailbox = self.base / "example.org" / "bob"
        for sub in ("tmp", "new", "cur"):
            os.makedirs(mailbox / sub)
        agent = makeAgent(self.base, template="{domain}/{user}", detailFolder=True, create=False)
        [outcome] = deliver(self, agent, Address("bob+nothere", "example.org"))
        self.assertEqual(outcome.reply.code, 250)
        self.assertEqual(len(messagesIn(mailbox / "new")), 1)

    def test_offByDefault(self) -> None:
        """
        Without C{detail_folder} the detail is ignored for the folder.
        """
        agent = makeAgent(self.base, template="{domain}/{user}")
        deliver(self, agent, Address("bob+lists", "example.org"))
        mailbox = self.base / "example.org" / "bob"
        self.assertEqual(sorted(p.name for p in mailbox.iterdir()), ["cur", "new", "tmp"])
        self.assertEqual(len(messagesIn(mailbox / "new")), 1)

    def test_otherSeparator(self) -> None:
        """
        The separator is configurable.
        """
        agent = makeAgent(self.base, template="{domain}/{user}", detailFolder=True, separator="-")
        deliver(self, agent, Address("bob-lists", "example.org"))
        self.assertTrue((self.base / "example.org" / "bob" / ".lists" / "new").is_dir())


class QuotaTests(SynchronousTestCase):
    """
    Quota refusals and full disks.
    """

    def setUp(self) -> None:
        self.base = temporaryDirectory(self)
        self.alice = Address("alice", "example.org")
        self.maildir = self.base / "example.org" / "alice"

    def test_overQuota(self) -> None:
        """
        A message that would take the mailbox over its quota gets 552 5.2.2
        and leaves nothing behind in tmp/ or new/.
        """
        agent = makeAgent(self.base, quota=250)
        replies = [deliver(self, agent, self.alice)[0].reply for _ in range(3)]
        self.assertEqual([r.code for r in replies], [250, 250, 552])
        self.assertEqual(replies[2].enhanced, "5.2.2")
        self.assertEqual(len(messagesIn(self.maildir / "new")), 2)
        self.assertEqual(messagesIn(self.maildir / "tmp"), [])

    def test_curAndFoldersCount(self) -> None:
        """
        Messages in cur/ and in Maildir++ folders count towards the quota,
        also ones whose names carry no size.
        """
        agent = makeAgent(self.base)
        deliver(self, agent, self.alice)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(self.maildir / ".Sent" / sub)
        (self.maildir / ".Sent" / "cur" / "plain").write_bytes(b"x" * 1000)
        (self.maildir / "cur" / "1.M1P1.h,S=500:2,S").write_bytes(b"y" * 10)
        [new] = messagesIn(self.maildir / "new")
        self.assertEqual(agent.mailboxSize(self.maildir), len(new) + 1000 + 500)

    def test_sizeFollowsRemovals(self) -> None:
        """
        The cached size is recomputed when a directory changes, so expunged
        mail frees quota.
        """
        agent = makeAgent(self.base, quota=250)
        deliver(self, agent, self.alice)
        deliver(self, agent, self.alice)
        self.assertEqual(deliver(self, agent, self.alice)[0].reply.code, 552)
        for path in (self.maildir / "new").iterdir():
            path.unlink()
        os.utime(self.maildir / "new", ns=(1, 1))  # a distinct mtime, whatever the clock
        self.assertEqual(deliver(self, agent, self.alice)[0].reply.code, 250)

    def test_diskFull(self) -> None:
        """
        ENOSPC and EDQUOT while writing give 452 4.3.1 (try later) and the
        partial file is removed from tmp/.
        """
        for number in (errno.ENOSPC, errno.EDQUOT):

            def full(fd: int, data: bytes, number: int = number) -> int:
                raise OSError(number, os.strerror(number))

            self.patch(_maildir, "_writeAll", full)
            agent = makeAgent(self.base)
            [outcome] = deliver(self, agent, self.alice)
            self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (452, "4.3.1"))
            self.assertEqual(messagesIn(self.maildir / "tmp"), [])
            self.assertEqual(messagesIn(self.maildir / "new"), [])

    def test_otherErrorsDefer(self) -> None:
        """
        Other file system errors (here: the mailbox path is a file) give
        451 4.3.0.
        """
        (self.base / "example.org").write_bytes(b"not a directory")
        agent = makeAgent(self.base)
        [outcome] = deliver(self, agent, self.alice)
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.3.0"))


class _WatchingReader:
    """
    A reader that checks, at every read, that new/ holds nothing yet.
    """

    def __init__(self, data: bytes, new: Path, seen: list[list[str]]) -> None:
        self._data = data
        self._new = new
        self._seen = seen
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        self._seen.append(os.listdir(self._new) if self._new.exists() else [])
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> _WatchingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@implementer(IMessageBody)
class _WatchingBody:
    def __init__(self, data: bytes, new: Path) -> None:
        self.data = data
        self.size = len(data)
        self.new = new
        self.seen: list[list[str]] = []

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        return produceBytes(self.data, consumer)

    def open(self) -> BinaryIO:
        reader: Any = _WatchingReader(self.data, self.new, self.seen)
        return reader  # type: ignore[no-any-return]


class AtomicityTests(SynchronousTestCase):
    """
    Readers of new/ never see partial mail.
    """

    def setUp(self) -> None:
        self.base = temporaryDirectory(self)
        self.alice = Address("alice", "example.org")
        self.maildir = self.base / "example.org" / "alice"

    def test_nothingInNewWhileWriting(self) -> None:
        """
        While the body is being written, new/ stays empty; the complete
        message appears there only afterwards.
        """
        data = b"x" * (3 * _maildir.CHUNK_SIZE) + b"\r\n"
        body = _WatchingBody(data, self.maildir / "new")
        agent = makeAgent(self.base)
        deliver(self, agent, self.alice, body=body)
        self.assertGreaterEqual(len(body.seen), 4)
        self.assertEqual(body.seen, [[]] * len(body.seen))
        [stored] = messagesIn(self.maildir / "new")
        self.assertTrue(stored.endswith(b"x" * (3 * _maildir.CHUNK_SIZE) + b"\n"))

    def test_crashBeforeLinkLeavesNothingVisible(self) -> None:
        """
        A process that dies after writing tmp/ but before linking into new/
        leaves new/ empty and the complete copy only in tmp/.
        """
        script = textwrap.dedent(
            """
            import os, sys
            from pathlib import Path
            from twisted.internet.defer import maybeDeferred
            from mailfw.address import Address
            from mailfw.delivery import _maildir
            from mailfw.delivery._memory import BytesBody
            def crash(source, target):
                os._exit(3)
            _maildir._linkInto = crash
            agent = _maildir.MaildirDeliveryAgent(
                "local", Path(sys.argv[1]), maybeDeferred,
                template="{domain}/{localpart}", hostname="h")
            agent.deliverOne("s@example.net", Address("alice", "example.org"),
                             BytesBody(b"Subject: x\\r\\n\\r\\nbody\\r\\n"))
            os._exit(0)
            """
        )
        process = subprocess.run(
            [sys.executable, "-c", script, str(self.base)], timeout=60, capture_output=True
        )
        self.assertEqual(process.returncode, 3, process.stderr.decode())
        self.assertEqual(messagesIn(self.maildir / "new"), [])
        self.assertEqual(
            messagesIn(self.maildir / "tmp"),
            [b"Return-Path: <s@example.net>\nDelivered-To: alice@example.org\nSubject: x\n\nbody\n"],
        )

    def test_concurrentDeliveries(self) -> None:
        """
        Many threads delivering to one Maildir at once each produce one
        complete file under a distinct name.
        """
        agent = makeAgent(self.base)
        bodies = [BytesBody(b"Subject: %d\r\n\r\n" % i + b"z" * 5000 + b"\r\n") for i in range(200)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(lambda body: agent.deliverOne("s@example.net", self.alice, body), bodies))
        self.assertEqual({r.code for r in replies}, {250})
        stored = messagesIn(self.maildir / "new")
        self.assertEqual(len(stored), 200)
        subjects = sorted(int(m.split(b"\n")[2].split(b": ")[1]) for m in stored)
        self.assertEqual(subjects, list(range(200)))
        for message in stored:
            self.assertTrue(message.endswith(b"z" * 5000 + b"\n"))
        self.assertEqual(messagesIn(self.maildir / "tmp"), [])


class _ThreadReactor:
    """
    Just enough reactor for L{deferToThreadPool}: results come back through
    a queue the test drains.
    """

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.Queue()
        self.triggers: list[tuple[str, str, Callable[[], Any]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], Any]) -> None:
        self.triggers.append((phase, event, f))


class ThreadPoolRunnerTests(SynchronousTestCase):
    """
    The default runner does the work in a pool of its own.
    """

    def test_runsInPoolAndStopsAtShutdown(self) -> None:
        """
        Work runs in another thread, the result arrives through the
        reactor, and the pool stops at reactor shutdown.
        """
        import threading

        reactor = _ThreadReactor()
        runner = ThreadPoolRunner(reactor, "test-pool", 2)
        d = runner(threading.get_ident)
        f, args = reactor.calls.get(timeout=30)
        f(*args)
        self.assertNotEqual(self.successResultOf(d), threading.get_ident())
        runner(lambda: None)
        reactor.calls.get(timeout=30)
        self.assertEqual([(p, e) for p, e, _ in reactor.triggers], [("during", "shutdown")])
        reactor.triggers[0][2]()


class FromConfigTests(SynchronousTestCase):
    """
    Building the agent from C{[delivery.NAME]}.
    """

    def setUp(self) -> None:
        self.dataDir = temporaryDirectory(self)
        self.context = ComponentContext(reactor=object(), hostname="mx.example", dataDir=self.dataDir)

    def test_defaults(self) -> None:
        """
        By default mail goes to C{mail/{domain}/{localpart}} under the data
        directory, and the fixed prefix is the base no mailbox leaves.
        """
        agent = fromConfig(self.context, "local", {"plugin": "maildir"})
        self.assertEqual(agent.name, "local")
        self.assertEqual(agent.baseDir, self.dataDir / "mail")
        self.assertEqual(agent.template, "{domain}/{localpart}")
        self.assertEqual((agent.create, agent.detailFolder, agent.quota), (True, False, None))

    def test_options(self) -> None:
        """
        Every option is read and passed on.
        """
        agent = fromConfig(
            self.context,
            "local",
            {
                "path": "/var/mail/vhosts/{domain}/{user}/Maildir",
                "create": False,
                "detail_folder": True,
                "separator": "-",
                "quota": 1000,
                "threads": 2,
            },
        )
        self.assertEqual(agent.baseDir, Path("/var/mail/vhosts"))
        self.assertEqual(agent.template, "{domain}/{user}/Maildir")
        self.assertEqual(
            (agent.create, agent.detailFolder, agent.separator, agent.quota),
            (False, True, "-", 1000),
        )

    def test_errors(self) -> None:
        """
        Bad values and unknown keys are refused at start-up, naming the
        section.
        """
        optionSets: list[dict[str, object]] = [
            {"path": "{home}/Maildir"},
            {"path": "{localpart.__class__}"},
            {"path": "{localpart!r}"},
            {"quota": 0},
            {"create": "yes"},
            {"separator": "+-"},
            {"colour": "blue"},
        ]
        for options in optionSets:
            with self.assertRaises(ConfigError) as raised:
                fromConfig(self.context, "local", options)
            self.assertIn("[delivery.local]", str(raised.exception))

    def test_plugin(self) -> None:
        """
        The bundled C{maildir} plugin builds this agent.
        """
        factory = findPlugin(IDeliveryAgentFactory, "maildir")
        agent = factory.fromConfig(self.context, "local", {"plugin": "maildir"})
        self.assertIsInstance(agent, MaildirDeliveryAgent)
