"""
Tests for L{mailfw.outbound._dane}: TLSA records, matching a peer's
certificate chain against them (RFC 7672), and what counts as usable.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConnector
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.outbound._dane import (
    TLSA,
    TLSA_TYPE,
    DNSFailure,
    DNSSECResolver,
    SecureAnswer,
    parseTLSA,
    tlsaRecords,
    verifyDANE,
)
from tests._certs import issue, makeCA, selfSigned


def spki(certificate: object) -> bytes:
    return certificate.public_key().public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def der(certificate: object) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined, no-any-return]


class TLSARecordTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """
        The RDATA is usage, selector, matching type, then the data.
        """
        self.assertEqual(parseTLSA(b"\x03\x01\x01" + b"x" * 32), TLSA(3, 1, 1, b"x" * 32))
        self.assertRaises(ValueError, parseTLSA, b"\x03\x01")

    def test_problems(self) -> None:
        """
        PKIX usages, unknown usages, selectors and matching types, and hash
        data of the wrong length are unusable, each with its reason.
        """
        self.assertIsNone(TLSA(3, 1, 1, b"x" * 32).problem())
        self.assertIsNone(TLSA(2, 0, 2, b"x" * 64).problem())
        self.assertIn("PKIX-EE", TLSA(1, 1, 1, b"x" * 32).problem() or "")
        self.assertIn("usage 7 (unknown)", TLSA(7, 1, 1, b"x" * 32).problem() or "")
        self.assertIn("selector", TLSA(3, 5, 1, b"x" * 32).problem() or "")
        self.assertIn("matching", TLSA(3, 1, 9, b"x" * 32).problem() or "")
        self.assertIn("32 octets", TLSA(3, 1, 1, b"x" * 31).problem() or "")

    def test_splitUsable(self) -> None:
        """
        L{tlsaRecords} keeps the usable records and says why the others
        are not.
        """
        answer = SecureAnswer(
            (
                dns.UnknownRecord(b"\x03\x01\x01" + b"a" * 32),
                dns.UnknownRecord(b"\x00\x00\x01" + b"b" * 32),
                dns.UnknownRecord(b"\x03"),
            ),
            True,
        )
        usable, problems = tlsaRecords(answer)
        self.assertEqual(usable, [TLSA(3, 1, 1, b"a" * 32)])
        self.assertEqual(len(problems), 2)
        self.assertIn("PKIX-TA", problems[0])
        self.assertIn("malformed", problems[1])


class MatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.peer = selfSigned("mx.example.net").certificate

    def test_everySelectorAndMatching(self) -> None:
        """
        Selector 0 is the whole certificate, 1 its public key; matching 0
        the data, 1 SHA-256, 2 SHA-512.
        """
        for selector, content in ((0, der(self.peer)), (1, spki(self.peer))):
            for matching, data in (
                (0, content),
                (1, hashlib.sha256(content).digest()),
                (2, hashlib.sha512(content).digest()),
            ):
                record = TLSA(3, selector, matching, data)
                self.assertTrue(record.matches(self.peer), (selector, matching))
                self.assertFalse(TLSA(3, selector, matching, b"\0" * len(data)).matches(self.peer))

    def test_daneEE(self) -> None:
        """
        A DANE-EE record matching the peer's own certificate passes with
        no name or issuer check; a mismatching one fails, saying so.
        """
        good = TLSA(3, 1, 1, hashlib.sha256(spki(self.peer)).digest())
        self.assertIsNone(verifyDANE([good], [self.peer], ["other.example"], time.time()))
        bad = TLSA(3, 1, 1, b"\1" * 32)
        self.assertIn(
            "no TLSA record matches", verifyDANE([bad], [self.peer], ["mx.example.net"], time.time()) or ""
        )

    def test_noCertificate(self) -> None:
        self.assertIn("no certificate", verifyDANE([TLSA(3, 1, 1, b"1" * 32)], [], ["x"], time.time()) or "")

    def test_daneTA(self) -> None:
        """
        A DANE-TA record names a CA in the chain: the peer's certificate
        must chain to it and be valid for the MX host or the next hop
        domain.
        """
        ca = makeCA()
        leaf = issue(ca, "mx.example.net").certificate
        anchor = TLSA(2, 1, 1, hashlib.sha256(spki(ca.certificate)).digest())
        chain = [leaf, ca.certificate]
        self.assertIsNone(verifyDANE([anchor], chain, ["mx.example.net", "example.net"], time.time()))
        self.assertIsNone(verifyDANE([anchor], chain, ["other.example", "mx.example.net"], time.time()))
        why = verifyDANE([anchor], chain, ["wrong.example"], time.time())
        self.assertIn("does not chain to the DANE-TA anchor for wrong.example", why or "")

    def test_daneTANotInChain(self) -> None:
        """
        A DANE-TA anchor the server does not present matches nothing.
        """
        ca, other = makeCA(), makeCA("another CA")
        leaf = issue(ca, "mx.example.net").certificate
        anchor = TLSA(2, 0, 1, hashlib.sha256(der(other.certificate)).digest())
        self.assertIn(
            "no TLSA record matches",
            verifyDANE([anchor], [leaf, ca.certificate], ["mx.example.net"], time.time()) or "",
        )

    def test_daneTAExpired(self) -> None:
        """
        Under DANE-TA the dates count: far in the future the chain fails.
        """
        ca = makeCA()
        leaf = issue(ca, "mx.example.net").certificate
        anchor = TLSA(2, 1, 1, hashlib.sha256(spki(ca.certificate)).digest())
        later = time.time() + 365 * 86400
        self.assertIsNotNone(verifyDANE([anchor], [leaf, ca.certificate], ["mx.example.net"], later))


class _UDPPort:
    def __init__(self, reactor: FakeUDPReactor, protocol: Any) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.open = True

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        self.reactor.sent.append((self.protocol, data, address))

    def stopListening(self) -> None:
        self.open = False


class FakeUDPReactor(MemoryReactorClock):
    """
    A memory reactor that can also "listen" on UDP: what is written is
    kept, and the test answers by calling the protocol.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[Any, bytes, tuple[str, int]]] = []
        self.ports: list[_UDPPort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> _UDPPort:
        udp = _UDPPort(self, protocol)
        protocol.transport = udp
        self.ports.append(udp)
        return udp


def answer(
    query: bytes,
    rCode: int = dns.OK,
    ad: bool = True,
    records: Any = (),
    trunc: bool = False,
    maxSize: int = 512,
) -> bytes:
    request = dns.Message()
    request.fromStr(query)
    response = dns.Message(
        request.id, answer=1, rCode=rCode, trunc=trunc, authenticData=int(ad), maxSize=maxSize
    )
    response.queries = request.queries
    response.answers = [
        dns.RRHeader(request.queries[0].name.name, TLSA_TYPE, payload=dns.UnknownRecord(r)) for r in records
    ]
    return response.toStr()


class DNSSECResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeUDPReactor()

    def ask(self, trustAD: bool = True, servers: Any = (("127.0.0.1", 53),)) -> Any:
        resolver = DNSSECResolver(self.reactor, servers, trustAD)
        return resolver.query("_25._tcp.mx.example.net", TLSA_TYPE)

    def reply(self, **kw: Any) -> None:
        protocol, data, _ = self.reactor.sent[-1]
        protocol.datagramReceived(answer(data, **kw), ("127.0.0.1", 53))

    def test_asksWithAD(self) -> None:
        """
        The query asks for the AD bit (RFC 6840 5.7); an answer with it is
        authenticated when trusted, and its records come back raw.
        """
        d = self.ask()
        [(_, data, address)] = self.reactor.sent
        query = dns.Message()
        query.fromStr(data)
        self.assertTrue(query.authenticData)
        self.assertEqual(address, ("127.0.0.1", 53))
        self.reply(records=[b"\x03\x01\x01" + b"a" * 32])
        result = self.successResultOf(d)
        self.assertTrue(result.authenticated)
        self.assertEqual(tlsaRecords(result)[0], [TLSA(3, 1, 1, b"a" * 32)])
        self.assertFalse(self.reactor.ports[0].open)

    def test_adNotTrusted(self) -> None:
        d = self.ask(trustAD=False)
        self.reply(records=[b"\x03\x01\x01" + b"a" * 32])
        self.assertFalse(self.successResultOf(d).authenticated)

    def test_nxdomainAndFailures(self) -> None:
        """
        NXDOMAIN is an answer (the name does not exist); SERVFAIL (what a
        validator says for bogus data) and truncation are failures.
        """
        d = self.ask()
        self.reply(rCode=dns.ENAME)
        self.assertFalse(self.successResultOf(d).exists)
        d = self.ask()
        self.reply(rCode=dns.ESERVER)
        self.assertIn("rcode 2", str(self.failureResultOf(d, DNSFailure).value))

    def overTCP(self) -> tuple[Any, StringTransport, bytes]:
        """
        The TCP query made after a truncated answer: its protocol,
        transport and the question it sent (without the length prefix).
        """
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 53))
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        sent = transport.value()
        self.assertEqual(int.from_bytes(sent[:2], "big"), len(sent) - 2)
        return protocol, transport, sent[2:]

    def test_truncatedAskedOverTCP(self) -> None:
        """
        A truncated answer (TLSA records with whole certificates do not fit
        in 512 octets) is asked again over TCP, with the AD bit, and that
        answer counts; the connection is closed after it.
        """
        d = self.ask()
        self.reply(trunc=True)
        self.assertNoResult(d)
        protocol, transport, question = self.overTCP()
        query = dns.Message()
        query.fromStr(question)
        self.assertTrue(query.authenticData)
        digests = [bytes([i]) * 32 for i in range(20)]
        full = answer(question, records=[b"\x03\x01\x01" + digest for digest in digests], maxSize=65535)
        self.assertGreater(len(full), 512)
        protocol.dataReceived(len(full).to_bytes(2, "big") + full)
        result = self.successResultOf(d)
        self.assertTrue(result.authenticated)
        self.assertEqual(tlsaRecords(result)[0], [TLSA(3, 1, 1, digest) for digest in digests])
        self.assertTrue(transport.disconnecting)

    def test_truncatedTCPFailures(self) -> None:
        """
        Over TCP, a connection that fails or closes before the answer, an
        answer to another question, and no answer within the timeout are
        failures that name the cause.
        """
        d = self.ask()
        self.reply(trunc=True)
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(cast(IConnector, None), Failure(ConnectionRefusedError()))
        self.assertIn("no answer over TCP", str(self.failureResultOf(d, DNSFailure).value))

        d = self.ask()
        self.reply(trunc=True)
        protocol, _, _ = self.overTCP()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("ConnectionDone", str(self.failureResultOf(d, DNSFailure).value))

        d = self.ask()
        self.reply(trunc=True)
        protocol, _, question = self.overTCP()
        other = dns.Message()
        other.fromStr(question)
        other.queries = [dns.Query("other.example", TLSA_TYPE, dns.IN)]
        foreign = answer(other.toStr())
        protocol.dataReceived(len(foreign).to_bytes(2, "big") + foreign)
        self.assertIn("does not match", str(self.failureResultOf(d, DNSFailure).value))

        d = self.ask()
        self.reply(trunc=True)
        self.overTCP()
        self.reactor.advance(11)
        self.assertIn("CancelledError", str(self.failureResultOf(d, DNSFailure).value))

    def test_timeoutsAndNextServer(self) -> None:
        """
        A server that does not answer is asked again after the timeout,
        rotating through the servers; after the last timeout the query
        fails, and every port is closed.
        """
        d = self.ask(servers=(("127.0.0.1", 53), ("127.0.0.2", 53)))
        self.reactor.advance(1)
        self.assertEqual([a for _, _, a in self.reactor.sent], [("127.0.0.1", 53), ("127.0.0.2", 53)])
        self.reactor.advance(3)
        self.reactor.advance(11)
        self.assertIn("no answer", str(self.failureResultOf(d, DNSFailure).value))
        self.assertEqual([p.open for p in self.reactor.ports], [False, False, False])

    def test_foreignAnswerIgnored(self) -> None:
        d = self.ask()
        protocol, data, _ = self.reactor.sent[-1]
        request = dns.Message()
        request.fromStr(data)
        protocol.datagramReceived(dns.Message((request.id + 1) % 65536, answer=1).toStr(), ("127.0.0.9", 53))
        protocol.datagramReceived(b"garbage", ("127.0.0.9", 53))
        # The right ID and question from another address or port (RFC 5452).
        protocol.datagramReceived(answer(data), ("127.0.0.9", 53))
        protocol.datagramReceived(answer(data), ("127.0.0.1", 5353))
        self.assertNoResult(d)
        self.reply()
        self.assertEqual(self.successResultOf(d).records, ())
