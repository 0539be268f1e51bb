"""
Tests for how the AUTH exchange names users to the log and the lockout.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.auth._lockout import MAX_USER_OCTETS, AuthLockout, LockoutSettings
from mailfw.sharedstate import MemorySharedState
from mailfw.smtp._sasl import printable


class PrintableTests(SynchronousTestCase):
    def test_controlCharactersEscaped(self) -> None:
        """
        Control characters cannot forge a log line.
        """
        self.assertEqual(printable(b"al\r\nice\x00"), "al\\x0d\\x0aice\\x00")

    def test_longNamesKeepTheirTail(self) -> None:
        """
        Names are cut only at the lockout's own bound, so two users whose
        names share a 64-character prefix have separate locks.
        """
        prefix = "a" * 64
        self.assertEqual(printable(prefix + "bob"), prefix + "bob")
        self.assertEqual(len(printable("x" * 1000)), MAX_USER_OCTETS)
        lockout = AuthLockout(MemorySharedState(), Clock(), LockoutSettings(userFailures=2))
        for _ in range(2):
            self.successResultOf(lockout.failed("192.0.2.1", printable(prefix + "mallory")))
        self.assertIsNotNone(self.successResultOf(lockout.check("192.0.2.1", printable(prefix + "mallory"))))
        self.assertIsNone(self.successResultOf(lockout.check("192.0.2.1", printable(prefix + "bob"))))
