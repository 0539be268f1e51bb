"""
Tests for L{mailfw.etrn}: the ETRN argument, the C{[etrn]} settings, the
rights, the rate limit and the replies, independently of the protocol.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.config import ConfigError
from mailfw.envelope import RecipientOutcome
from mailfw.etrn import (
    ETRNHandler,
    ETRNRequest,
    ETRNSettings,
    RateLimiter,
    flushReply,
    parseETRNArgument,
    settingsFromConfig,
)
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import Disposition, RecipientState, Selector
from mailfw.reply import SMTPReply


class ArgumentTests(SynchronousTestCase):
    """
    L{parseETRNArgument} reads C{node}, C{@node} and C{#name}.
    """

    def test_forms(self) -> None:
        """
        The three forms give the three kinds, domains normalised to lower
        case A-labels without a trailing dot.
        """
        self.assertEqual(parseETRNArgument("Example.COM"), ETRNRequest("domain", "example.com"))
        self.assertEqual(parseETRNArgument("example.com."), ETRNRequest("domain", "example.com"))
        self.assertEqual(parseETRNArgument("@example.com"), ETRNRequest("subdomains", "example.com"))
        self.assertEqual(parseETRNArgument("#uucp-queue"), ETRNRequest("queue", "uucp-queue"))
        self.assertEqual(
            parseETRNArgument("b\u00fccher.example"), ETRNRequest("domain", "xn--bcher-kva.example")
        )

    def test_malformed(self) -> None:
        """
        Missing or malformed arguments give C{None} (501).
        """
        for text in [
            "",
            " ",
            "@",
            "#",
            "a b",
            "bad..example",
            "@@example.com",
            "#a b",
            "[192.0.2.1]",
            "-x.example",
            "a\tb",
            "#\u00e9",
        ]:
            self.assertIsNone(parseETRNArgument(text), text)

    def test_selectorAndNode(self) -> None:
        """
        Each kind maps to the queue selector of C{mailfw queue flush} and to
        the node text replies use.
        """
        cases = [
            ("example.com", Selector(domain="example.com"), "example.com"),
            ("@example.com", Selector(domain="@example.com"), "@example.com"),
            ("#smart", Selector(route="smart"), "#smart"),
        ]
        for text, selector, node in cases:
            request = parseETRNArgument(text)
            assert request is not None
            self.assertEqual((request.selector, request.node), (selector, node))


class SettingsTests(SynchronousTestCase):
    """
    L{settingsFromConfig} reads and checks C{[etrn]}.
    """

    def test_full(self) -> None:
        """
        Every key is read and normalised.
        """
        settings = settingsFromConfig(
            {
                "domains": ["Customer.Example", ".customer.example", "#uucp", "*"],
                "clients": ["192.0.2.0/24", "2001:db8::1"],
                "hold": ["customer.example", ".Hold.Example"],
                "rate": 3,
                "submission": True,
            }
        )
        self.assertEqual(
            settings,
            ETRNSettings(
                domains=("customer.example", ".customer.example", "#uucp", "*"),
                clients=(ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::1/128")),
                hold=("customer.example", ".hold.example"),
                rate=3,
                submission=True,
            ),
        )
        self.assertTrue(settings.enabled)

    def test_defaults(self) -> None:
        """
        An empty section (or none) leaves ETRN off, nothing held, ten
        commands a minute, no submission.
        """
        settings = settingsFromConfig({})
        self.assertEqual(settings, ETRNSettings())
        self.assertFalse(settings.enabled)
        self.assertEqual((settings.rate, settings.submission), (10, False))

    def test_errors(self) -> None:
        """
        Bad values and unknown keys are refused, naming the section and key.
        """
        cases = [
            ({"domains": ["@example.com"]}, "[etrn] domains: '@example.com': write 'example.com'"),
            ({"domains": ["bad..example"]}, "[etrn] domains: bad domain"),
            ({"domains": ["#"]}, "[etrn] domains: bad queue name"),
            ({"hold": ["*"]}, "[etrn] hold: bad domain"),
            ({"clients": ["192.0.2.300/24"]}, "[etrn] clients: bad network"),
            ({"rate": 0}, "[etrn] rate: must be at least 1"),
            ({"submission": "yes"}, "[etrn] submission: expected true or false"),
            ({"domain": ["example.com"]}, "[etrn]: unknown option 'domain'"),
        ]
        for options, message in cases:
            error = self.assertRaises(ConfigError, settingsFromConfig, options)
            self.assertTrue(str(error).startswith(message), (options, str(error)))

    def test_holds(self) -> None:
        """
        C{hold} patterns hold a domain exactly or its subdomains, never a
        look-alike.
        """
        settings = settingsFromConfig({"hold": ["customer.example", ".sub.example"]})
        held = [
            a
            for a in [
                "a@customer.example",
                "a@x.customer.example",
                "a@x.sub.example",
                "a@sub.example",
                "a@badcustomer.example",
                "a@other.example",
            ]
            if settings.holds(Address.parse(a))
        ]
        self.assertEqual(held, ["a@customer.example", "a@x.sub.example"])

    def test_clientAllowed(self) -> None:
        """
        Client networks match IPv4, IPv6 and IPv4-mapped IPv6 addresses;
        anything that is not an address never matches.
        """
        settings = settingsFromConfig({"clients": ["192.0.2.0/24", "2001:db8::/32"]})
        self.assertTrue(settings.clientAllowed("192.0.2.7"))
        self.assertTrue(settings.clientAllowed("::ffff:192.0.2.7"))
        self.assertTrue(settings.clientAllowed("2001:db8::5"))
        self.assertFalse(settings.clientAllowed("198.51.100.1"))
        self.assertFalse(settings.clientAllowed("/run/mailfw.sock"))
        self.assertFalse(settings.clientAllowed(""))


class RightsTests(SynchronousTestCase):
    """
    L{ETRNSettings.mayFlush}: the node must be an ETRN node and the client
    allowed by network or by its user's ETRN domains.
    """

    settings = settingsFromConfig(
        {
            "domains": ["customer.example", ".customer.example", "only.example", "#uucp"],
            "clients": ["192.0.2.0/24"],
        }
    )

    def may(self, argument: str, host: str = "192.0.2.1", user: tuple[str, ...] | None = None) -> bool:
        request = parseETRNArgument(argument)
        assert request is not None
        return self.settings.mayFlush(request, host, user)

    def test_network(self) -> None:
        """
        A client in C{clients} may flush the ETRN nodes and nothing else.
        """
        self.assertTrue(self.may("customer.example"))
        self.assertTrue(self.may("mx.customer.example"))
        self.assertTrue(self.may("@customer.example"))
        self.assertTrue(self.may("only.example"))
        self.assertTrue(self.may("#uucp"))
        self.assertFalse(self.may("other.example"))
        self.assertFalse(self.may("#other"))

    def test_wholeTree(self) -> None:
        """
        C{ETRN @domain} needs the domain and all its subdomains covered.
        """
        self.assertFalse(self.may("@only.example"))
        self.assertTrue(self.may("@mx.customer.example"))

    def test_users(self) -> None:
        """
        Outside the networks, a user may flush ETRN nodes its own domains
        cover, but not beyond C{domains}; C{#name} needs C{*}.
        """
        outside = "198.51.100.1"
        self.assertFalse(self.may("customer.example", outside))
        self.assertFalse(self.may("customer.example", outside, ()))
        self.assertTrue(self.may("customer.example", outside, ("customer.example",)))
        self.assertFalse(self.may("@customer.example", outside, ("customer.example",)))
        self.assertTrue(self.may("@customer.example", outside, ("customer.example", ".customer.example")))
        self.assertFalse(self.may("other.example", outside, ("*",)))
        self.assertFalse(self.may("#uucp", outside, ("customer.example",)))
        self.assertTrue(self.may("#uucp", outside, ("*",)))


class RateLimiterTests(SynchronousTestCase):
    """
    L{RateLimiter} allows C{limit} events per client per window.
    """

    def test_window(self) -> None:
        """
        The C{limit}+1st event within a window is refused, per client; it is
        allowed again once the oldest event is a window old.
        """
        clock = Clock()
        limiter = RateLimiter(clock, 2, 60.0)
        self.assertEqual([limiter.allow("a"), limiter.allow("a")], [True, True])
        clock.advance(30)
        self.assertFalse(limiter.allow("a"))
        self.assertTrue(limiter.allow("b"))
        clock.advance(30)
        self.assertEqual([limiter.allow("a") for _ in range(3)], [True, True, False])

    def test_memoryBounded(self) -> None:
        """
        Clients not seen for a window are forgotten.
        """
        clock = Clock()
        limiter = RateLimiter(clock, 1, 60.0)
        for n in range(100):
            limiter.allow(f"c{n}")
        self.assertEqual(len(limiter), 100)
        clock.advance(61)
        limiter.allow("new")
        self.assertEqual(len(limiter), 1)


class FlushReplyTests(SynchronousTestCase):
    """
    L{flushReply} maps the flush count to the RFC 1985 reply.
    """

    def test_codes(self) -> None:
        """
        Unknown count: 250; none waiting: 251; some: 253 with the number.
        """
        self.assertEqual(
            flushReply("example.com", None),
            SMTPReply(250, "2.0.0", "OK, queuing for node example.com started"),
        )
        self.assertEqual(
            flushReply("@example.com", 0),
            SMTPReply(251, "2.0.0", "OK, no messages waiting for node @example.com"),
        )
        self.assertEqual(
            flushReply("#uucp", 3),
            SMTPReply(253, "2.0.0", "OK, 3 pending recipients for node #uucp started"),
        )


class SlowQueue(MemoryQueue):
    """
    A memory queue whose flushes answer when the test says.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.flushes: list[tuple[Selector, Deferred[int]]] = []

    def flush(self, selector: Selector) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.flushes.append((selector, d))
        return d


class HandlerTests(SynchronousTestCase):
    """
    L{ETRNHandler} parses, rate-limits, checks rights and flushes.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.queue = MemoryQueue(self.clock)
        self.settings = settingsFromConfig(
            {"domains": ["customer.example", ".customer.example"], "clients": ["192.0.2.0/24"], "rate": 5}
        )
        self.handler = ETRNHandler(self.settings, self.queue, self.clock)

    def hold(self, *addresses: str) -> None:
        incoming = self.queue.receive(makeEnvelope(*addresses))
        incoming.write(b"x\r\n")
        self.successResultOf(incoming.commit())
        [lease] = self.successResultOf(self.queue.claim(self.clock.seconds(), 10))
        self.successResultOf(
            self.queue.record(
                lease,
                [
                    Disposition(
                        r.index,
                        RecipientOutcome(r.recipient, SMTPReply(450, "4.4.0", "held")),
                        self.clock.seconds() + 3600,
                        hold=True,
                        counted=False,
                    )
                    for r in lease.recipients
                ],
            )
        )

    def ask(self, argument: str, host: str = "192.0.2.1", user: tuple[str, ...] | None = None) -> SMTPReply:
        return self.successResultOf(self.handler.request(argument, host, user))

    def test_flushes(self) -> None:
        """
        An allowed ETRN makes the node's held recipients due and answers
        253 with their number; a node with nothing queued gets 251.
        """
        self.hold("a@customer.example", "b@mx.customer.example", "c@other.example")
        reply = self.ask("@customer.example")
        self.assertEqual((reply.code, reply.enhanced), (253, "2.0.0"))
        self.assertIn("2 pending", reply.text)
        ready = self.successResultOf(self.queue.list(Selector(state=RecipientState.READY)))
        self.assertEqual(
            sorted(str(r.recipient.address) for m in ready for r in m.recipients),
            ["a@customer.example", "b@mx.customer.example"],
        )
        self.assertEqual(self.ask("@other.customer.example").code, 251)

    def test_syntax(self) -> None:
        """
        A missing or malformed argument gets 501 5.5.4.
        """
        self.assertEqual(self.ask("").code, 501)
        self.assertEqual(self.ask("a b").enhanced, "5.5.4")

    def test_refusalRevealsNothing(self) -> None:
        """
        A client that may not flush gets the same 459 whether mail waits or
        not, and nothing moves.
        """
        self.hold("a@customer.example")
        waiting = self.ask("customer.example", "198.51.100.1")
        nothing = self.ask("mx.customer.example", "198.51.100.1")
        self.assertEqual((waiting.code, waiting.enhanced), (459, "4.7.1"))
        self.assertEqual(
            waiting.text.replace("customer.example", "X"), nothing.text.replace("mx.customer.example", "X")
        )
        self.assertEqual(self.ask("other.example").code, 459)
        self.assertEqual(len(self.successResultOf(self.queue.list(Selector(state=RecipientState.ETRN)))), 1)

    def test_user(self) -> None:
        """
        An authenticated user whose ETRN domains cover the node may flush it
        from anywhere.
        """
        self.hold("a@customer.example")
        self.assertEqual(self.ask("customer.example", "198.51.100.1", ("customer.example",)).code, 253)

    def test_rate(self) -> None:
        """
        Past C{rate} commands a minute a client gets 458 4.7.0, whatever it
        asks; other clients are unaffected, and a minute later it is served.
        """
        for _ in range(5):
            self.assertEqual(self.ask("other.example").code, 459)
        over = self.ask("customer.example")
        self.assertEqual((over.code, over.enhanced), (458, "4.7.0"))
        self.assertEqual(self.ask("customer.example", "192.0.2.2").code, 251)
        self.clock.advance(60)
        self.assertEqual(self.ask("customer.example").code, 251)

    def test_queueFailure(self) -> None:
        """
        A flush that fails gets 458 4.0.0 and the failure is logged.
        """
        self.queue.flush = lambda selector: fail(RuntimeError("disk on fire"))  # type: ignore[method-assign]
        reply = self.ask("customer.example")
        self.assertEqual((reply.code, reply.enhanced), (458, "4.0.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_replyAfterFlushRecorded(self) -> None:
        """
        The reply waits for the queue to record the flush, and does not
        wait for anything else.
        """
        queue = SlowQueue(self.clock)
        handler = ETRNHandler(self.settings, queue, self.clock)
        d = handler.request("customer.example", "192.0.2.1")
        self.assertNoResult(d)
        [(selector, flushed)] = queue.flushes
        self.assertEqual(selector, Selector(domain="customer.example"))
        flushed.callback(1)
        self.assertEqual(self.successResultOf(d).code, 253)
