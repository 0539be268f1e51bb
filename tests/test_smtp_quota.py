"""
Tests for sending quotas in the SMTP session (L{mailfw.auth._quota} wired
into L{mailfw.smtp._transaction}), the C{LIMITS} keyword (RFC 9422) and
the transactions-per-session limit it advertises.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mailfw.auth._quota import OVER_QUOTA, Quota, SendingQuotas
from mailfw.interfaces import ISharedState
from mailfw.policy import Verdict
from mailfw.sharedstate import MemorySharedState, sharedStateFor
from mailfw.smtp import SMTPLimits
from tests._smtpdoubles import EHLO, Connection, StagePolicy, TLSStringTransport, connect
from tests.test_queue_sqlite import synchronousQueue
from tests.test_smtp_auth import login, makeAuth, secure

ALICE = "alice@example.org"
BOB = "bob"


def message(sender: str, *recipients: str) -> bytes:
    """
    One whole transaction, pipelined.
    """
    rcpts = b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients or ("rcpt@example.org",))
    return f"MAIL FROM:<{sender}>\r\n".encode() + rcpts + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"


def quotas(clock: Clock, state: ISharedState | None = None, **limits: int) -> SendingQuotas:
    return SendingQuotas(state or MemorySharedState(), clock, Quota(**limits))


class QuotaSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = MemorySharedState()
        self.quotas = quotas(self.clock, self.state, messagesPerHour=5)

    def session(self, name: str, password: str) -> Connection:
        conn = secure(clock=self.clock, quotas=self.quotas)
        login(conn, name, password)
        return conn

    def test_sixthMessageRefused(self) -> None:
        """
        A user over C{messages_per_hour = 5} gets 450 4.7.1 at the sixth
        MAIL, logged once with the user's name, while another user keeps
        sending; an hour later the user may send again.
        """
        alice = self.session(ALICE, "correct horse")
        for _ in range(5):
            alice.send(message(ALICE))
        self.assertEqual(alice.codes(), [b"250", b"250", b"354", b"250"] * 5)
        self.assertEqual(len(alice.queue.committed), 5)
        alice.transport.clear()
        with capturedLogs() as events:
            alice.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(alice.replies(), [b"450 4.7.1 Sending quota exceeded, try again later"])
        named = [e for e in events if e.get("user") == ALICE and "quota" in (e.get("log_format") or "")]
        self.assertEqual(len(named), 1)
        self.assertEqual(named[0]["limit"], 5)

        bob = self.session(BOB, "hunter2")
        bob.send(message("bob@example.org"))
        self.assertEqual(bob.codes(), [b"250", b"250", b"354", b"250"])

        self.clock.advance(3600)
        again = self.session(ALICE, "correct horse")
        again.send(message(ALICE))
        self.assertEqual(again.codes(), [b"250", b"250", b"354", b"250"])

    def test_unauthenticatedNotCounted(self) -> None:
        """
        Sessions without AUTH (an MX receiving mail) are not held to the
        quotas and charge nothing.
        """
        conn = connect(quotas=self.quotas)
        conn.send(EHLO)
        conn.transport.clear()
        for _ in range(7):
            conn.send(message("sender@example.net"))
        self.assertEqual(conn.codes(), [b"250", b"250", b"354", b"250"] * 7)
        self.assertEqual(len(self.state), 0)

    def test_chargedAfterThe250(self) -> None:
        """
        A message is charged when the queue has it (the 250), not before;
        a refused message and an abandoned transaction cost nothing.
        """
        conn = self.session(ALICE, "correct horse")
        pending: Deferred[str] = Deferred()
        conn.queue.commitResult = pending
        conn.send(message(ALICE, "a@example.org", "b@example.org"))
        self.assertEqual(conn.codes(), [b"250", b"250", b"250", b"354"])
        usage = self.successResultOf(self.quotas.usage(ALICE))
        self.assertEqual(usage["messages_per_hour"], (0, 5))
        pending.callback("Q1")
        self.assertEqual(conn.codes()[-1], b"250")
        usage = self.successResultOf(self.quotas.usage(ALICE))
        self.assertEqual(usage["messages_per_hour"], (1, 5))
        self.assertEqual(usage["recipients_per_hour"], (2, None))

        conn.queue.commitResult = None
        conn.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<c@example.org>\r\nRSET\r\n")
        usage = self.successResultOf(self.quotas.usage(ALICE))
        self.assertEqual(usage["messages_per_hour"], (1, 5))

    def test_refusedMessageNotCharged(self) -> None:
        """
        A message a policy refuses at the end of its header is not charged.
        """
        clock = Clock()
        q = quotas(clock, messagesPerHour=5)
        policy = StagePolicy(message=Verdict.reject(550, "5.7.1", "No"))
        conn = connect(
            "submission",
            policies=(policy,),
            tlsOptions=object(),
            transportFactory=TLSStringTransport,
            auth=makeAuth(clock),
            clock=clock,
            quotas=q,
        )
        conn.send(EHLO + b"STARTTLS\r\n")
        conn.send(EHLO)
        login(conn, ALICE, "correct horse")
        conn.send(message(ALICE))
        self.assertEqual(conn.replies()[-1], b"550 5.7.1 No")
        self.assertEqual(self.successResultOf(q.usage(ALICE))["messages_per_hour"], (0, 5))

    def test_recipientQuota(self) -> None:
        """
        Past C{recipients_per_hour}, further RCPTs get 450 4.7.1, also when
        pipelined (checks still running count as added).
        """
        clock = Clock()
        q = quotas(clock, recipientsPerHour=2)
        conn = secure(clock=clock, quotas=q)
        login(conn, ALICE, "correct horse")
        conn.send(message(ALICE, "a@example.org", "b@example.org", "c@example.org"))
        self.assertEqual(
            conn.replies(),
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 Ok",
                b"250 2.1.5 Ok",
                b"450 4.7.1 Sending quota exceeded, try again later",
                b"354 End data with <CR><LF>.<CR><LF>",
                conn.replies()[-1],
            ],
        )
        self.assertEqual(conn.codes()[-1], b"250")
        self.assertEqual(len(conn.queue.committed[0][0].recipients), 2)


class RestartTests(SynchronousTestCase):
    def test_countsSurviveRestart(self) -> None:
        """
        With an SQLite queue's shared state, what a user has sent survives
        closing and reopening the queue (a restart): the sixth message is
        still refused afterwards.
        """
        clock = Clock()
        path = Path(self.mktemp()) / "queue.sqlite"
        path.parent.mkdir()
        queue = synchronousQueue(path, clock)
        state = sharedStateFor(queue)
        self.assertIs(state, queue)
        before = quotas(clock, state, messagesPerHour=5)
        for _ in range(5):
            self.assertIsNone(self.successResultOf(before.checkMessage(ALICE)))
            self.successResultOf(before.charge(ALICE, 1))
        self.successResultOf(queue.close())

        reopened = synchronousQueue(path, clock)
        after = quotas(clock, sharedStateFor(reopened), messagesPerHour=5)
        self.assertEqual(self.successResultOf(after.checkMessage(ALICE)), OVER_QUOTA)
        self.assertIsNone(self.successResultOf(after.checkMessage(BOB)))
        self.assertEqual(self.successResultOf(after.usage(ALICE))["messages_per_hour"], (5, 5))
        self.successResultOf(reopened.close())


class LimitsTests(SynchronousTestCase):
    LIMITS = b"LIMITS RCPTMAX=7 MAILMAX=3"

    def test_everyListener(self) -> None:
        """
        EHLO advertises C{LIMITS RCPTMAX=n MAILMAX=m} with the session's
        limits on every listener kind, before and after STARTTLS.
        """
        limits = SMTPLimits(maxRecipients=7, maxTransactions=3)
        for kind in ("smtp", "submission", "submissions"):
            tls = kind == "submissions"
            conn = connect(
                kind,
                limits=limits,
                tlsOptions=object(),
                transportFactory=TLSStringTransport,
                auth=makeAuth(Clock()),
                greet=False,
            )
            if tls:
                conn.transport.startTLS(object())  # type: ignore[attr-defined]
            conn.transport.clear()
            conn.send(EHLO)
            self.assertIn(b"250-" + self.LIMITS, conn.lines(), kind)
            if not tls:
                conn.transport.clear()
                conn.send(b"STARTTLS\r\n")
                conn.send(EHLO)
                self.assertIn(b"250-" + self.LIMITS, conn.lines(), kind)

    def test_mailmaxEnforced(self) -> None:
        """
        Past C{max_transactions} accepted MAIL commands, a further MAIL gets
        452 4.5.3, also after RSET; a refused MAIL does not count.
        """
        conn = connect(limits=SMTPLimits(maxTransactions=2))
        conn.send(EHLO)
        conn.transport.clear()
        conn.send(b"MAIL FROM:<bad\r\n")
        conn.send(message("a@example.net") + b"MAIL FROM:<a@example.net>\r\nRSET\r\n")
        conn.send(b"MAIL FROM:<a@example.net>\r\nRSET\r\nMAIL FROM:<a@example.net>\r\n")
        self.assertEqual(
            conn.codes(), [b"501", b"250", b"250", b"354", b"250", b"250", b"250", b"452", b"250", b"452"]
        )
        self.assertEqual(
            conn.replies()[-1], b"452 4.5.3 Too many transactions in this session, start a new one"
        )

    def test_range(self) -> None:
        """
        RFC 9422 limits are 1 to 6 digits: 0 and 1000000 are refused at
        configuration time.
        """
        self.assertRaises(ValueError, SMTPLimits, maxTransactions=0)
        self.assertRaises(ValueError, SMTPLimits, maxRecipients=0)
        self.assertRaises(ValueError, SMTPLimits, maxTransactions=1_000_000)
        self.assertRaises(ValueError, SMTPLimits, maxRecipients=1_000_000)
        self.assertEqual(SMTPLimits(maxTransactions=999_999).maxTransactions, 999_999)
