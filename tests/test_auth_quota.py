"""
Tests for L{mailfw.auth._quota}: sending quotas per authenticated user.
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.auth._quota import (
    DAY,
    HOUR,
    OVER_QUOTA,
    Quota,
    SendingQuotas,
    quotaFromOptions,
    quotasFromSection,
)
from mailfw.config import ConfigError
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
