"""
DANE for SMTP (RFC 7672): TLSA records for an MX host, trusted only when
a validating resolver says the answer is DNSSEC-authenticated.

twisted.names does not validate DNSSEC, and its client neither asks for
nor reports the AD ("authenticated data") bit.  So mailfw sends its own
queries for DANE (L{DNSSECResolver}): with the AD bit set (RFC 6840 5.7
asks validators to answer it then) to the resolvers of C{[dns]}, and it
trusts the bit in the answer only when the operator said so with
C{[dns] dnssec = "trust-ad"}: that resolver must be a local validating one
(unbound on 127.0.0.1), because an AD bit that crossed a network is only
as good as that network.

Only DANE-TA(2) and DANE-EE(3) are usable for SMTP (RFC 7672 3.1.3);
PKIX-TA(0), PKIX-EE(1) and unknown usages, selectors or matching types
are unusable records, logged with the host and the reason.  When every
record is unusable, TLS is still mandatory but unauthenticated (RFC 7672
2.2).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IReactorUDP
from twisted.internet.protocol import ClientFactory, DatagramProtocol, connectionDone
from twisted.logger import Logger
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

__all__ = [
    "TLSA",
    "TLSA_TYPE",
    "DNSSECResolver",
    "SecureAnswer",
    "TLSALookup",
    "parseTLSA",
    "verifyDANE",
]

log = Logger()

#: The TLSA RR type (RFC 6698), which twisted.names does not know by name.
TLSA_TYPE = 52

DANE_TA = 2
DANE_EE = 3
USAGES = {0: "PKIX-TA", 1: "PKIX-EE", DANE_TA: "DANE-TA", DANE_EE: "DANE-EE"}


@dataclass(frozen=True)
class TLSA:
    """
    One TLSA record.

    @ivar usage: 2 (DANE-TA) or 3 (DANE-EE) are the usable ones.
    @ivar selector: 0 the whole certificate, 1 its SubjectPublicKeyInfo.
    @ivar matching: 0 the data itself, 1 its SHA-256, 2 its SHA-512.
    """

    usage: int
    selector: int
    matching: int
    data: bytes

    def problem(self) -> str | None:
        """
        Why this record cannot be used for SMTP, or C{None} if it can.
        """
        if self.usage not in (DANE_TA, DANE_EE):
            name = USAGES.get(self.usage, "unknown")
            return f"certificate usage {self.usage} ({name}) is not usable for SMTP"
        if self.selector not in (0, 1):
            return f"unknown selector {self.selector}"
        if self.matching not in (0, 1, 2):
            return f"unknown matching type {self.matching}"
        if self.matching == 1 and len(self.data) != 32:
            return "SHA-256 data is not 32 octets"
        if self.matching == 2 and len(self.data) != 64:
            return "SHA-512 data is not 64 octets"
        return None

    def matches(self, certificate: x509.Certificate) -> bool:
        """
        Whether C{certificate} is the one this record names.
        """
        if self.selector == 0:
            content = certificate.public_bytes(serialization.Encoding.DER)
        else:
            content = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if self.matching == 1:
            content = hashlib.sha256(content).digest()
        elif self.matching == 2:
            content = hashlib.sha512(content).digest()
        return content == self.data

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


def parseTLSA(rdata: bytes) -> TLSA:
    """
    Decode the RDATA of a TLSA record.

    @raise ValueError: if it is shorter than its fixed fields.
    """
    if len(rdata) < 4:
        raise ValueError("TLSA record too short")
    return TLSA(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


def verifyDANE(
    records: Sequence[TLSA],
    chain: Sequence[x509.Certificate],
    names: Sequence[str],
    now: float,
) -> str | None:
    """
    Check a peer's certificate chain against usable TLSA records (RFC 7672
    3.1): a DANE-EE(3) record matches the peer's own certificate (no name
    or date check); a DANE-TA(2) record matches a certificate of the chain
    that the peer's certificate must chain to, valid now and for one of
    C{names} (the MX host name, then the next hop domain).

    @param chain: the peer's certificate first, as presented.
    @return: C{None} if a record matched, else why none did.
    """
    if not chain:
        return "the server presented no certificate"
    leaf = chain[0]
    if any(r.usage == DANE_EE and r.matches(leaf) for r in records):
        return None
    anchors = [c for c in chain if any(r.usage == DANE_TA and r.matches(c) for r in records)]
    if not anchors:
        return "no TLSA record matches the server's certificate or chain"
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    problem = "no name matched"
    for name in names:
        try:
            verifier = (
                PolicyBuilder().store(Store(anchors)).time(when).build_server_verifier(x509.DNSName(name))
            )
            verifier.verify(leaf, [c for c in chain[1:] if c not in anchors])
        except (VerificationError, ValueError) as e:
            problem = str(e)
            continue
        return None
    return f"the certificate does not chain to the DANE-TA anchor for {', '.join(names)}: {problem}"[:300]


@dataclass(frozen=True)
class SecureAnswer:
    """
    The answer to one query, with what the resolver said about it.

    @ivar records: RDATA of the answer records of the asked type at the
        asked name (after CNAMEs in the same answer), raw.
    @ivar authenticated: the resolver set the AD bit (and we trust it).
    @ivar exists: C{False} for NXDOMAIN.
    """

    records: tuple[Any, ...]
    authenticated: bool
    exists: bool = True


@dataclass(frozen=True)
class TLSALookup:
    """
    What DNS says about DANE for one host.

    @ivar records: the usable TLSA records (empty: no DANE for the host).
    @ivar unusable: TLSA records were published and authenticated but none
        is usable: TLS is mandatory, unauthenticated.
    @ivar failure: the lookup failed (SERVFAIL, timeout, bogus): RFC 7672
        2.2 says not to use the host now.
    """

    records: tuple[TLSA, ...] = ()
    unusable: bool = False
    failure: str | None = None


class DNSFailure(Exception):
    """
    A query failed in a way that may succeed later (timeout, SERVFAIL,
    truncation).
    """


def _answerTo(question: dns.Message, data: bytes) -> dns.Message | None:
    """
    C{data} parsed, if it is an answer to C{question}: the same ID and the
    same question (RFC 5452 9.1), else C{None}.
    """
    answer = dns.Message()
    try:
        answer.fromStr(data)
    except Exception:
        return None
    if answer.id != question.id or not answer.answer:
        return None
    if [(q.name.name.lower(), q.type, q.cls) for q in answer.queries] != [
        (q.name.name.lower(), q.type, q.cls) for q in question.queries
    ]:
        return None
    return answer


def _sameHost(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class _OneQuery(DatagramProtocol):
    def __init__(self, message: dns.Message, server: tuple[str, int]) -> None:
        self.message = message
        self.server = server
        self.result: Deferred[dns.Message] = Deferred()

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.message.toStr(), self.server)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.result.called:
            return
        # Only from the server asked (RFC 5452 9.1).
        if addr[1] != self.server[1] or not _sameHost(addr[0], self.server[0]):
            return
        answer = _answerTo(self.message, datagram)
        if answer is not None:
            self.result.callback(answer)


class _OneTCPQuery(Int16StringReceiver):
    """
    The question again over TCP (RFC 7766), for an answer that did not fit
    in a datagram.
    """

    def __init__(self, message: dns.Message) -> None:
        self.message = message
        self.result: Deferred[dns.Message] = Deferred()

    def connectionMade(self) -> None:
        self.sendString(self.message.toStr())

    def stringReceived(self, data: bytes) -> None:
        answer = _answerTo(self.message, data)
        if not self.result.called:
            if answer is None:
                self.result.errback(DNSFailure("the answer over TCP does not match the question"))
            else:
                self.result.callback(answer)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.result.called:
            self.result.errback(reason)


class _OneTCPQueryFactory(ClientFactory):
    def __init__(self, query: _OneTCPQuery) -> None:
        self.query = query

    def buildProtocol(self, addr: Any) -> _OneTCPQuery:
        return self.query

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.query.result.called:
            self.query.result.errback(reason)


class DNSSECResolver:
    """
    Asks a validating resolver, over UDP (and TCP when the answer is
    truncated), and reports its AD bit.

    @ivar servers: C{(address, port)} of the validating resolvers, tried
        in turn on each retransmission.
    @ivar trustAD: whether an AD bit in an answer counts at all (C{[dns]
        dnssec = "trust-ad"}); without it every answer is unauthenticated
        and DANE is never used.
    @ivar timeouts: seconds to wait for each transmission.
    """

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]],
        trustAD: bool,
        timeouts: Sequence[float] = (1, 3, 11),
        random: _random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.servers = list(servers)
        self.trustAD = trustAD
        self.timeouts = tuple(timeouts)
        self.random = random or _random.SystemRandom()

    async def _ask(self, name: str, kind: int) -> dns.Message:
        reactor: IReactorUDP = self.reactor
        clock: IReactorTime = self.reactor
        last = "no resolver configured"
        for attempt, timeout in enumerate(self.timeouts):
            if not self.servers:
                break
            server = self.servers[attempt % len(self.servers)]
            message = dns.Message(self.random.randrange(1, 65536), recDes=1, authenticData=1)
            message.queries = [dns.Query(name, kind, dns.IN)]
            protocol = _OneQuery(message, server)
            port = reactor.listenUDP(0, protocol, "::" if ":" in server[0] else "", 8192)
            timer = clock.callLater(timeout, protocol.result.cancel)
            try:
                protocol.send()
                answer: dns.Message = await protocol.result
            except Exception as e:
                last = f"no answer from {server[0]}:{server[1]} ({type(e).__name__})"
                continue
            finally:
                if timer.active():
                    timer.cancel()
                port.stopListening()
            if answer.trunc:
                # TLSA records with full certificates do not fit in 512
                # octets: the same answer would be truncated on every retry.
                answer = await self._askTCP(server, message, self.timeouts[-1])
            if answer.rCode not in (dns.OK, dns.ENAME):
                raise DNSFailure(f"rcode {answer.rCode} for {name} (SERVFAIL means bogus or unreachable)")
            return answer
        raise DNSFailure(last)

    async def _askTCP(self, server: tuple[str, int], message: dns.Message, timeout: float) -> dns.Message:
        reactor: IReactorTCP = self.reactor
        clock: IReactorTime = self.reactor
        query = _OneTCPQuery(message)
        connector = reactor.connectTCP(server[0], server[1], _OneTCPQueryFactory(query), timeout=timeout)
        timer = clock.callLater(timeout, query.result.cancel)
        try:
            return await query.result
        except DNSFailure:
            raise
        except Exception as e:
            raise DNSFailure(f"no answer over TCP from {server[0]}:{server[1]} ({type(e).__name__})") from e
        finally:
            if timer.active():
                timer.cancel()
            connector.disconnect()

    def query(self, name: str, kind: int) -> Deferred[SecureAnswer]:
        """
        Look up C{kind} records at C{name}.

        @return: a L{Deferred} firing with a L{SecureAnswer}, or failing
            with L{DNSFailure}.
        """

        async def run() -> SecureAnswer:
            answer = await self._ask(name, kind)
            authenticated = bool(answer.authenticData) and self.trustAD
            if answer.rCode == dns.ENAME:
                return SecureAnswer((), authenticated, exists=False)
            owner = name.lower().rstrip(".")
            for _ in range(8):
                for rr in answer.answers:
                    if rr.type == dns.CNAME and rr.name.name.decode("ascii", "replace").lower() == owner:
                        owner = rr.payload.name.name.decode("ascii", "replace").lower()  # type: ignore[union-attr]
                        break
                else:
                    break
            records = tuple(
                rr.payload
                for rr in answer.answers
                if rr.type == kind and rr.name.name.decode("ascii", "replace").lower() == owner
            )
            return SecureAnswer(records, authenticated)

        return Deferred.fromCoroutine(run())


def tlsaRecords(answer: SecureAnswer) -> tuple[list[TLSA], list[str]]:
    """
    The TLSA records of an answer, split into usable ones and the reasons
    the others are not.
    """
    usable: list[TLSA] = []
    problems: list[str] = []
    for payload in answer.records:
        try:
            record = parseTLSA(payload.data if isinstance(payload, dns.UnknownRecord) else bytes(payload))
        except (ValueError, TypeError) as e:
            problems.append(f"malformed TLSA record: {e}")
            continue
        problem = record.problem()
        if problem is None:
            usable.append(record)
        else:
            problems.append(f"{record.usage} {record.selector} {record.matching}: {problem}")
    return usable, problems
