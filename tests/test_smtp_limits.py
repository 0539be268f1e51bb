"""
Tests for the per-client connection limit's exceptions
(L{mailfw.smtp.SMTPLimits.connectionLimitExceptions}, honoured by
L{mailfw.smtp.SMTPFactory}) and for the HELP reply
(L{mailfw.smtp._replies.helpReply}).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ConfigError, Section
from mailfw.smtp import SMTPFactory, SMTPLimits
from mailfw.smtp import _replies as R
from tests._smtpdoubles import HOSTNAME, DictRouter, RecordingQueue

TURNED_AWAY = b"421 mx.example.org Too many connections from your address, try again later\r\n"


def factory(limits: SMTPLimits) -> SMTPFactory:
    return SMTPFactory("smtp", HOSTNAME, RecordingQueue(), DictRouter(), Clock(), limits=limits)  # type: ignore[arg-type]


def openFrom(factory: SMTPFactory, address: IAddress) -> bytes:
    """
    Connect from C{address} and return what the server said first.
    """
    proto = factory.buildProtocol(address)
    assert proto is not None
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return bytes(transport.value())


class ConnectionLimitExceptionsTests(SynchronousTestCase):
    def test_defaultIsLoopback(self) -> None:
        """
        By default the IPv4 and IPv6 loopback networks are exempt, and
        nothing else.
        """
        limits = SMTPLimits()
        self.assertEqual(
            limits.connectionLimitExceptions,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        for host in ("127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", "::FFFF:127.0.0.2"):
            self.assertTrue(limits.exemptFromClientLimit(host), host)
        for host in ("192.0.2.1", "::2", "::ffff:192.0.2.1", "fe80::1", "UNIXAddress(None)", ""):
            self.assertFalse(limits.exemptFromClientLimit(host), host)

    def test_loopbackNotHeldToPerClientLimit(self) -> None:
        """
        More than C{maxConnectionsPerClient} sessions from 127.0.0.1 (a
        local relay, a benchmark) are all served, while another client is
        still limited.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=2))
        for port in range(5):
            self.assertTrue(openFrom(f, IPv4Address("TCP", "127.0.0.1", 1000 + port)).startswith(b"220 "))
        self.assertEqual(f.connectionsFrom(IPv4Address("TCP", "127.0.0.1", 1)), 5)
        openFrom(f, IPv4Address("TCP", "192.0.2.1", 1000))
        openFrom(f, IPv4Address("TCP", "192.0.2.1", 1001))
        self.assertEqual(openFrom(f, IPv4Address("TCP", "192.0.2.1", 1002)), TURNED_AWAY)

    def test_mappedAddressCountsAsIPv4(self) -> None:
        """
        An IPv4-mapped IPv6 peer is exempt like its IPv4 address, and is
        counted together with it.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=1))
        for port in range(3):
            value = openFrom(f, IPv6Address("TCP", "::ffff:127.0.0.1", 1000 + port))
            self.assertTrue(value.startswith(b"220 "))
        self.assertEqual(f.connectionsFrom(IPv4Address("TCP", "127.0.0.1", 1)), 3)
        openFrom(f, IPv4Address("TCP", "192.0.2.7", 1000))
        self.assertEqual(openFrom(f, IPv6Address("TCP", "::ffff:192.0.2.7", 1000)), TURNED_AWAY)

    def test_totalLimitStillApplies(self) -> None:
        """
        Exempt clients still count towards, and are held to, the total
        limit.
        """
        f = factory(SMTPLimits(maxConnections=2, maxConnectionsPerClient=1))
        openFrom(f, IPv4Address("TCP", "127.0.0.1", 1000))
        openFrom(f, IPv4Address("TCP", "127.0.0.1", 1001))
        self.assertEqual(
            openFrom(f, IPv4Address("TCP", "127.0.0.1", 1002)),
            b"421 mx.example.org Too many connections, try again later\r\n",
        )

    def test_emptyListHoldsEveryone(self) -> None:
        """
        With no exceptions, loopback clients are limited like any other.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=1, connectionLimitExceptions=()))
        openFrom(f, IPv4Address("TCP", "127.0.0.1", 1000))
        self.assertEqual(openFrom(f, IPv4Address("TCP", "127.0.0.1", 1001)), TURNED_AWAY)

    def test_unixPeerNotExempt(self) -> None:
        """
        A peer without an IP address (a UNIX socket) is held to the limit.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=1))
        openFrom(f, UNIXAddress(None))
        self.assertEqual(openFrom(f, UNIXAddress(None)), TURNED_AWAY)

    def test_fromSection(self) -> None:
        """
        C{connection_limit_exceptions} takes CIDRs and single addresses;
        host bits are ignored; the networks are stored as a tuple.
        """
        options: dict[str, Any] = {
            "connection_limit_exceptions": ["10.0.0.1/8", "2001:db8::/32", "192.0.2.9"]
        }
        limits = SMTPLimits.fromSection(Section("[smtp]", options))
        self.assertEqual(
            limits.connectionLimitExceptions,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("192.0.2.9/32"),
            ),
        )
        self.assertTrue(limits.exemptFromClientLimit("10.1.2.3"))
        self.assertFalse(limits.exemptFromClientLimit("127.0.0.1"))
        default = SMTPLimits.fromSection(Section("[smtp]", {}))
        self.assertEqual(default.connectionLimitExceptions, SMTPLimits().connectionLimitExceptions)
        empty = SMTPLimits.fromSection(Section("[smtp]", {"connection_limit_exceptions": []}))
        self.assertEqual(empty.connectionLimitExceptions, ())

    def test_fromSectionErrors(self) -> None:
        """
        A bad network or a value that is not a list of strings names the
        section, the key and the entry.
        """
        e = self.assertRaises(
            ConfigError,
            SMTPLimits.fromSection,
            Section("[smtp]", {"connection_limit_exceptions": ["127.0.0.0/8", "localhost"]}),
        )
        self.assertEqual(str(e), "[smtp] connection_limit_exceptions: bad network 'localhost'")
        e = self.assertRaises(
            ConfigError,
            SMTPLimits.fromSection,
            Section("[smtp]", {"connection_limit_exceptions": [1]}),
        )
        self.assertIn("[smtp] connection_limit_exceptions", str(e))

    def test_hashable(self) -> None:
        """
        The limits stay a hashable frozen value.
        """
        self.assertEqual(hash(SMTPLimits()), hash(SMTPLimits()))


class HelpReplyTests(SynchronousTestCase):
    BASE = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"

    def test_onlyOfferedCommands(self) -> None:
        """
        HELP lists STARTTLS, AUTH and ETRN only when the session's EHLO
        keywords offer them.
        """
        plain = ["PIPELINING", "SIZE 1000", "8BITMIME", "CHUNKING", "DSN"]
        self.assertEqual(R.helpReply(plain), R.helpReply([]))
        self.assertEqual(R.helpReply(plain).text, self.BASE)
        self.assertEqual(R.helpReply([*plain, "STARTTLS"]).text, self.BASE + " STARTTLS")
        self.assertEqual(R.helpReply([*plain, "AUTH PLAIN LOGIN", "ETRN"]).text, self.BASE + " AUTH ETRN")
        self.assertEqual(
            R.helpReply(["ETRN", "AUTH PLAIN", "STARTTLS"]).text,
            self.BASE + " STARTTLS AUTH ETRN",
        )
        reply = R.helpReply(plain)
        self.assertEqual((reply.code, reply.enhanced), (214, "2.0.0"))
