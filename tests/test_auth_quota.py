"""
Tests for L{mailfw.auth._quota}: sending quotas per authenticated user.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.address import Address
from mailfw.admin._control import ControlProtocol
from mailfw.admin._main import formatQuota, makeParser, quotaCommand
from mailfw.auth._config import authFromConfig
from mailfw.auth._quota import (
    DAY,
    HOUR,
    OVER_QUOTA,
    Quota,
    SendingQuotas,
    quotaFromOptions,
    quotasFromSection,
    useHostedQuotas,
)
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.hosting._values import AliasEntry, Mailbox, SenderRight
from mailfw.interfaces import IHostingTable
from mailfw.queue._memory import MemoryQueue
from mailfw.sharedstate import MemorySharedState


class SendingQuotasTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = MemorySharedState()
        self.quotas = SendingQuotas(self.state, self.clock, Quota(messagesPerHour=5, recipientsPerDay=8))

    def send(self, user: str, recipients: int = 1) -> object:
        """
        One message as the session would: check, then charge when accepted.
        """
        refused = self.successResultOf(self.quotas.checkMessage(user))
        if refused is None:
            self.successResultOf(self.quotas.charge(user, recipients))
        return refused

    def test_sixthMessageRefused(self) -> None:
        """
        A user over C{messages_per_hour = 5} gets 450 4.7.1 on the sixth
        message, while another user keeps sending.
        """
        self.assertEqual([self.send("alice") for _ in range(5)], [None] * 5)
        self.assertEqual(self.send("alice"), OVER_QUOTA)
        self.assertEqual((OVER_QUOTA.code, OVER_QUOTA.enhanced), (450, "4.7.1"))
        self.assertIsNone(self.send("bob"))

    def test_hourPasses(self) -> None:
        """
        The hour's count starts again an hour after its first message.
        """
        for _ in range(5):
            self.send("alice")
        self.clock.advance(HOUR - 1)
        self.assertEqual(self.send("alice"), OVER_QUOTA)
        self.clock.advance(1)
        self.assertIsNone(self.send("alice"))

    def test_recipients(self) -> None:
        """
        A recipient that would pass C{recipients_per_day} is refused; the
        pending recipients of the message being built count.
        """
        self.send("alice", recipients=6)
        check = self.quotas.checkRecipient
        self.assertIsNone(self.successResultOf(check("alice", 0)))
        self.assertIsNone(self.successResultOf(check("alice", 1)))
        self.assertEqual(self.successResultOf(check("alice", 2)), OVER_QUOTA)
        self.clock.advance(DAY)
        self.assertIsNone(self.successResultOf(check("alice", 2)))

    def test_refusedCostsNothing(self) -> None:
        """
        Checking does not count: only charged (accepted) messages do.
        """
        for _ in range(20):
            self.successResultOf(self.quotas.checkMessage("alice"))
        self.assertIsNone(self.send("alice"))

    def test_caseInsensitive(self) -> None:
        """
        C{Alice} and C{alice} share one count.
        """
        for _ in range(5):
            self.send("Alice")
        self.assertEqual(self.send("alice"), OVER_QUOTA)

    def test_perUserAndLookup(self) -> None:
        """
        A configured user's quota replaces the default, and a lookup (a
        hosting table's column) comes before both.
        """
        quotas = SendingQuotas(
            self.state,
            self.clock,
            Quota(messagesPerHour=5),
            users={"Bulk": Quota(messagesPerHour=100)},
            lookup=lambda user: succeed(Quota(messagesPerHour=1) if user == "tiny" else None),
        )
        self.assertEqual(self.successResultOf(quotas.quotaFor("bulk")), Quota(messagesPerHour=100))
        self.assertEqual(self.successResultOf(quotas.quotaFor("tiny")), Quota(messagesPerHour=1))
        self.assertEqual(self.successResultOf(quotas.quotaFor("other")), Quota(messagesPerHour=5))

    def test_usage(self) -> None:
        """
        Usage reports each limit's count and value.
        """
        self.send("alice", recipients=3)
        self.assertEqual(
            self.successResultOf(self.quotas.usage("alice")),
            {
                "messages_per_hour": (1, 5),
                "messages_per_day": (1, None),
                "recipients_per_hour": (3, None),
                "recipients_per_day": (3, 8),
            },
        )

    def test_sharedByProcesses(self) -> None:
        """
        Two quota objects over one shared state (two worker processes over
        one queue database) count together.
        """
        other = SendingQuotas(self.state, self.clock, Quota(messagesPerHour=5))
        for _ in range(3):
            self.send("alice")
        for _ in range(2):
            self.successResultOf(other.charge("alice", 1))
        self.assertEqual(self.send("alice"), OVER_QUOTA)


class ConfigTests(SynchronousTestCase):
    def test_none(self) -> None:
        """
        Without any limit there are no quotas to check.
        """
        self.assertIsNone(quotasFromSection({}, MemorySharedState(), Clock()))

    def test_defaultAndUsers(self) -> None:
        """
        The section's limits are the default; a user's table starts from
        them.
        """
        quotas = quotasFromSection(
            {"messages_per_hour": 5, "recipients_per_day": 100, "users": {"bulk": {"messages_per_hour": 50}}},
            MemorySharedState(),
            Clock(),
        )
        assert quotas is not None
        self.assertEqual(quotas.default, Quota(messagesPerHour=5, recipientsPerDay=100))
        self.assertEqual(quotas.users["bulk"], Quota(messagesPerHour=50, recipientsPerDay=100))

    def test_errorsNameTheSection(self) -> None:
        """
        Unknown keys and bad values are refused, naming where.
        """
        with self.assertRaisesRegex(ConfigError, r"\[auth.quotas\]: unknown option 'mesages_per_hour'"):
            quotasFromSection({"mesages_per_hour": 5}, MemorySharedState(), Clock())
        with self.assertRaisesRegex(
            ConfigError, r"\[auth.quotas.users.bob\] messages_per_day: must be at least 0"
        ):
            quotasFromSection({"users": {"bob": {"messages_per_day": -1}}}, MemorySharedState(), Clock())
        with self.assertRaisesRegex(ConfigError, "must be a table"):
            quotasFromSection({"users": {"bob": 5}}, MemorySharedState(), Clock())
        with self.assertRaisesRegex(ConfigError, "expected an integer"):
            quotaFromOptions("[x]", {"messages_per_hour": "5"})


@implementer(IHostingTable)
class OneMailboxTable:
    """
    A hosting table holding one mailbox.  The quotas read only C{mailbox};
    it must still provide all of L{IHostingTable}, since
    L{useHostedQuotas} checks C{providedBy}, so the other methods, which
    the tests never call, raise.
    """

    def __init__(self, box: Mailbox) -> None:
        self.box = box

    def mailbox(self, address: Address) -> Deferred[Mailbox | None]:
        return succeed(self.box if str(address) == self.box.address else None)

    def _unused(self) -> NoReturn:
        raise NotImplementedError("not read by the quotas")

    def domain(self, name: str) -> Deferred[bool]:
        self._unused()

    def aliases(self, address: Address) -> Deferred[tuple[str, ...]]:
        self._unused()

    def maySendAs(self, user: str, address: Address) -> Deferred[bool]:
        self._unused()

    def sendersFor(self, user: str) -> Deferred[tuple[str, ...]]:
        self._unused()

    def addDomain(self, name: str) -> Deferred[bool]:
        self._unused()

    def deleteDomain(self, name: str) -> Deferred[bool]:
        self._unused()

    def listDomains(self) -> Deferred[tuple[str, ...]]:
        self._unused()

    def addMailbox(self, mailbox: Mailbox) -> Deferred[bool]:
        self._unused()

    def deleteMailbox(self, address: str) -> Deferred[bool]:
        self._unused()

    def listMailboxes(self, domain: str | None) -> Deferred[tuple[Mailbox, ...]]:
        self._unused()

    def addAlias(self, address: str, targets: Sequence[str]) -> Deferred[int]:
        self._unused()

    def deleteAlias(self, address: str, target: str | None) -> Deferred[int]:
        self._unused()

    def listAliases(self, domain: str | None) -> Deferred[tuple[AliasEntry, ...]]:
        self._unused()

    def allowSender(self, user: str, address: str) -> Deferred[bool]:
        self._unused()

    def denySender(self, user: str, address: str) -> Deferred[bool]:
        self._unused()

    def listSenders(self, user: str | None) -> Deferred[tuple[SenderRight, ...]]:
        self._unused()

    def close(self) -> Deferred[None]:
        self._unused()


class HostedQuotaTests(SynchronousTestCase):
    def test_mailboxColumns(self) -> None:
        """
        With a router that reads a hosting table, a mailbox's
        C{messagesPerHour} replaces the configured message limit of the
        user authenticated as that address; other users and the other
        limits keep the configuration's.
        """
        clock = Clock()
        quotas = SendingQuotas(MemorySharedState(), clock, Quota(messagesPerHour=5, messagesPerDay=50))
        router = type(
            "Router", (), {"hosting": OneMailboxTable(Mailbox("a@example.org", messagesPerHour=1))}
        )()
        self.assertTrue(useHostedQuotas(quotas, router))
        self.assertEqual(
            self.successResultOf(quotas.quotaFor("a@example.org")),
            Quota(messagesPerHour=1, messagesPerDay=50),
        )
        self.assertEqual(self.successResultOf(quotas.quotaFor("b@example.org")), quotas.default)
        self.assertEqual(self.successResultOf(quotas.quotaFor("not an address")), quotas.default)

    def test_noTable(self) -> None:
        """
        A router without a hosting table leaves the quotas alone.
        """
        quotas = SendingQuotas(MemorySharedState(), Clock(), Quota(messagesPerHour=5))
        self.assertFalse(useHostedQuotas(quotas, object()))
        self.assertIsNone(quotas.lookup)


class QuotaConfigTests(SynchronousTestCase):
    def build(self, **options: Any) -> Any:
        path = Path(self.mktemp())
        path.mkdir()
        (path / "passwd").write_text("")
        context = ComponentContext(reactor=MemoryReactorClock(), hostname="mx.test", dataDir=path)
        return authFromConfig(
            Section("[auth]", {"passwords": "passwd", **options}), context, lambda f, *a: maybeDeferred(f, *a)
        )

    def test_quotasTable(self) -> None:
        """
        C{[auth.quotas]} builds the L{SendingQuotas} of the AUTH setup, with
        the queue's shared state (here, without a queue, an in-memory one).
        """
        setup = self.build(quotas={"messages_per_hour": 5, "users": {"bob": {"messages_per_hour": 50}}})
        self.assertIsInstance(setup.quotas, SendingQuotas)
        self.assertEqual(setup.quotas.default, Quota(messagesPerHour=5))
        self.assertEqual(setup.quotas.users["bob"], Quota(messagesPerHour=50))
        self.assertIsInstance(setup.quotas.state, MemorySharedState)

    def test_none(self) -> None:
        """
        Without C{[auth.quotas]} (or with no limit in it) nobody is held to
        a quota.
        """
        self.assertIsNone(self.build().quotas)
        self.assertIsNone(self.build(quotas={}).quotas)

    def test_errors(self) -> None:
        """
        An unknown key or a bad value in C{[auth.quotas]} is a configuration
        error naming the section.
        """
        e = self.assertRaises(ConfigError, self.build, quotas={"messages_per_minute": 5})
        self.assertIn("[auth.quotas]", str(e))
        self.assertRaises(ConfigError, self.build, quotas={"messages_per_hour": -1})


class ControlQuotaTests(SynchronousTestCase):
    def ask(self, quotas: SendingQuotas | None, request: dict[str, Any]) -> dict[str, Any]:
        protocol = ControlProtocol(MemoryQueue(Clock()), lambda queueID: succeed(b""), quotas)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(transport.value())
        return answer

    def test_usage(self) -> None:
        """
        The control socket's C{quota} command answers a user's counters
        and limits from the server's shared state.
        """
        clock = Clock()
        quotas = SendingQuotas(MemorySharedState(), clock, Quota(messagesPerHour=5))
        self.successResultOf(quotas.charge("alice", 3))
        answer = self.ask(quotas, {"command": "quota", "user": "alice"})
        self.assertEqual(
            answer,
            {
                "ok": True,
                "result": {
                    "messages_per_hour": {"used": 1, "limit": 5},
                    "messages_per_day": {"used": 1, "limit": None},
                    "recipients_per_hour": {"used": 3, "limit": None},
                    "recipients_per_day": {"used": 3, "limit": None},
                },
            },
        )
        self.assertEqual(
            formatQuota("alice", answer["result"]).splitlines()[:2],
            ["sending quota of alice:", "  messages_per_hour    1/5"],
        )

    def test_refusals(self) -> None:
        """
        Without quotas, or without a user name, the answer says why.
        """
        self.assertEqual(
            self.ask(None, {"command": "quota", "user": "alice"}),
            {"ok": False, "error": "no sending quotas are configured ([auth.quotas])"},
        )
        quotas = SendingQuotas(MemorySharedState(), Clock(), Quota(messagesPerHour=5))
        self.assertEqual(
            self.ask(quotas, {"command": "quota"}), {"ok": False, "error": "quota needs a user name"}
        )

    def test_command(self) -> None:
        """
        C{mailfw user quota USER} sends the C{quota} request to the control
        socket.
        """
        args = makeParser().parse_args(["user", "quota", "alice", "--socket", "/x.sock"])
        self.assertIs(args.run, quotaCommand)
        self.assertEqual(args.user, "alice")
