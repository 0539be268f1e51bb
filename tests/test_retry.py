"""
Tests for L{mailfw.scheduling._retry.RetrySchedule}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ConfigError, Section
from mailfw.scheduling._retry import RetrySchedule


class RetryScheduleTests(SynchronousTestCase):
    """
    The retry schedule's delays, expiry and delay warning.
    """

    def test_defaults(self) -> None:
        """
        The default is Postfix-like: 300 s, doubling, at most 4000 s, five
        days, a delay warning after four hours.
        """
        s = RetrySchedule(jitter=0)
        self.assertEqual([s.delay(n) for n in range(1, 7)], [300, 600, 1200, 2400, 4000, 4000])
        self.assertEqual(s.expires(1000), 1000 + 5 * 86400)
        self.assertFalse(s.shouldWarn(1000 + 4 * 3600 - 1, 1000))
        self.assertTrue(s.shouldWarn(1000 + 4 * 3600, 1000))

    def test_jitter(self) -> None:
        """
        Jitter spreads each delay by up to the fraction either way, using
        the injected random source.
        """
        self.assertEqual(RetrySchedule(jitter=0.1, random=lambda: 0.0).delay(1), 270)
        self.assertEqual(RetrySchedule(jitter=0.1, random=lambda: 0.5).delay(1), 300)
        self.assertAlmostEqual(RetrySchedule(jitter=0.1, random=lambda: 0.999).delay(5), 4399.2)

    def test_nextAttemptStopsAtExpiry(self) -> None:
        """
        The last retry falls exactly on the expiry time, and after it there
        is none.
        """
        s = RetrySchedule(jitter=0, maxLifetime=1000)
        self.assertEqual(s.nextAttempt(0, 0, 1), 300)
        self.assertEqual(s.nextAttempt(900, 0, 3), 1000)
        self.assertIsNone(s.nextAttempt(1000, 0, 4))

    def test_noWarning(self) -> None:
        """
        Without a warning time no delay notice is due.
        """
        self.assertFalse(RetrySchedule(delayWarning=None).shouldWarn(10**9, 0))

    def test_domainOverrides(self) -> None:
        """
        A per-domain schedule applies to the domain and its subdomains; the
        most specific one wins.
        """
        fast = RetrySchedule(firstRetry=10)
        faster = RetrySchedule(firstRetry=1)
        s = RetrySchedule(domains=(("example.com", fast), ("mx.example.com", faster)))
        self.assertIs(s.forDomain("example.com"), fast)
        self.assertIs(s.forDomain("a.example.com"), fast)
        self.assertIs(s.forDomain("b.mx.example.com"), faster)
        self.assertIs(s.forDomain("badexample.com"), s)

    def test_fromSection(self) -> None:
        """
        C{[scheduler]} keys set the schedule; per-domain tables inherit the
        rest; other keys are left for the caller.
        """
        section = Section(
            "[scheduler]",
            {
                "first_retry": 60,
                "max_retry": 3600,
                "max_lifetime": 86400,
                "delay_warning": 0,
                "jitter": 0.2,
                "max_concurrent": 10,
                "domains": {"Example.COM": {"first_retry": 5}},
            },
        )
        s = RetrySchedule.fromSection(section)
        self.assertEqual(
            (s.firstRetry, s.maxRetry, s.maxLifetime, s.delayWarning, s.jitter),
            (60, 3600, 86400, None, 0.2),
        )
        [(name, sub)] = s.domains
        self.assertEqual((name, sub.firstRetry, sub.maxLifetime), ("example.com", 5, 86400))
        self.assertRaises(ConfigError, section.finish)

    def test_fromSectionErrors(self) -> None:
        """
        Bad values and unknown keys in a domain table are configuration
        errors naming the section.
        """
        bad: tuple[dict[str, object], ...] = (
            {"first_retry": "soon"},
            {"jitter": 1.5},
            {"first_retry": 100, "max_retry": 50},
            {"domains": {"example.com": {"frist_retry": 5}}},
            {"domains": {"example.com": 5}},
            {"domains": {"bad domain!": {}}},
        )
        for options in bad:
            e = self.assertRaises(ConfigError, RetrySchedule.fromSection, Section("[scheduler]", options))
            self.assertIn("[scheduler", str(e))
