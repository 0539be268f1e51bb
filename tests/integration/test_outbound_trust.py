"""
Outbound trust against real peers on loopback: the C{smtp-relay} agent
(built from configuration) asks a C{twisted.names} DNS server on
127.0.0.1 that sets the AD bit (the "local validating resolver" of
C{[dns] dnssec = "trust-ad"}), fetches MTA-STS policies over real HTTPS
from a C{twisted.web} server with a test CA, and talks to an in-process
STARTTLS peer on 127.0.0.2 presenting real certificates.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import succeed
from twisted.logger import formatEvent
from twisted.web import resource, server

from mailfw.config import ComponentContext
from mailfw.delivery._relay import SMTPRelayAgent, fromConfig
from mailfw.outbound._mtasts import treqFetcher
from tests._certs import Issued, issue, makeCA, selfSigned
from tests.integration._dns import startDNS, zoneFromJSON
from tests.integration._peers import PEER
from tests.integration.test_relay_real import LogCapture, deliver, envelope, startTLSPeer

reactor: Any = _reactor


def spkiSHA256(issued: Issued) -> str:
    return hashlib.sha256(
        issued.certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()


def makeAgent(tmp: Path, dnsPort: int, port: int, **options: Any) -> SMTPRelayAgent:
    context = ComponentContext(
        reactor=reactor,
        hostname="relay.test",
        dataDir=tmp,
        nameservers=(("127.0.0.1", dnsPort),),
        dnssec="trust-ad",
    )
    settings: dict[str, Any] = {
        "plugin": "smtp-relay",
        "port": port,
        "address_families": ["ipv4"],
        "connect_timeout": 5,
        "command_timeout": 10,
        "data_timeout": 10,
        "data_done_timeout": 10,
        "connection_cache_time": 0,
    }
    settings.update(options)
    return fromConfig(context, "outbound", settings)


@pytest.fixture
def peerCertificate(tmp_path: Path) -> tuple[Issued, tuple[Path, Path]]:
    """
    A self-signed certificate for the MX host C{mx.dane.test}.
    """
    issued = selfSigned("mx.dane.test")
    return issued, issued.write(tmp_path, "peer")


def daneZone(port: int, pin: str, authenticated: bool = True) -> tuple[int, Any, Any]:
    zone = zoneFromJSON(
        {
            "dane.test": [["MX", 10, "mx.dane.test"]],
            "mx.dane.test": [["A", PEER]],
            f"_{port}._tcp.mx.dane.test": [["TLSA", 3, 1, 1, pin]],
        }
    )
    return startDNS(reactor, zone, authenticated)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_daneMatchDelivers(tmp_path: Path, peerCertificate: tuple[Issued, tuple[Path, Path]]) -> None:
    """
    A DANE-EE TLSA record (AD bit set) matching the peer's key: delivered
    over TLS, without any CA involved.
    """
    issued, paths = peerCertificate
    factory, listening = startTLSPeer(paths)
    port = listening.getHost().port
    dnsPort, _dns, stop = daneZone(port, spkiSHA256(issued))
    try:
        agent = makeAgent(tmp_path, dnsPort, port)
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("dana@dane.test"))
        assert (outcome.reply.code, outcome.remoteMTA) == (250, "mx.dane.test"), outcome
        assert [tls for tls, _ in factory.messages] == [True]
        assert not [e for e in logs.events if "refused" in str(e.get("log_format") or "")]
    finally:
        stop()
        await listening.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_daneLargeRecordSetOverTCP(
    tmp_path: Path, peerCertificate: tuple[Issued, tuple[Path, Path]]
) -> None:
    """
    A TLSA record set too large for a 512-octet datagram (here twenty
    records, the matching one last) comes truncated over UDP; asked again
    over TCP it is used, and the message is delivered.
    """
    issued, paths = peerCertificate
    factory, listening = startTLSPeer(paths)
    port = listening.getHost().port
    others: list[list[Any]] = [["TLSA", 3, 1, 1, f"{i:02x}" * 32] for i in range(19)]
    zone = zoneFromJSON(
        {
            "dane.test": [["MX", 10, "mx.dane.test"]],
            "mx.dane.test": [["A", PEER]],
            f"_{port}._tcp.mx.dane.test": [*others, ["TLSA", 3, 1, 1, spkiSHA256(issued)]],
        }
    )
    dnsPort, _dns, stop = startDNS(reactor, zone)
    try:
        agent = makeAgent(tmp_path, dnsPort, port)
        [outcome] = await deliver(agent, envelope("dana@dane.test"))
        assert (outcome.reply.code, outcome.remoteMTA) == (250, "mx.dane.test"), outcome
        assert [tls for tls, _ in factory.messages] == [True]
    finally:
        stop()
        await listening.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_daneMismatchDefers(tmp_path: Path, peerCertificate: tuple[Issued, tuple[Path, Path]]) -> None:
    """
    A DANE-EE record that does not match: the message is not sent, the
    recipient is deferred (4.x, not bounced) and the log says why.
    """
    _issued, paths = peerCertificate
    factory, listening = startTLSPeer(paths)
    port = listening.getHost().port
    dnsPort, _dns, stop = daneZone(port, "00" * 32)
    try:
        agent = makeAgent(tmp_path, dnsPort, port)
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("dana@dane.test"))
        assert outcome.reply.isTransient, outcome
        assert "no TLSA record matches" in outcome.reply.text
        assert factory.messages == []
        reasons = [str(e.get("why", "")) for e in logs.events if e.get("host") == "mx.dane.test"]
        assert any("no TLSA record matches" in r for r in reasons), reasons
    finally:
        stop()
        await listening.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_daneNeedsAD(tmp_path: Path, peerCertificate: tuple[Issued, tuple[Path, Path]]) -> None:
    """
    Without the AD bit the same mismatching TLSA record is not DANE: the
    mail goes with opportunistic TLS.
    """
    _issued, paths = peerCertificate
    factory, listening = startTLSPeer(paths)
    port = listening.getHost().port
    dnsPort, _dns, stop = daneZone(port, "00" * 32, authenticated=False)
    try:
        agent = makeAgent(tmp_path, dnsPort, port)
        [outcome] = await deliver(agent, envelope("dana@dane.test"))
        assert outcome.reply.code == 250, outcome
        assert [tls for tls, _ in factory.messages] == [True]
    finally:
        stop()
        await listening.stopListening()


# --- MTA-STS -------------------------------------------------------------------


class PolicyFile(resource.Resource):
    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text
        self.requests = 0

    def render_GET(self, request: Any) -> bytes:
        self.requests += 1
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"no"
        request.setHeader(b"content-type", b"text/plain")
        return self.text


@pytest.fixture
def ca() -> Issued:
    return makeCA()


def stsSetup(
    tmp: Path, ca: Issued, mxName: str, mode: str = "enforce"
) -> tuple[Any, Any, int, Any, PolicyFile]:
    """
    An HTTPS policy server for C{sts.test} (certificate from C{ca}), a
    STARTTLS peer whose certificate is for C{mxName}, and DNS.
    """
    web = issue(ca, "mta-sts.sts.test")
    policy = PolicyFile(f"version: STSv1\r\nmode: {mode}\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n".encode())
    options = ssl.CertificateOptions(privateKey=web.key, certificate=web.certificate)  # type: ignore[arg-type]
    https = reactor.listenSSL(0, server.Site(policy), options, interface="127.0.0.1")
    factory, listening = startTLSPeer(issue(ca, mxName).write(tmp, "mx"))
    zone = zoneFromJSON(
        {
            "sts.test": [["MX", 10, "mx.sts.test"]],
            "mx.sts.test": [["A", PEER]],
            "_mta-sts.sts.test": [["TXT", "v=STSv1; id=20260101"]],
        }
    )
    dnsPort, _factory, stop = startDNS(reactor, zone, authenticated=False)
    return https, (factory, listening), dnsPort, stop, policy


def stsAgent(tmp: Path, ca: Issued, dnsPort: int, port: int, httpsPort: int) -> SMTPRelayAgent:
    caFile = tmp / "ca.pem"
    caFile.write_bytes(ca.certPEM())
    agent = makeAgent(tmp, dnsPort, port, ca_file=str(caFile))
    assert agent.tlsPolicy is not None and agent.tlsPolicy.sts is not None
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.certPEM())])
    agent.tlsPolicy.sts.fetch = treqFetcher(reactor, trust, lambda host: "127.0.0.1", httpsPort)
    return agent


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_mtaSTSEnforceMismatchDefers(tmp_path: Path, ca: Issued) -> None:
    """
    An enforced policy fetched over HTTPS, and an MX host whose
    certificate is for another name: not sent, deferred, logged with the
    reason; the policy is cached on disk.
    """
    https, (factory, listening), dnsPort, stop, policy = stsSetup(tmp_path, ca, "wrong.test")
    try:
        agent = stsAgent(tmp_path, ca, dnsPort, listening.getHost().port, https.getHost().port)
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("sam@sts.test"))
        assert outcome.reply.isTransient, outcome
        assert outcome.reply.enhanced.startswith("4."), outcome
        assert factory.messages == []
        assert policy.requests == 1
        warnings = [
            e
            for e in logs.events
            if e.get("host") == "mx.sts.test" and "TLS with" in str(e.get("log_format"))
        ]
        assert warnings and "MTA-STS enforce" in warnings[0]["tlsPolicy"], warnings
        assert "mismatch" in warnings[0]["text"].lower(), warnings  # the name check failed
        assert (tmp_path / "mta-sts" / "sts.test.json").exists()
    finally:
        stop()
        await listening.stopListening()
        await https.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_mtaSTSTestingLogsOnly(tmp_path: Path, ca: Issued) -> None:
    """
    The same mismatch under a C{testing} policy: delivered, and the log
    says what C{enforce} would have refused.
    """
    https, (factory, listening), dnsPort, stop, _policy = stsSetup(tmp_path, ca, "wrong.test", "testing")
    try:
        agent = stsAgent(tmp_path, ca, dnsPort, listening.getHost().port, https.getHost().port)
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("sam@sts.test"))
        assert outcome.reply.code == 250, outcome
        assert [tls for tls, _ in factory.messages] == [True]
        why = [str(e.get("why")) for e in logs.events if "would be refused" in str(e.get("log_format"))]
        assert why and "mx.sts.test" in why[0], why
    finally:
        stop()
        await listening.stopListening()
        await https.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_mtaSTSEnforceMatchDelivers(tmp_path: Path, ca: Issued) -> None:
    """
    The same policy with a certificate valid for the MX host: delivered
    over verified TLS.
    """
    https, (factory, listening), dnsPort, stop, _policy = stsSetup(tmp_path, ca, "mx.sts.test")
    try:
        agent = stsAgent(tmp_path, ca, dnsPort, listening.getHost().port, https.getHost().port)
        [outcome] = await deliver(agent, envelope("sam@sts.test"))
        assert outcome.reply.code == 250, outcome
        assert [tls for tls, _ in factory.messages] == [True]
    finally:
        stop()
        await listening.stopListening()
        await https.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_mtaSTSFetchRefusesUntrusted(tmp_path: Path, ca: Issued) -> None:
    """
    A policy server whose certificate the fetcher does not trust gives no
    policy (logged with the domain and why): opportunistic delivery.
    """
    https, (_factory, listening), dnsPort, stop, _policy = stsSetup(tmp_path, ca, "wrong.test")
    try:
        agent = stsAgent(tmp_path, ca, dnsPort, listening.getHost().port, https.getHost().port)
        assert agent.tlsPolicy is not None and agent.tlsPolicy.sts is not None
        other = makeCA("someone else")
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(other.certPEM())])
        agent.tlsPolicy.sts.fetch = treqFetcher(
            reactor, trust, lambda host: "127.0.0.1", https.getHost().port
        )
        with LogCapture() as logs:
            [outcome] = await deliver(agent, envelope("sam@sts.test"))
        assert outcome.reply.code == 250, outcome
        why = [
            str(e.get("why"))
            for e in logs.events
            if e.get("nexthop") == "sts.test" and "unusable" in str(e.get("log_format"))
        ]
        assert why and "fetching https://mta-sts.sts.test" in why[0], why
    finally:
        stop()
        await listening.stopListening()
        await https.stopListening()


class Misbehaving(resource.Resource):
    isLeaf = True

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def render_GET(self, request: Any) -> bytes:
        if self.kind == "redirect":
            request.setResponseCode(301)
            request.setHeader(b"location", b"https://elsewhere.test/")
            return b""
        if self.kind == "html":
            request.setHeader(b"content-type", b"text/html")
            return b"<p>no</p>"
        request.setHeader(b"content-type", b"text/plain")
        if self.kind == "chunked-huge":
            # No Content-Length: the limit must hold while streaming.
            request.write(b"x" * 40_000)
            request.write(b"x" * 40_000)
            request.finish()
            return server.NOT_DONE_YET  # type: ignore[return-value]
        return b"x" * 70_000


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_fetchLimits(ca: Issued) -> None:
    """
    The fetcher refuses redirects, other content types and bodies over
    64 KiB (announced or streamed), each with a reason naming the URL.
    """
    from mailfw.outbound._mtasts import PolicyError

    web = issue(ca, "mta-sts.bad.test")
    options = ssl.CertificateOptions(privateKey=web.key, certificate=web.certificate)  # type: ignore[arg-type]
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.certPEM())])
    for kind, expected in [
        ("redirect", "answered HTTP 301"),
        ("html", "not text/plain"),
        ("huge", "70000 octets (limit 65536)"),
        ("chunked-huge", "longer than 65536 octets"),
    ]:
        https = reactor.listenSSL(0, server.Site(Misbehaving(kind)), options, interface="127.0.0.1")
        try:
            fetch = treqFetcher(reactor, trust, lambda host: "127.0.0.1", https.getHost().port)
            with pytest.raises(PolicyError) as raised:
                await fetch("bad.test")
            assert expected in str(raised.value), (kind, str(raised.value))
            assert "mta-sts.bad.test" in str(raised.value)
        finally:
            await https.stopListening()


class ReportCollector(resource.Resource):
    """
    An RFC 8460 HTTPS report collector: keeps what is POSTed.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[bytes, bytes, bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        kind = request.getHeader(b"content-type") or b""
        self.received.append((request.path, kind, request.content.read()))
        request.setResponseCode(201)
        return b""


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_tlsReportPostedOverHTTPS(ca: Issued) -> None:
    """
    A domain whose TLSRPT record names an C{https:} collector gets the
    day's report by POST over verified TLS, gzipped JSON with the RFC 8460
    media type; a collector whose certificate the trust root does not
    vouch for gets nothing, and the log says why.
    """
    import gzip
    import json

    from mailfw.outbound._tlsrpt import TLSReporter, TLSResults, httpsPoster
    from mailfw.queue._memory import MemoryQueue
    from mailfw.sharedstate import MemorySharedState

    collector = ReportCollector()
    web = issue(ca, "reports.rpt.test")
    options = ssl.CertificateOptions(privateKey=web.key, certificate=web.certificate)  # type: ignore[arg-type]
    https = reactor.listenSSL(0, server.Site(collector), options, interface="127.0.0.1")
    port = https.getHost().port
    try:
        results = TLSResults(MemorySharedState(), reactor)
        results.record("rpt.test", "sts", None)
        results.record("rpt.test", "sts", "certificate-host-mismatch")
        results.record("other.test", "sts", None)
        txt = {
            "_smtp._tls.rpt.test": [f"v=TLSRPTv1; rua=https://reports.rpt.test:{port}/v1/tlsrpt"],
            "_smtp._tls.other.test": [f"v=TLSRPTv1; rua=https://reports.rpt.test:{port}/other"],
        }
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.certPEM())])
        post = httpsPoster(reactor, trust, lambda host: "127.0.0.1", timeout=10)
        reporter = TLSReporter(
            results, MemoryQueue(reactor), lambda name: succeed(txt[name]), "mx.test", post=post
        )
        day = time.strftime("%Y-%m-%d", time.gmtime(reactor.seconds()))
        with LogCapture() as logs:
            sent = await reporter.sendReports(day)
        assert sent == 2, [formatEvent(e) for e in logs.events]
        paths = sorted(path for path, _, _ in collector.received)
        assert paths == [b"/other", b"/v1/tlsrpt"], collector.received
        for path, kind, body in collector.received:
            assert kind == b"application/tlsrpt+gzip"
            report = json.loads(gzip.decompress(body))
            domain = "rpt.test" if path == b"/v1/tlsrpt" else "other.test"
            assert report["policies"][0]["policy"]["policy-domain"] == domain

        # Another CA's root: the collector's certificate is not trusted.
        results = TLSResults(MemorySharedState(), reactor)
        results.record("rpt.test", "sts", None)
        stranger = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(makeCA().certPEM())])
        untrusting = TLSReporter(
            results,
            MemoryQueue(reactor),
            lambda name: succeed(txt[name]),
            "mx.test",
            post=httpsPoster(reactor, stranger, lambda host: "127.0.0.1", timeout=10),
        )
        received = len(collector.received)
        with LogCapture() as logs:
            assert await untrusting.sendReports(day) == 0
        assert len(collector.received) == received
        texts = [formatEvent(e) for e in logs.events]
        assert any("Posting the TLS report for rpt.test" in t and "failed" in t for t in texts), texts
    finally:
        await https.stopListening()
