"""
Tests for L{mailfw.auth._lockout}: the AUTH penalty delay, the lock per
(client network, user name) pair and the per-address hard block, on a
L{Clock} with L{MemorySharedState}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.auth import AuthLockout, LockoutSettings
from mailfw.auth._config import authFromConfig
from mailfw.auth._lockout import AUTH_LOCKED, AUTH_LOCKOUT_UNAVAILABLE, MAX_USER_OCTETS, normaliseUser
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.interfaces import ISharedState
from mailfw.reply import SMTPReply
from mailfw.sharedstate import MemorySharedState

OFFICE = "203.0.113.7"


class Session:
    """
    What the SMTP session does with L{AuthLockout} for one AUTH exchange,
    with the replies it would send and when it would send them.
    """

    def __init__(self, lockout: AuthLockout, clock: Clock) -> None:
        self.lockout = lockout
        self.clock = clock

    def auth(self, host: str, user: str, rightPassword: bool) -> Deferred[tuple[str, float]]:
        """
        One AUTH: check the pair, then "check the password" (right or
        wrong), record the outcome, and send the reply after the delay.

        @return: fires with the reply (C{"235"}, C{"535"} or the lock's
            code) and the clock time it was sent at.
        """
        return Deferred.fromCoroutine(self._auth(host, user, rightPassword))

    async def _auth(self, host: str, user: str, rightPassword: bool) -> tuple[str, float]:
        refusal = await self.lockout.check(host, user)
        if refusal is not None:
            reply = f"{refusal.code} {refusal.enhanced}"
        elif rightPassword:
            await self.lockout.succeeded(host, user)
            reply = "235"
        else:
            await self.lockout.failed(host, user)
            reply = "535"
        seconds = await self.lockout.delay(host)
        if seconds:
            await deferLater(self.clock, seconds)
        return reply, self.clock.seconds()


class LockoutTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = MemorySharedState()
        self.events: list[dict[str, Any]] = []
        self.lockout = self.make()

    def make(self, state: Any = None, **settings: Any) -> AuthLockout:
        lockout = AuthLockout(self.state if state is None else state, self.clock, LockoutSettings(**settings))
        lockout.log = Logger(observer=cast(ILogObserver, self.events.append))
        return lockout

    def fail_(self, host: str, user: str, times: int = 1, lockout: AuthLockout | None = None) -> None:
        for _ in range(times):
            self.successResultOf((lockout or self.lockout).failed(host, user))

    def check(self, host: str, user: str, lockout: AuthLockout | None = None) -> SMTPReply | None:
        return self.successResultOf((lockout or self.lockout).check(host, user))

    def delay(self, host: str) -> float:
        return self.successResultOf(self.lockout.delay(host))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


class MustShowTests(LockoutTestCase):
    """
    The three cases issue 22 asks for.
    """

    def test_wrongThenRightSucceeds(self) -> None:
        """
        A wrong password and then the right one from the same address: the
        failure's reply waits 2 s, the second attempt is checked, succeeds
        and is answered at once, and after it the address has no penalty
        left.
        """
        session = Session(self.lockout, self.clock)
        start = self.clock.seconds()
        first = session.auth(OFFICE, "alice", rightPassword=False)
        self.clock.advance(1.999)
        self.assertNoResult(first)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(first), ("535", start + 2))

        second = session.auth(OFFICE, "alice", rightPassword=True)
        self.assertEqual(self.successResultOf(second), ("235", start + 2))
        self.assertEqual(self.delay(OFFICE), 0.0)

    def test_fiftyWrongPasswordsLockOnlyThatPair(self) -> None:
        """
        50 wrong passwords for one user from one address: the 10th locks
        (network, alice), the other 40 are refused without a check, and
        bob at the same address still logs in; alice from another network
        too.  One log line says who was locked where.
        """
        session = Session(self.lockout, self.clock)
        start = self.clock.seconds()
        replies = []
        for _ in range(50):
            d = session.auth(OFFICE, "alice", rightPassword=False)
            self.clock.advance(15)
            replies.append(self.successResultOf(d)[0])
        self.assertEqual(replies, ["535"] * 10 + ["454 4.7.0"] * 40)
        self.assertEqual(self.check(OFFICE, "alice"), AUTH_LOCKED)
        self.assertEqual(self.check("203.0.113.200", "alice"), AUTH_LOCKED, "same /24")
        self.assertIsNone(self.check(OFFICE, "bob"))
        self.assertIsNone(self.check("198.51.100.7", "alice"))

        bob = session.auth(OFFICE, "bob", rightPassword=True)
        self.clock.advance(15)
        self.assertEqual(self.successResultOf(bob)[0], "235")

        [locked] = self.named("auth-pair-locked")
        self.assertEqual(
            (locked["user"], locked["peer"], locked["network"], locked["failures"], locked["until"]),
            ("alice", OFFICE, "203.0.113.0/24", 10, start + 9 * 15 + 900),
        )
        self.assertEqual(locked["log_level"].name, "warn")
        self.assertEqual(
            formatEvent(locked),
            f"AUTH for alice from 203.0.113.0/24 locked until {start + 9 * 15 + 900}"
            f" after 10 failures (the last from {OFFICE})",
        )
        self.assertEqual(self.named("auth-address-blocked"), [])

    def test_delaysGrowAndCap(self) -> None:
        """
        The replies after 1, 2, 3, 4 and 5 failures wait 2, 4, 8, 15 and 15
        seconds, measured on the clock.
        """
        session = Session(self.lockout, self.clock)
        waited = []
        for i in range(5):
            start = self.clock.seconds()
            d = session.auth(OFFICE, f"user{i}", rightPassword=False)
            self.clock.pump([0.5] * 40)
            reply, sentAt = self.successResultOf(d)
            self.assertEqual(reply, "535")
            waited.append(sentAt - start)
        self.assertEqual(waited, [2.0, 4.0, 8.0, 15.0, 15.0])


class DelayTests(LockoutTestCase):
    def test_cleanClient(self) -> None:
        """
        A client without failures gets its replies at once.
        """
        self.assertEqual(self.delay(OFFICE), 0.0)

    def test_perAddress(self) -> None:
        """
        The penalty is the failing address's: its neighbour in the same
        /24 is not slowed down.
        """
        self.fail_(OFFICE, "alice", 3)
        self.assertEqual(self.delay(OFFICE), 8.0)
        self.assertEqual(self.delay("203.0.113.8"), 0.0)

    def test_largeCount(self) -> None:
        """
        However many failures, the delay stays the cap.
        """
        lockout = self.make(userFailures=10_000, addressFailures=10_000)
        self.fail_(OFFICE, "alice", 2000, lockout)
        self.assertEqual(self.successResultOf(lockout.delay(OFFICE)), 15.0)

    def test_configured(self) -> None:
        """
        The first delay and the cap are settings.
        """
        lockout = self.make(penaltyDelay=1, maxPenaltyDelay=3)
        delays = []
        for _ in range(4):
            self.fail_(OFFICE, "alice", lockout=lockout)
            delays.append(self.successResultOf(lockout.delay(OFFICE)))
        self.assertEqual(delays, [1.0, 2.0, 3.0, 3.0])

    def test_successClearsPenalty(self) -> None:
        """
        A right password ends the address's penalty.
        """
        self.fail_(OFFICE, "alice", 2)
        self.successResultOf(self.lockout.succeeded(OFFICE, "bob"))
        self.assertEqual(self.delay(OFFICE), 0.0)


class ExpiryTests(LockoutTestCase):
    def test_penaltyExpires(self) -> None:
        """
        The penalty ends C{penaltyWindow} (15 min) after the first failure.
        """
        self.fail_(OFFICE, "alice", 2)
        self.clock.advance(899)
        self.assertEqual(self.delay(OFFICE), 4.0)
        self.clock.advance(1)
        self.assertEqual(self.delay(OFFICE), 0.0)

    def test_pairLockExpires(self) -> None:
        """
        A locked pair is refused for C{userLockout} (15 min), then gets its
        ten tries again.
        """
        self.fail_(OFFICE, "alice", 10)
        self.clock.advance(899)
        self.assertEqual(self.check(OFFICE, "alice"), AUTH_LOCKED)
        self.clock.advance(1)
        self.assertIsNone(self.check(OFFICE, "alice"))
        self.fail_(OFFICE, "alice", 9)
        self.assertIsNone(self.check(OFFICE, "alice"))
        self.fail_(OFFICE, "alice")
        self.assertEqual(self.check(OFFICE, "alice"), AUTH_LOCKED)
        self.assertEqual(len(self.named("auth-pair-locked")), 2)

    def test_pairFailuresExpire(self) -> None:
        """
        Nine failures, then a pause longer than the window: the count
        starts again, so a user who mistypes now and then is never locked.
        """
        self.fail_(OFFICE, "alice", 9)
        self.clock.advance(900)
        self.fail_(OFFICE, "alice", 9)
        self.assertIsNone(self.check(OFFICE, "alice"))

    def test_successClearsPairFailures(self) -> None:
        """
        A right password forgets the pair's failures.
        """
        self.fail_(OFFICE, "alice", 9)
        self.successResultOf(self.lockout.succeeded(OFFICE, "alice"))
        self.fail_(OFFICE, "alice", 9)
        self.assertIsNone(self.check(OFFICE, "alice"))

    def test_addressBlockExpires(self) -> None:
        """
        100 failures from one address, for as many user names, block it for
        every user for C{addressBlock} (1 h), with one log line; then it is
        free again.  Another address is never blocked.
        """
        for i in range(100):
            self.assertIsNone(self.check(OFFICE, f"user{i}"))
            self.fail_(OFFICE, f"user{i}")
        self.assertEqual(self.check(OFFICE, "bob"), AUTH_LOCKED)
        self.assertIsNone(self.check("203.0.113.8", "bob"))
        [blocked] = self.named("auth-address-blocked")
        self.assertEqual(
            (blocked["user"], blocked["peer"], blocked["failures"], blocked["until"]),
            ("user99", OFFICE, 100, self.clock.seconds() + 3600),
        )
        self.clock.advance(3599)
        self.assertEqual(self.check(OFFICE, "bob"), AUTH_LOCKED)
        self.clock.advance(1)
        self.assertIsNone(self.check(OFFICE, "bob"))

    def test_successDoesNotClearAddressCount(self) -> None:
        """
        A success does not reset the address's count, or one valid account
        would let an attacker spray user names without end.
        """
        for i in range(99):
            self.fail_(OFFICE, f"user{i}")
        self.successResultOf(self.lockout.succeeded(OFFICE, "mallory"))
        self.fail_(OFFICE, "user99")
        self.assertEqual(self.check(OFFICE, "mallory"), AUTH_LOCKED)


class GroupingTests(LockoutTestCase):
    def test_ipv6Slash64(self) -> None:
        """
        IPv6 clients are grouped per /64, for pair locks and penalties.
        """
        self.fail_("2001:db8:1:2::1", "alice", 10)
        self.assertEqual(self.check("2001:db8:1:2:ffff:ffff:ffff:ffff", "alice"), AUTH_LOCKED)
        self.assertIsNone(self.check("2001:db8:1:3::1", "alice"))
        self.assertIsNone(self.check("2001:db8:1:2::1", "bob"))
        self.assertEqual(self.delay("2001:db8:1:2::99"), 15.0)
        self.assertEqual(self.delay("2001:db8:1:3::1"), 0.0)
        self.assertEqual(self.named("auth-pair-locked")[0]["network"], "2001:db8:1:2::/64")

    def test_ipv4Mapped(self) -> None:
        """
        An IPv4-mapped IPv6 address counts as the IPv4 address.
        """
        self.fail_("::ffff:203.0.113.7", "alice", 10)
        self.assertEqual(self.check(OFFICE, "alice"), AUTH_LOCKED)

    def test_configuredPrefixes(self) -> None:
        """
        The network of a pair is configurable per address family.
        """
        lockout = self.make(networkPrefixV4=32, networkPrefixV6=48)
        self.fail_(OFFICE, "alice", 10, lockout)
        self.assertIsNone(self.check("203.0.113.8", "alice", lockout))
        self.fail_("2001:db8:1:2::1", "alice", 10, lockout)
        self.assertEqual(self.check("2001:db8:1:9::1", "alice", lockout), AUTH_LOCKED)

    def test_caseFolded(self) -> None:
        """
        C{Alice} and C{ALICE} are one user name for the count.
        """
        self.fail_(OFFICE, "Alice", 5)
        self.fail_(OFFICE, "ALICE", 5)
        self.assertEqual(self.check(OFFICE, "alice"), AUTH_LOCKED)

    def test_workersShareState(self) -> None:
        """
        Two processes' lockouts over one shared state see each other's
        failures.
        """
        other = self.make()
        self.fail_(OFFICE, "alice", 5)
        self.fail_(OFFICE, "alice", 5, other)
        self.assertEqual(self.check(OFFICE, "alice"), AUTH_LOCKED)
        self.assertEqual(self.check(OFFICE, "alice", other), AUTH_LOCKED)


class ExemptTests(LockoutTestCase):
    def test_loopback(self) -> None:
        """
        Loopback (a webmail on this host) gets no delay and no address
        block, but a pair lock still protects each account.
        """
        for host in ("127.0.0.1", "::1"):
            for i in range(150):
                self.fail_(host, f"user{i}")
            self.assertEqual(self.delay(host), 0.0)
            self.assertIsNone(self.check(host, "bob"))
            self.fail_(host, "alice", 10)
            self.assertEqual(self.check(host, "alice"), AUTH_LOCKED)
        self.assertEqual(self.named("auth-address-blocked"), [])

    def test_configured(self) -> None:
        """
        Configured exempt networks replace the default.
        """
        lockout = self.make(exemptNetworks=("192.0.2.0/24",))
        self.fail_("192.0.2.9", "alice", 3, lockout)
        self.assertEqual(self.successResultOf(lockout.delay("192.0.2.9")), 0.0)
        self.fail_("127.0.0.1", "alice", 3, lockout)
        self.assertEqual(self.successResultOf(lockout.delay("127.0.0.1")), 8.0)


class BoundsTests(LockoutTestCase):
    def test_floodOfAddresses(self) -> None:
        """
        Failures from 5,000 addresses do not grow the store past its bound,
        and the lockout keeps nothing of its own per client.
        """
        state = MemorySharedState(maxKeys=100)
        lockout = self.make(state)
        before = dict(vars(lockout))
        for i in range(5_000):
            self.fail_(f"10.{i // 256 % 256}.{i % 256}.1", f"user{i}", lockout=lockout)
        self.assertEqual(len(state), 100)
        self.assertEqual(vars(lockout), before)

    def test_oddUserNames(self) -> None:
        """
        User names with control characters, NUL, separators, invalid
        UTF-8 (decoded with surrogateescape) or megabytes of text become
        bounded keys and log fields of safe characters only, and still
        lock their own pair.
        """
        names = [
            "al\x00ice",
            "alice\r\nforged: line",
            "a:b%41",
            "\udcff\udcfe",
            "x" * 1_000_000,
            "ünïcødé@exämple.org",
            "",
        ]
        safe = set("abcdefghijklmnopqrstuvwxyz0123456789.-_@+%ABCDEF")
        for name in names:
            self.fail_(OFFICE, name, 10)
            self.assertEqual(self.check(OFFICE, name), AUTH_LOCKED, repr(name[:20]))
            self.assertIsNone(self.check(OFFICE, "2" + name), repr(name[:20]))
            normal = normaliseUser(name)
            self.assertLessEqual(set(normal), safe, repr(name[:20]))
            self.assertLessEqual(len(normal), 3 * MAX_USER_OCTETS)
        self.assertEqual(normaliseUser("alice\r\nforged: line"), "alice%0D%0Aforged%3A%20line")
        self.assertNotEqual(normaliseUser("a:b"), normaliseUser("a%3Ab"))
        events = self.named("auth-pair-locked")
        self.assertEqual(len(events), len(names))
        for event in events:
            self.assertLessEqual(set(event["user"]), safe)
            self.assertTrue(formatEvent(event).isprintable(), formatEvent(event))
        for key in self.state._entries:
            self.assertLessEqual(len(key), 100 + 3 * MAX_USER_OCTETS)
            self.assertTrue(key.isprintable() and " " not in key, key)

    def test_nonIPHost(self) -> None:
        """
        A peer that is no IP address (a UNIX socket) is its own network.
        """
        self.fail_("/run/mailfw/submit\x00", "alice", 10)
        self.assertEqual(self.check("/run/mailfw/submit\x00", "alice"), AUTH_LOCKED)
        self.assertIsNone(self.check(OFFICE, "alice"))


@implementer(ISharedState)
class BrokenState:
    """
    Shared state whose database is down.
    """

    def count(self, key: str, amount: int, window: float, now: float) -> Deferred[int]:
        return fail(OSError("database is down"))

    def mark(self, key: str, lifetime: float, now: float) -> Deferred[float]:
        return fail(OSError("database is down"))

    def forget(self, key: str) -> Deferred[None]:
        return fail(OSError("database is down"))


class FailureTests(LockoutTestCase):
    def test_brokenState(self) -> None:
        """
        When the shared state fails, AUTH is refused for now (454) instead
        of letting guesses through uncounted, the penalty is the longest,
        and recording outcomes fails nobody; each failure is logged.
        """
        lockout = self.make(BrokenState())
        self.assertEqual(self.check(OFFICE, "alice", lockout), AUTH_LOCKOUT_UNAVAILABLE)
        self.assertEqual(AUTH_LOCKOUT_UNAVAILABLE.code, 454)
        self.assertEqual(self.successResultOf(lockout.delay(OFFICE)), 15.0)
        self.assertIsNone(self.successResultOf(lockout.failed(OFFICE, "alice")))
        self.assertIsNone(self.successResultOf(lockout.succeeded(OFFICE, "alice")))
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 4)
        self.assertTrue(all(e["log_failure"].check(OSError) for e in failures))

    def test_replies(self) -> None:
        """
        Refusals are temporary (RFC 4954 454 4.7.0) and name no user.
        """
        self.assertEqual((AUTH_LOCKED.code, AUTH_LOCKED.enhanced), (454, "4.7.0"))
        self.assertNotIn("user", AUTH_LOCKED.text.lower())

    def test_settingsChecked(self) -> None:
        """
        Impossible settings are refused when made.
        """
        cases: list[dict[str, Any]] = [
            {"userFailures": 0},
            {"addressFailures": 0},
            {"penaltyDelay": -1},
            {"networkPrefixV4": 33},
            {"networkPrefixV6": 129},
            {"exemptNetworks": ("not a network",)},
        ]
        for settings in cases:
            self.assertRaises(ValueError, LockoutSettings, **settings)


class ConfigTests(SynchronousTestCase):
    def build(self, queue: object = None, **options: Any) -> Any:
        path = Path(self.mktemp())
        path.mkdir()
        context = ComponentContext(
            reactor=MemoryReactorClock(), hostname="mx.test", dataDir=path, queue=queue
        )
        return authFromConfig(
            Section("[auth]", {"passwords": "passwd", **options}),
            context,
            lambda f, *a: maybeDeferred(f, *a),
        )

    def test_defaults(self) -> None:
        """
        Without lockout keys the defaults apply, in a bounded in-memory
        store when the queue keeps no shared state.
        """
        setup = self.build()
        self.assertEqual(setup.lockout.settings, LockoutSettings())
        self.assertIsInstance(setup.lockout.state, MemorySharedState)

    def test_keys(self) -> None:
        """
        Every setting has its key in C{[auth]}.
        """
        setup = self.build(
            penalty_delay=1,
            max_penalty_delay=10,
            penalty_window=60,
            user_failures=3,
            user_failure_window=120,
            user_lockout=300,
            address_failures=50,
            address_failure_window=600,
            address_block=1200,
            network_prefix_v4=32,
            network_prefix_v6=56,
            exempt_networks=["192.0.2.0/24"],
        )
        self.assertEqual(
            setup.lockout.settings,
            LockoutSettings(
                penaltyDelay=1.0,
                maxPenaltyDelay=10.0,
                penaltyWindow=60.0,
                userFailures=3,
                userWindow=120.0,
                userLockout=300.0,
                addressFailures=50,
                addressWindow=600.0,
                addressBlock=1200.0,
                networkPrefixV4=32,
                networkPrefixV6=56,
                exemptNetworks=("192.0.2.0/24",),
            ),
        )

    def test_queueState(self) -> None:
        """
        A queue that keeps shared state holds the counters, so that every
        process and node sees them.
        """
        state = MemorySharedState()
        setup = self.build(queue=state)
        self.assertIs(setup.lockout.state, state)

    def test_errors(self) -> None:
        """
        Wrong values are configuration errors naming C{[auth]} and the key.
        """
        cases: list[tuple[dict[str, Any], str]] = [
            ({"user_failures": 0}, "user_failures"),
            ({"address_failures": 0}, "address_failures"),
            ({"penalty_delay": -1}, "penalty_delay"),
            ({"user_lockout": "long"}, "user_lockout"),
            ({"network_prefix_v4": 33}, "network_prefix_v4"),
            ({"network_prefix_v6": 129}, "network_prefix_v6"),
            ({"exempt_networks": ["10.0.0.0/33"]}, "exempt_networks"),
            ({"exempt_networks": [1]}, "exempt_networks"),
        ]
        for options, key in cases:
            e = self.assertRaises(ConfigError, self.build, **options)
            self.assertTrue(str(e).startswith(f"[auth] {key}"), str(e))
