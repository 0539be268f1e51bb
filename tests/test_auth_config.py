"""
The C{[auth]} section and its wiring into the listeners (L{mailfw.tap}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.auth import IMailUser, PasswordFileChecker, hashPassword
from mailfw.auth._config import authFromConfig
from mailfw.config import ComponentContext, ConfigError, Section, loadConfig
from mailfw.tap import buildService


def context(testCase: SynchronousTestCase) -> ComponentContext:
    path = Path(testCase.mktemp())
    path.mkdir()
    return ComponentContext(reactor=MemoryReactorClock(), hostname="mx.test", dataDir=path)


def build(testCase: SynchronousTestCase, **options: Any) -> Any:
    return authFromConfig(Section("[auth]", options), context(testCase), lambda f, *a: maybeDeferred(f, *a))


class AuthConfigTests(SynchronousTestCase):
    def test_none(self) -> None:
        """
        Without C{passwords} or C{checker} there is no AUTH.
        """
        self.assertIsNone(build(self))
        self.assertIsNone(build(self, sender_check="any"))

    def test_passwords(self) -> None:
        """
        C{passwords} names a file in the data directory, checked by
        L{PasswordFileChecker}; the other keys set the mechanisms, the
        throttle and the sender rules.
        """
        setup = build(
            self,
            passwords="passwd",
            mechanisms=["plain"],
            smtp=True,
            sender_check="domain",
            received_identity=True,
            user_failures=3,
            timeout=5,
            threads=2,
            senders={"bob": ["@Example.org"]},
            etrn={"bob": "example.org"},
        )
        auth = setup.auth
        self.assertTrue(setup.offerOnSMTP)
        self.assertEqual(auth.mechanisms, ("PLAIN",))
        self.assertTrue(auth.receivedIdentity)
        self.assertEqual(auth.timeout, 5.0)
        self.assertEqual(setup.lockout.settings.userFailures, 3)
        [checker] = set(auth.portal.checkers.values())
        self.assertIsInstance(checker, PasswordFileChecker)
        self.assertEqual(checker.path.name, "passwd")
        avatar = auth.portal.realm.avatarFor("bob")
        self.assertEqual(
            (avatar.senders, avatar.etrnDomains, avatar.senderCheck),
            (("@example.org",), ("example.org",), "domain"),
        )

    def test_oldThrottleKeysRefused(self) -> None:
        """
        The per-address throttle's keys of earlier versions are refused,
        naming what replaced them, instead of being silently ignored.
        """
        for key, replacement in [
            ("max_failures", "user_failures"),
            ("failure_window", "user_failure_window"),
            ("lockout", "user_lockout"),
            ("failure_delay", "penalty_delay"),
            ("max_tracked_clients", "shared state"),
        ]:
            with self.assertRaisesRegex(ConfigError, rf"\[auth\] {key}: no longer used.*{replacement}"):
                build(self, passwords="passwd", **{key: 5})

    def test_loginThroughFile(self) -> None:
        """
        The configured portal accepts a user of the password file.
        """
        ctx = context(self)
        (ctx.dataDir / "passwd").write_text(f"alice:{hashPassword('pw', logN=4, r=1)}\n")
        setup = authFromConfig(
            Section("[auth]", {"passwords": "passwd"}), ctx, lambda f, *a: maybeDeferred(f, *a)
        )
        assert setup is not None
        _, avatar, _ = self.successResultOf(
            setup.auth.portal.login(UsernamePassword(b"alice", b"pw"), None, IMailUser)
        )
        self.assertEqual(IMailUser(avatar).identity, "alice")

    def test_strcredChecker(self) -> None:
        """
        C{checker} takes a C{twisted.cred.strcred} description (here the
        plaintext C{file:} checker).
        """
        ctx = context(self)
        users = ctx.dataDir / "users"
        users.write_text("carol:pw\n")
        setup = authFromConfig(
            Section("[auth]", {"checker": f"file:{users}"}), ctx, lambda f, *a: maybeDeferred(f, *a)
        )
        assert setup is not None
        self.failureResultOf(setup.auth.portal.login(UsernamePassword(b"carol", b"bad"), None, IMailUser))
        _, avatar, _ = self.successResultOf(
            setup.auth.portal.login(UsernamePassword(b"carol", b"pw"), None, IMailUser)
        )
        self.assertEqual(IMailUser(avatar).identity, "carol")

    def test_errors(self) -> None:
        """
        Mistakes are configuration errors naming C{[auth]}.
        """
        cases: list[dict[str, object]] = [
            {"passwords": "p", "checker": "memory:a:b"},
            {"passwords": "p", "mechanisms": ["CRAM-MD5"]},
            {"passwords": "p", "mechanisms": []},
            {"passwords": "p", "sender_check": "some"},
            {"passwords": "p", "max_failures": 0},
            {"passwords": "p", "senders": {"a": ["not an address"]}},
            {"passwords": "p", "senders": {"a": [1]}},
            {"passwords": "p", "etrn": {"a": ["bad domain!"]}},
            {"passwords": "p", "pasword": "typo"},
            {"checker": "nosuchchecker:x"},
            {"checker": "anonymous"},
            {"smtp": True},
        ]
        for options in cases:
            error = self.assertRaises(ConfigError, build, self, **options)
            self.assertIn("[auth]", str(error), options)


def writeConfig(testCase: SynchronousTestCase, text: str) -> str:
    path = Path(testCase.mktemp())
    path.mkdir(parents=True)
    (path / "mailfw.toml").write_text(text)
    return str(path / "mailfw.toml")


CONFIG = """
[listen]
smtp = ["tcp:2525"]
submission = ["tcp:2587"]
[queue]
plugin = "memory"
[routing]
plugin = "static"
local_domains = ["example.org"]
[delivery.local]
plugin = "discard"
"""


class WiringTests(SynchronousTestCase):
    def factories(self, auth: str) -> dict[int, Any]:
        reactor = MemoryReactorClock()
        config = loadConfig(writeConfig(self, CONFIG + auth), hostname="mx.test")
        service = buildService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return {port: factory for port, factory, _, _ in reactor.tcpServers}

    def test_submissionOnly(self) -> None:
        """
        By default AUTH is offered on submission listeners, not on the MX.
        """
        factories = self.factories('[auth]\npasswords = "passwd"\n')
        self.assertIsNotNone(factories[2587].auth)
        self.assertIsNone(factories[2525].auth)

    def test_onMX(self) -> None:
        """
        With C{smtp = true} the MX offers it too, with the same throttle.
        """
        factories = self.factories('[auth]\npasswords = "passwd"\nsmtp = true\n')
        self.assertIs(factories[2525].auth, factories[2587].auth)

    def test_notConfigured(self) -> None:
        """
        Without C{[auth]} no listener offers AUTH.
        """
        factories = self.factories("")
        self.assertIsNone(factories[2587].auth)
