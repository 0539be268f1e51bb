"""
Tests for the C{basic-checks} policy (L{mailfw.policy._basic}): HELO
syntax and forgery, sender domains without MX or address, and routing
tricks in recipients' local parts, with an in-memory resolver.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names import error
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._aliases import loadTable
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IPolicy, IPolicyFactory
from mailfw.plugin import findPlugin
from mailfw.policy import CONTINUE, Verdict
from mailfw.policy._basic import (
    BAD_HELO,
    FORGED_HELO,
    NON_FQDN_HELO,
    ROUTING_TRICK,
    BasicChecksPolicy,
    _AliasFile,
    fromConfig,
    heloProblem,
)
from mailfw.routing._mx import MXResolver
from mailfw.testing import MX, A, FakeResolver, connectedServer, runInOtherThread

SESSION = Session(listener="smtp", peerHost="192.0.2.1", id="1")
TRUSTED = Session(listener="smtp", peerHost="192.0.2.1", id="2", relayClient=True)


def answer(result: Verdict | Deferred[Verdict]) -> Verdict:
    if isinstance(result, Deferred):
        return SynchronousTestCase().successResultOf(result)
    return result


class HeloSyntaxTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """
        Host names (with a trailing dot, underscores, digits) and address
        literals pass.
        """
        for name in (
            "mail.example.com",
            "MAIL.Example.COM.",
            "a_b.example",
            "1mx.example",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "[ipv6:::1]",
        ):
            self.assertIsNone(heloProblem(name), name)

    def test_invalid(self) -> None:
        """
        Bad characters, empty labels, labels starting or ending with a
        hyphen, bare dotted quads and malformed literals are invalid.
        """
        for name in (
            "mail..example",
            "-mx.example",
            "mx-.example",
            "mx example",
            "mx.exämple",
            "192.0.2.1",
            "[192.0.2.256]",
            "[2001:db8::1]",
            "[IPv6:192.0.2.1]",
            "a" * 64 + ".example",
            ".",
        ):
            self.assertEqual(heloProblem(name), BAD_HELO, name)

    def test_fqdn(self) -> None:
        """
        A name without a dot is refused unless C{fqdn} is off.
        """
        self.assertEqual(heloProblem("localhost"), NON_FQDN_HELO)
        self.assertIsNone(heloProblem("localhost", fqdn=False))


class BasicChecksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = FakeResolver(
            {
                "mx.example": [MX(10, "mail.mx.example")],
                "mail.mx.example": [A("192.0.2.25")],
                "a-only.example": [A("192.0.2.26")],
                "nullmx.example": [MX(0, "")],
                "empty.example": [],
            }
        )
        self.policy = BasicChecksPolicy(
            "basic",
            ownNames=["mx.example.org"],
            ownAddresses=["203.0.113.25", "2001:db8::25"],
            resolver=MXResolver(self.resolver, maxAddresses=1),
        )

    def test_providesIPolicy(self) -> None:
        self.assertTrue(verifyObject(IPolicy, self.policy))

    def test_heloRefused(self) -> None:
        """
        An invalid HELO name gets 501 5.5.2.
        """
        self.assertEqual(self.policy.checkHelo(SESSION, "bad..name").reply, BAD_HELO)
        self.assertEqual(self.policy.checkHelo(SESSION, "client.example"), CONTINUE)

    def test_forgedHelo(self) -> None:
        """
        Our own name (any case, trailing dot) or address in HELO gets 550
        5.7.1 from a client without relay rights, and passes from one with.
        """
        for name in ("mx.example.org", "MX.Example.Org.", "[203.0.113.25]", "[IPv6:2001:db8:0::25]"):
            self.assertEqual(self.policy.checkHelo(SESSION, name).reply, FORGED_HELO, name)
            self.assertEqual(self.policy.checkHelo(TRUSTED, name), CONTINUE, name)

    def sender(self, domain: str) -> Verdict:
        return answer(self.policy.checkSender(SESSION, Address("alice", domain), {}))

    def test_senderDomainWithMXOrAddress(self) -> None:
        """
        A domain with an MX, or with only an address record, passes.
        """
        self.assertEqual(self.sender("mx.example"), CONTINUE)
        self.assertEqual(self.sender("a-only.example"), CONTINUE)

    def test_senderDomainUnknown(self) -> None:
        """
        A domain that does not exist, or has neither MX nor address, gets
        450 4.1.8 by default and 550 5.1.8 when configured.
        """
        for domain in ("nowhere.example", "empty.example"):
            verdict = self.sender(domain)
            assert verdict.reply is not None
            self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (450, "4.1.8"), domain)
        self.policy = BasicChecksPolicy("basic", resolver=MXResolver(self.resolver), unknownSenderCode=550)
        verdict = self.sender("nowhere.example")
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (550, "5.1.8"))  # type: ignore[union-attr]

    def test_senderNullMX(self) -> None:
        """
        A sender domain with a null MX (RFC 7505) gets 550 5.7.27.
        """
        verdict = self.sender("nullmx.example")
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (550, "5.7.27"))  # type: ignore[union-attr]

    def test_senderDNSFailureTemporary(self) -> None:
        """
        A SERVFAIL or timeout is temporary: 451 4.4.3, never a refusal.
        """
        from twisted.names import dns

        self.resolver.errors[("broken.example", dns.MX)] = error.DNSServerError("SERVFAIL")
        self.resolver.errors[("slow.example", dns.MX)] = error.DNSQueryTimeoutError("slow.example")
        for domain in ("broken.example", "slow.example"):
            verdict = self.sender(domain)
            self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (451, "4.4.3"))  # type: ignore[union-attr]

    def test_senderAnswersCached(self) -> None:
        """
        With a clock, a domain's answer is reused for C{senderCacheTTL}
        seconds, refusals too; a DNS failure is asked again next time.
        """
        from twisted.names import dns

        clock = Clock()
        self.policy = BasicChecksPolicy(
            "basic", resolver=MXResolver(self.resolver), clock=clock, senderCacheTTL=60
        )
        self.resolver.errors[("broken.example", dns.MX)] = error.DNSServerError("SERVFAIL")
        for domain in ("mx.example", "nowhere.example", "broken.example"):
            self.sender(domain)
        asked = len(self.resolver.queries)
        self.assertEqual(self.sender("mx.example"), CONTINUE)
        self.assertEqual(self.sender("nowhere.example").reply, self.policy.unknownSender)
        self.assertEqual(len(self.resolver.queries), asked, "a cached answer was asked again")
        self.sender("broken.example")
        self.assertEqual(len(self.resolver.queries), asked + 1)
        clock.advance(60)
        self.sender("mx.example")
        self.assertGreater(len(self.resolver.queries), asked + 1, "an expired answer was not asked again")

    def test_nullSenderAndLiteralsNotLookedUp(self) -> None:
        """
        The null sender and address literals need no lookup.
        """
        self.assertEqual(answer(self.policy.checkSender(SESSION, None, {})), CONTINUE)
        self.assertEqual(self.sender("[192.0.2.1]"), CONTINUE)
        self.assertEqual(self.resolver.queries, [])

    def recipient(self, localpart: str, session: Session = SESSION) -> Verdict:
        rcpt = Recipient(Address(localpart, "example.org"))
        return answer(self.policy.checkRecipient(session, Envelope(None), rcpt))

    def test_routingTricksRefused(self) -> None:
        """
        C{user%other@local}, C{other!user@local} and C{"user@other"@local}
        get 550 5.1.3; ordinary local parts pass.
        """
        for localpart in ("user%other.example", "other.example!user", '"user@other.example"'):
            self.assertEqual(self.recipient(localpart).reply, ROUTING_TRICK, localpart)
        self.assertEqual(ROUTING_TRICK.code, 550)
        self.assertEqual(ROUTING_TRICK.enhanced, "5.1.3")
        for localpart in ("user", "user+tag", '"john smith"'):
            self.assertEqual(self.recipient(localpart), CONTINUE, localpart)

    def test_routingTricksFromRelayClients(self) -> None:
        """
        Clients with relay rights may send to such addresses.
        """
        self.assertEqual(self.recipient("user%other.example", TRUSTED), CONTINUE)

    def test_allowRecipients(self) -> None:
        """
        Addresses listed in C{allowRecipients} pass, compared without case.
        """
        self.policy.allowRecipients = frozenset({"list%news@example.org"})
        self.assertEqual(self.recipient("LIST%news"), CONTINUE)
        self.assertEqual(self.recipient("other%news").reply, ROUTING_TRICK)

    def test_aliasMapsThem(self) -> None:
        """
        An address that the alias file maps passes; the file is read again
        (in another thread) once it changed.
        """
        path = Path(self.mktemp())
        path.write_text("old%list: alice@example.org\n")
        stamp, table = loadTable(path, 100)
        self.policy.aliases = _AliasFile(
            path, table, (stamp.mtime, stamp.size, stamp.inode), runInOtherThread
        )
        self.assertEqual(self.recipient("old%list"), CONTINUE)
        self.assertEqual(self.recipient("new!list").reply, ROUTING_TRICK)
        path.write_text("old%list: alice@example.org\nnew!list: bob@example.org\n")
        os.utime(path, ns=(0, 10**18))
        self.assertEqual(self.recipient("new!list"), CONTINUE)

    def test_throughServer(self) -> None:
        """
        Through the real server a trick address gets 550 5.1.3 at RCPT.
        """
        self.policy.resolver = None
        connection = connectedServer(policies=[self.policy])
        connection.send(
            b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x%y.example@example.org>\r\n"
        )
        self.assertIn(b"550 5.1.3", connection.replies()[-1])


class FromConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        return ComponentContext(
            reactor=Clock(),
            hostname="mx.example.org",
            dataDir=Path(self.mktemp()),
            _resolver=FakeResolver({}),
        )

    def test_plugin(self) -> None:
        """
        The bundled plugin builds the policy; our own name defaults to the
        server's host name.
        """
        built = findPlugin(IPolicyFactory, "basic-checks").fromConfig(self.context(), "basic", {})
        assert isinstance(built, BasicChecksPolicy)
        self.assertEqual(built.ownNames, frozenset({"mx.example.org"}))
        self.assertIsNotNone(built.resolver)
        self.assertEqual(built.unknownSender.code, 450)
        self.assertIsNotNone(built.senderCache)

    def test_options(self) -> None:
        """
        Each check can be configured or turned off.
        """
        context = self.context()
        context.dataDir.mkdir()
        (context.dataDir / "aliases").write_text("a%b: alice@example.org\n")
        built = fromConfig(
            context,
            "basic",
            {
                "helo_syntax": False,
                "helo_fqdn": False,
                "own_names": ["a.example", "b.example"],
                "own_addresses": ["192.0.2.1"],
                "sender_domain": False,
                "unknown_sender_code": 550,
                "routing_tricks": False,
                "allow_recipients": ["x%y@example.org"],
                "alias_file": "aliases",
                "sender_cache_ttl": 0,
            },
        )
        self.assertEqual(
            (built.heloSyntax, built.heloFQDN, built.resolver, built.routingTricks, built.unknownSender.code),
            (False, False, None, False, 550),
        )
        self.assertEqual(built.ownAddresses, frozenset({"192.0.2.1"}))
        self.assertIsNone(built.senderCache)
        assert built.aliases is not None
        self.assertIsNotNone(built.aliases.table.lookup(Address("a%b", "example.org")))

    def test_errors(self) -> None:
        """
        A bad reply code, address, alias file or an unknown option is
        refused naming the section.
        """
        for options in (
            {"unknown_sender_code": 554},
            {"own_addresses": ["mx.example.org"]},
            {"alias_file": "/nonexistent/aliases"},
            {"allow_recipients": ["nobody"]},
            {"helo": True},
        ):
            with self.assertRaises(ConfigError) as caught:
                fromConfig(self.context(), "basic", options)
            self.assertIn("[policy.basic]", str(caught.exception))
