"""
The C{smtp-relay} agent against real peers on loopback: a C{twisted.names}
authoritative DNS server (UDP and TCP) serving a C{test.} zone, Postfix's
C{smtp-sink} on 127.0.0.2, and an in-process STARTTLS peer with a
self-signed certificate.

Addresses: 127.0.0.2 runs the peers; 127.0.0.3 has nothing listening, so
connections to it are refused (a dead MX host).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.names import authority, common, dns, server
from twisted.protocols.basic import LineReceiver

from mailfw.address import Address
from mailfw.config import ComponentContext
from mailfw.delivery._contract import SAMPLE, TrackingBody
from mailfw.delivery._relay import SMTPRelayAgent, fromConfig
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.routing._mx import MailHost, MXResolver
from tests.integration._peers import DEAD, PEER, Sink, freePortOn, startSink, stopSink
from tests.integration._server import requireTool, waitFor

#: The global reactor, untyped: its interfaces are provided dynamically.
reactor: Any = _reactor

# --- DNS -----------------------------------------------------------------


class MemoryAuthority(authority.FileAuthority):
    """
    An authority for C{test.} whose records live in a dictionary.
    """

    def __init__(self, records: dict[str, list[Any]]) -> None:
        common.ResolverBase.__init__(self)
        self._cache: dict[Any, Any] = {}
        self.soa = (  # type: ignore[assignment]
            b"test",
            dns.Record_SOA(b"ns.test", b"root.test", 1, 60, 60, 60, 1),
        )
        table: dict[bytes, list[Any]] = {n.encode("ascii"): rs for n, rs in records.items()}
        table[b"test"] = [self.soa[1]]  # type: ignore[index]
        self.records = table  # type: ignore[assignment]


ZONE: dict[str, list[Any]] = {
    # First MX is dead (nothing listens on 127.0.0.3), the second works.
    "sink.test": [dns.Record_MX(10, b"mx-down.test"), dns.Record_MX(20, b"mx-up.test")],
    "mx-down.test": [dns.Record_A(DEAD)],
    "mx-up.test": [dns.Record_A(PEER)],
    # No MX: the domain's own address.
    "implicit.test": [dns.Record_A(PEER)],
    # RFC 7505 null MX.
    "nullmx.test": [dns.Record_MX(0, b"")],
    # An alias of sink.test.
    "alias.test": [dns.Record_CNAME(b"sink.test")],
    "tls.test": [dns.Record_MX(10, b"tlspeer.test")],
    "tlspeer.test": [dns.Record_A(PEER)],
}


@pytest.fixture
def dnsPort() -> Iterator[int]:
    """
    A DNS server for C{test.} on 127.0.0.1, UDP and TCP on one port.
    """
    factory = server.DNSServerFactory(authorities=[MemoryAuthority(ZONE)])
    for _ in range(20):
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = tcp.getHost().port
        try:
            udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
        except Exception:
            tcp.stopListening()
            continue
        break
    else:
        raise AssertionError("no port free for both UDP and TCP")
    yield port
    udp.stopListening()
    tcp.stopListening()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    """
    C{smtp-sink} accepting everything on 127.0.0.2, dumping each message.
    """
    s = startSink(tmp_path)
    yield s
    stopSink(s)


@pytest.fixture
def rejectingSink(tmp_path: Path) -> Iterator[Sink]:
    """
    C{smtp-sink} refusing every RCPT with 550 5.1.1.
    """
    s = startSink(tmp_path, "-f", "RCPT", "-B", "550 5.1.1 No such user here")
    yield s
    stopSink(s)


# --- a STARTTLS peer ---------------------------------------------------------


@dataclass
class TLSPeerFactory(Factory):
    tlsOptions: Any
    breakTLS: bool = False
    messages: list[tuple[bool, bytes]] = field(default_factory=list)
    connections: int = 0

    def buildProtocol(self, addr: Any) -> TLSPeer:
        self.connections += 1
        return TLSPeer(self)


class TLSPeer(LineReceiver):
    delimiter = b"\r\n"
    transport: Any

    def __init__(self, factory: TLSPeerFactory) -> None:
        self.peerFactory = factory
        self.tls = False
        self.data: bytes | None = None

    def reply(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode() + b"\r\n" for line in lines))

    def connectionMade(self) -> None:
        self.reply("220 tlspeer.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                self.peerFactory.messages.append((self.tls, self.data))
                self.data = None
                self.reply("250 2.0.0 queued")
            else:
                self.data += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            return
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb == b"EHLO":
            self.reply(
                "250-tlspeer.test", "250-PIPELINING", *([] if self.tls else ["250-STARTTLS"]), "250 8BITMIME"
            )
        elif verb == b"STARTTLS" and not self.tls:
            self.reply("220 2.0.0 ready")
            if self.peerFactory.breakTLS:
                self.transport.abortConnection()
            else:
                self.transport.startTLS(self.peerFactory.tlsOptions)
                self.tls = True
        elif verb == b"DATA":
            self.data = b""
            self.reply("354 go ahead")
        elif verb == b"QUIT":
            self.reply("221 bye")
            self.transport.loseConnection()
        else:
            self.reply("250 ok")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """
    A self-signed certificate for C{tlspeer.test}: (certificate, key).
    """
    requireTool("openssl")
    cert, key = tmp_path / "peer.pem", tmp_path / "peer.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tlspeer.test",
            "-addext",
            "subjectAltName=DNS:tlspeer.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def startTLSPeer(certificate: tuple[Path, Path], breakTLS: bool = False) -> tuple[TLSPeerFactory, Any]:
    cert, key = certificate
    options = PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes()).options()
    factory = TLSPeerFactory(options, breakTLS)
    port = reactor.listenTCP(freePortOn(PEER), factory, interface=PEER)
    return factory, port


# --- helpers -------------------------------------------------------------------


def makeAgent(tmp: Path, dnsPort: int, port: int, **options: Any) -> SMTPRelayAgent:
    context = ComponentContext(
        reactor=reactor,
        hostname="relay.test",
        dataDir=tmp,
        nameservers=(("127.0.0.1", dnsPort),),
    )
    settings: dict[str, Any] = {
        "plugin": "smtp-relay",
        "port": port,
        "address_families": ["ipv4"],
        "connect_timeout": 5,
        "command_timeout": 10,
        "data_timeout": 10,
        "data_done_timeout": 10,
        "tls": "none",
    }
    settings.update(options)
    return fromConfig(context, "outbound", settings)


def envelope(*recipients: str) -> Envelope:
    return Envelope(
        sender=Address("sender", "relay.test"),
        recipients=tuple(Recipient(Address.parse(r)) for r in recipients),
        size=len(SAMPLE),
    )


async def deliver(agent: SMTPRelayAgent, env: Envelope, nexthop: str | None = None) -> list[RecipientOutcome]:
    return list(await agent.deliver(env, TrackingBody(), nexthop))


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> LogCapture:
        globalLogPublisher.addObserver(cast(ILogObserver, self.events.append))
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(cast(ILogObserver, self.events.append))


# --- DNS tests ---------------------------------------------------------------


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_mxOverRealDNS(dnsPort: int) -> None:
    """
    MX records come from the loopback DNS server in preference order, each
    host resolved to its A record.
    """
    context = ComponentContext(reactor, "relay.test", Path("."), nameservers=(("127.0.0.1", dnsPort),))
    resolver = MXResolver(context.resolver(), families=("ipv4",))
    result = await resolver.resolveDomain("sink.test")
    assert result.hosts == (MailHost("mx-down.test", DEAD, 10), MailHost("mx-up.test", PEER, 20))
    alias = await resolver.resolveDomain("alias.test")
    assert alias.hosts == result.hosts
    implicit = await resolver.resolveDomain("implicit.test")
    assert implicit.hosts == (MailHost("implicit.test", PEER, 0),)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_dnsFailures(dnsPort: int) -> None:
    """
    Over real DNS, a null MX is 556 5.1.10, an unknown name 5.1.2, and a
    server that does not answer a transient 4.4.3.
    """
    context = ComponentContext(reactor, "relay.test", Path("."), nameservers=(("127.0.0.1", dnsPort),))
    resolver = MXResolver(context.resolver(), families=("ipv4",))
    nullmx = await resolver.resolveDomain("nullmx.test")
    assert nullmx.failure is not None and (nullmx.failure.code, nullmx.failure.enhanced) == (556, "5.1.10")
    gone = await resolver.resolveDomain("gone.test")
    assert gone.failure is not None and gone.failure.enhanced == "5.1.2"
    # Nothing answers DNS on 127.0.0.3: a short timeout, then transient.
    silent = ComponentContext(reactor, "relay.test", Path("."), nameservers=((DEAD, dnsPort),))
    resolver = MXResolver(silent.resolver(), families=("ipv4",), timeout=(1,))
    started = time.monotonic()
    down = await resolver.resolveDomain("sink.test")
    assert down.failure is not None and down.failure.enhanced == "4.4.3"
    assert time.monotonic() - started < 10


# --- delivery to smtp-sink ---------------------------------------------------------


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_secondMXWhenFirstRefuses(tmp_path: Path, dnsPort: int, sink: Sink) -> None:
    """
    With two MX hosts where the first refuses connections, the message is
    delivered to smtp-sink on the second, intact and dot-stuffed properly.
    """
    agent = makeAgent(tmp_path, dnsPort, sink.port)
    outcomes = await deliver(agent, envelope("alice@sink.test", "bob@sink.test"))
    assert [(o.reply.code, o.remoteMTA) for o in outcomes] == [(250, "mx-up.test")] * 2
    waitFor(lambda: len(sink.messages()) == 1, timeout=5, what="the dump file")
    [dump] = sink.messages()
    assert b"X-Rcpt-Args: <alice@sink.test>" in dump
    assert b"X-Rcpt-Args: <bob@sink.test>" in dump
    assert b"X-Mail-Args: <sender@relay.test>" in dump
    assert SAMPLE.replace(b"\r\n", b"\n") in dump.replace(b"\r\n", b"\n")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_connectionReused(tmp_path: Path, dnsPort: int, sink: Sink) -> None:
    """
    Two messages in a row to smtp-sink go over one connection (the second
    within the cache time), and both arrive.
    """
    agent = makeAgent(tmp_path, dnsPort, sink.port)
    connects: list[str] = []
    connect = agent.connect

    def counting(host: Any, port: int, client: Any) -> Any:
        connects.append(host.address)
        return connect(host, port, client)

    agent.connect = counting
    first = await deliver(agent, envelope("alice@sink.test"))
    second = await deliver(agent, envelope("bob@sink.test"))
    assert [o.reply.code for o in first + second] == [250, 250]
    assert connects == [DEAD, PEER]  # the refusing first MX once, then one connection
    waitFor(lambda: len(sink.messages()) == 2, timeout=5, what="the dump files")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_implicitMX(tmp_path: Path, dnsPort: int, sink: Sink) -> None:
    """
    A domain without MX records is delivered to its A record.
    """
    agent = makeAgent(tmp_path, dnsPort, sink.port)
    [outcome] = await deliver(agent, envelope("carol@implicit.test"))
    assert (outcome.reply.code, outcome.remoteMTA) == (250, "implicit.test")


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_nullMXBouncesWithoutConnecting(tmp_path: Path, dnsPort: int, sink: Sink) -> None:
    """
    A null MX fails the recipient with 556 5.1.10 and sends nothing.
    """
    agent = makeAgent(tmp_path, dnsPort, sink.port)
    [outcome] = await deliver(agent, envelope("dave@nullmx.test"))
    assert (outcome.reply.code, outcome.reply.enhanced, outcome.failed) == (556, "5.1.10", True)
    assert sink.messages() == []


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_rejectedRecipient(tmp_path: Path, dnsPort: int, rejectingSink: Sink) -> None:
    """
    A 550 to RCPT from the peer fails that recipient permanently.
    """
    agent = makeAgent(tmp_path, dnsPort, 25)
    [outcome] = await deliver(agent, envelope("erin@sink.test"), f"[{PEER}]:{rejectingSink.port}")
    assert (outcome.reply.code, outcome.reply.enhanced, outcome.failed) == (550, "5.1.1", True)
    assert outcome.remoteMTA == PEER


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_noHostReachable(tmp_path: Path, dnsPort: int) -> None:
    """
    When no host accepts a connection, the recipients are deferred (4.4.1).
    """
    agent = makeAgent(tmp_path, dnsPort, freePortOn(DEAD))
    [outcome] = await deliver(agent, envelope("frank@sink.test"))
    assert (outcome.reply.code, outcome.reply.enhanced, outcome.deferred) == (451, "4.4.1", True)


# --- TLS ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_opportunisticTLS(tmp_path: Path, dnsPort: int, certificate: tuple[Path, Path]) -> None:
    """
    At level C{may} a self-signed peer is used over TLS, and the delivery
    log names the TLS version and cipher.
    """
    factory, port = startTLSPeer(certificate)
    try:
        agent = makeAgent(tmp_path, dnsPort, port.getHost().port, tls="may")
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("gina@tls.test"))
        assert (outcome.reply.code, outcome.remoteMTA) == (250, "tlspeer.test")
        assert [tls for tls, _ in factory.messages] == [True]
        tlsInfo = [e["tls"] for e in logs.events if e.get("tls")]
        assert tlsInfo and tlsInfo[0].startswith("TLSv1."), tlsInfo
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_verifyFailsSelfSigned(tmp_path: Path, dnsPort: int, certificate: tuple[Path, Path]) -> None:
    """
    At level C{verify} a self-signed certificate fails the handshake: the
    recipient is deferred (4.7.5), nothing is delivered in plaintext, and a
    log line says why.
    """
    factory, port = startTLSPeer(certificate)
    try:
        agent = makeAgent(tmp_path, dnsPort, port.getHost().port, tls="verify")
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("hank@tls.test"))
        assert (outcome.reply.code, outcome.reply.enhanced, outcome.deferred) == (451, "4.7.5", True)
        assert factory.messages == []
        texts = [e.get("text", "") for e in logs.events if "TLS with" in (e.get("log_format") or "")]
        assert any("certificate verify failed" in t or "VerificationError" in t for t in texts), texts
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_verifyWithCAFile(tmp_path: Path, dnsPort: int, certificate: tuple[Path, Path]) -> None:
    """
    At level C{verify}, trusting the peer's certificate through C{ca_file}
    makes the delivery succeed (the name matches the MX host name).
    """
    factory, port = startTLSPeer(certificate)
    try:
        agent = makeAgent(tmp_path, dnsPort, port.getHost().port, tls="verify", ca_file=str(certificate[0]))
        [outcome] = await deliver(agent, envelope("ivy@tls.test"))
        assert outcome.reply.code == 250
        assert [tls for tls, _ in factory.messages] == [True]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_brokenHandshakeRetriesPlaintext(
    tmp_path: Path, dnsPort: int, certificate: tuple[Path, Path]
) -> None:
    """
    At level C{may}, when the TLS handshake fails the same host is tried
    again once in plaintext, and the message arrives.
    """
    factory, port = startTLSPeer(certificate, breakTLS=True)
    try:
        agent = makeAgent(tmp_path, dnsPort, port.getHost().port, tls="may")
        [outcome] = await deliver(agent, envelope("jack@tls.test"))
        assert outcome.reply.code == 250
        assert factory.connections == 2
        assert [tls for tls, _ in factory.messages] == [False]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_encryptDoesNotFallBack(tmp_path: Path, dnsPort: int, certificate: tuple[Path, Path]) -> None:
    """
    At level C{encrypt} a failed handshake defers instead of falling back
    to plaintext.
    """
    factory, port = startTLSPeer(certificate, breakTLS=True)
    try:
        agent = makeAgent(tmp_path, dnsPort, port.getHost().port, tls="encrypt")
        [outcome] = await deliver(agent, envelope("kim@tls.test"))
        assert outcome.deferred
        assert factory.connections == 1
        assert factory.messages == []
    finally:
        await port.stopListening()
