"""
REQUIRETLS and the outbound TLS policy through the pieces that carry
them: the MAIL parser, the EHLO keyword, the envelope's queue encoding,
the SMTP client (the peer check, the MAIL parameter) and the C{smtp-relay}
agent (refusing hosts, bouncing with 5.7.30, deferring policy failures),
with in-memory peers (L{twisted.test.iosim}).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.delivery._relay import SMTPRelayAgent, tlsNotRequired
from mailfw.envelope import Envelope, Recipient
from mailfw.outbound._dane import TLSA, verifyDANE
from mailfw.outbound._mtasts import STSPolicy
from mailfw.outbound._policy import TLSPolicyResolver
from mailfw.outbound._tlsrpt import (
    ReportDestinations,
    TLSReporter,
    TLSResults,
    parseTLSRPTRecord,
    reportJSON,
)
from mailfw.queue._io import MemoryBody as MemoryMessageBody
from mailfw.queue._schema import envelopeFromJSON, envelopeToJSON
from mailfw.routing._mx import MXResolver
from mailfw.sharedstate import MemorySharedState
from mailfw.smtp._client import ClientOptions, SMTPClient, TLSFailure
from mailfw.smtp._parser import MailFrom, parseMailFrom
from tests._certs import selfSigned
from tests.test_delivery_relay import ZONE, FakeNetwork, ScriptedServer, ZoneResolver, summary
from tests.test_outbound_policy import MemorySTS
from tests.test_smtp_client import TLSStringTransport, sent, serve


class FakeContext:
    """
    A TLS context for L{twisted.test.iosim}'s pretend handshake.
    """

    def iosimVerify(self, other: object) -> bool:
        return True


class TLSScriptedServer(ScriptedServer):
    """
    A scripted peer that does (pretend) STARTTLS and then announces
    C{ehloTLS}.
    """

    def lineReceived(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"STARTTLS" and not self.inData:
            self.reply("220 2.0.0 go ahead")
            self.transport.startTLS(FakeContext())
            self.script["ehlo"] = self.script["ehloTLS"]
            return
        if verb == b"MAIL" and not self.inData:
            self.message["mailLine"] = line.decode()
        super().lineReceived(line)


class TLSNetwork(FakeNetwork):
    def connect(self, host: Any, port: int, client: SMTPClient) -> Deferred[Any]:
        from twisted.test import iosim

        self.attempts.append((host.address, port))
        script = dict(self.hosts[host.address] or {})  # the server changes its copy
        server = TLSScriptedServer(script, self.messages.setdefault(host.address, []), self.quits)
        self.pumps.append(
            iosim.connect(
                server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), greet=False
            )
        )
        return succeed(client)


PLAIN = {"ehlo": ["250-fake", "250 PIPELINING"]}
TLS_NO_REQUIRETLS = {"ehlo": ["250-fake", "250 STARTTLS"], "ehloTLS": ["250-fake", "250 PIPELINING"]}
TLS_REQUIRETLS = {
    "ehlo": ["250-fake", "250 STARTTLS"],
    "ehloTLS": ["250-fake", "250-PIPELINING", "250 REQUIRETLS"],
}


def makeAgent(
    hosts: dict[str, dict[str, Any]], level: str = "auto", sts: dict[str, STSPolicy] | None = None, **kw: Any
) -> tuple[SMTPRelayAgent, TLSNetwork]:
    clock = Clock()
    network = TLSNetwork(clock, dict(hosts))
    resolver = MXResolver(ZoneResolver(ZONE), families=("ipv4",))
    options = ClientOptions(helo="relay.example.org", tls="may", tlsContext=lambda h, lv: FakeContext())
    policy = TLSPolicyResolver(clock, level, kw.pop("table", None), None, MemorySTS(sts or {}))  # type: ignore[arg-type]
    agent = SMTPRelayAgent(
        "outbound",
        clock,
        resolver,
        network.connect,
        options,
        tlsPolicy=policy,
        runInThread=lambda f: succeed(f()),
        **kw,
    )
    return agent, network


def envelope(requireTLS: bool = False) -> Envelope:
    return Envelope(
        sender=Address("sender", "example.org"),
        recipients=(Recipient(Address.parse("rcpt@example.net")),),
        requireTLS=requireTLS,
    )


def deliver(
    agent: SMTPRelayAgent, network: TLSNetwork, env: Envelope, body: bytes = b"Subject: hi\r\n\r\nbody\r\n"
) -> Any:
    d = agent.deliver(env, MemoryMessageBody(body), None)
    network.run(d)
    return SynchronousTestCase().successResultOf(d)


class RequireTLSRelayTests(SynchronousTestCase):
    def test_bouncesWithoutVerifiedPolicy(self) -> None:
        """
        With only opportunistic TLS for the destination, a REQUIRETLS
        message bounces with 5.7.30 and no host is contacted.
        """
        agent, network = makeAgent({"192.0.2.1": TLS_REQUIRETLS, "192.0.2.2": TLS_REQUIRETLS})
        outcomes = deliver(agent, network, envelope(requireTLS=True))
        self.assertEqual(summary(outcomes), [("rcpt@example.net", 550, "5.7.30", None)])
        self.assertEqual(network.attempts, [])

    def test_bouncesWhenPeerLacksRequireTLS(self) -> None:
        """
        Verified TLS (a C{verify} entry) to hosts that do not offer
        REQUIRETLS: nothing is sent, the message bounces with 5.7.30.
        """
        agent, network = makeAgent(
            {"192.0.2.1": TLS_NO_REQUIRETLS, "192.0.2.2": TLS_NO_REQUIRETLS}, table={"example.net": "verify"}
        )
        outcomes = deliver(agent, network, envelope(requireTLS=True))
        self.assertEqual([(o.reply.code, o.reply.enhanced) for o in outcomes], [(550, "5.7.30")])
        self.assertEqual(network.messages.get("192.0.2.1", []), [])
        self.assertEqual(len(network.attempts), 2)

    def test_passedOn(self) -> None:
        """
        To a verified host offering REQUIRETLS the message goes with
        C{REQUIRETLS} on its MAIL command.
        """
        agent, network = makeAgent({"192.0.2.1": TLS_REQUIRETLS}, table={"example.net": "verify"})
        outcomes = deliver(agent, network, envelope(requireTLS=True))
        self.assertEqual([o.reply.code for o in outcomes], [250])
        [message] = network.messages["192.0.2.1"]
        self.assertTrue(message["mailLine"].endswith(" REQUIRETLS"), message["mailLine"])

    def test_notPassedWhenNotAsked(self) -> None:
        agent, network = makeAgent({"192.0.2.1": TLS_REQUIRETLS})
        deliver(agent, network, envelope())
        [message] = network.messages["192.0.2.1"]
        self.assertNotIn("REQUIRETLS", message["mailLine"])


class PolicyRelayTests(SynchronousTestCase):
    def test_mtaSTSEnforceDefers(self) -> None:
        """
        Under an enforced MTA-STS policy a host not in its mx list is not
        contacted; with no usable host the mail is deferred (4.x), and TLS
        reporting counts the failure.
        """
        state = MemorySharedState()
        clock = Clock()
        results = TLSResults(state, clock)
        policy = STSPolicy("enforce", ("mx9.example.net",), 86400, "one")
        agent, network = makeAgent(
            {"192.0.2.1": PLAIN, "192.0.2.2": PLAIN}, sts={"example.net": policy}, tlsResults=results
        )
        outcomes = deliver(agent, network, envelope())
        [outcome] = outcomes
        self.assertTrue(outcome.reply.isTransient, outcome.reply)
        self.assertIn("not an MX host allowed", outcome.reply.text)
        self.assertEqual(network.attempts, [])
        self.assertEqual(results.domains("1970-01-01"), ["example.net"])
        counts = self.successResultOf(Deferred.fromCoroutine(results.counts("1970-01-01", "example.net")))
        self.assertEqual(counts, {("sts", "validation-failure"): 2})

    def test_mtaSTSEnforceNeedsTLS(self) -> None:
        """
        An allowed host that does not offer STARTTLS is not sent the
        message: deferred.
        """
        policy = STSPolicy("enforce", ("mx1.example.net", "mx2.example.net"), 86400, "one")
        agent, network = makeAgent({"192.0.2.1": PLAIN, "192.0.2.2": PLAIN}, sts={"example.net": policy})
        [outcome] = deliver(agent, network, envelope())
        self.assertTrue(outcome.reply.isTransient)
        self.assertEqual(network.messages.get("192.0.2.1", []), [])

    def test_mtaSTSTestingOnlyLogs(self) -> None:
        """
        Under a C{testing} policy a certificate that C{enforce} would
        refuse (here: none at all) is logged and counted for TLS
        reporting, and the message is delivered.
        """
        from cryptography.x509.verification import Store
        from twisted.logger import ILogObserver, globalLogPublisher

        from tests._certs import makeCA

        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        results = TLSResults(MemorySharedState(), Clock())
        policy = STSPolicy("testing", ("mx1.example.net", "mx2.example.net"), 86400, "one")
        agent, network = makeAgent(
            {"192.0.2.1": TLS_REQUIRETLS},
            sts={"example.net": policy},
            tlsResults=results,
            pkixStore=Store([makeCA().certificate]),
        )
        [outcome] = deliver(agent, network, envelope())
        self.assertEqual(outcome.reply.code, 250)
        warned = [e for e in events if "would be refused under enforce" in (e.get("log_format") or "")]
        self.assertEqual([e["host"] for e in warned], ["mx1.example.net"])
        counts = self.successResultOf(Deferred.fromCoroutine(results.counts("1970-01-01", "example.net")))
        self.assertEqual(counts, {("sts", "validation-failure"): 1})

    def test_optOutHeader(self) -> None:
        """
        C{TLS-Required: No} lets the message go in plaintext despite an
        enforced policy; the header stays in the message.
        """
        policy = STSPolicy("enforce", ("mx1.example.net", "mx2.example.net"), 86400, "one")
        agent, network = makeAgent({"192.0.2.1": PLAIN}, sts={"example.net": policy})
        body = b"TLS-Required: No\r\nSubject: hi\r\n\r\nbody\r\n"
        [outcome] = deliver(agent, network, envelope(), body)
        self.assertEqual(outcome.reply.code, 250)
        self.assertIn(b"TLS-Required: No", network.messages["192.0.2.1"][0]["data"])

    def test_headerScan(self) -> None:
        self.assertTrue(tlsNotRequired(MemoryMessageBody(b"A: b\r\nTLS-Required:\r\n  NO\r\n\r\nx")))
        self.assertFalse(tlsNotRequired(MemoryMessageBody(b"A: b\r\n\r\nTLS-Required: No\r\n")))


class ClientTests(SynchronousTestCase):
    def test_peerCheckRefuses(self) -> None:
        """
        After STARTTLS and the second EHLO the peer check sees the peer's
        chain; a refusal closes the connection with a 4.7.5 L{TLSFailure}
        before MAIL.
        """
        peer = selfSigned("mx.example.net").certificate
        pin = hashlib.sha256(
            peer.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()

        class Handle:
            def get_peer_cert_chain(self) -> list[Any]:
                return [crypto.X509.from_cryptography(peer)]

            def get_peer_certificate(self) -> Any:
                return crypto.X509.from_cryptography(peer)

        class Transport(TLSStringTransport):
            def getHandle(self) -> Handle:
                return Handle()

        for records, passes in (((TLSA(3, 1, 1, pin),), True), ((TLSA(3, 1, 1, b"\0" * 32),), False)):
            seen: list[list[Any]] = []

            def check(chain: list[Any], records: Any = records, seen: list[list[Any]] = seen) -> str | None:
                seen.append(chain)
                return verifyDANE(records, chain, ["mx.example.net"], 0)

            options = ClientOptions(
                helo="relay.example.org", tls="dane", tlsContext=lambda h, lv: None, peerCheck=check
            )
            proto = SMTPClient(options, Clock(), "mx.example.net", "192.0.2.1")
            transport = Transport()
            proto.makeConnection(transport)
            d = proto.handshake()
            serve(proto, "220 hi")
            serve(proto, "250-hi", "250 STARTTLS")
            serve(proto, "220 go")
            sent(transport)
            serve(proto, "250-hi", "250 REQUIRETLS")
            self.assertEqual(seen[0][0], peer)
            if passes:
                self.successResultOf(d)
            else:
                failure = self.failureResultOf(d, TLSFailure)
                self.assertEqual(failure.value.reply.enhanced, "4.7.5")
                self.assertIn("no TLSA record matches", failure.value.reply.text)
                self.assertTrue(transport.disconnecting)


class ReceivingTests(SynchronousTestCase):
    def test_parser(self) -> None:
        """
        REQUIRETLS is a MAIL parameter only where the session offers it
        (over TLS), and takes no value.
        """
        parsed = parseMailFrom("FROM:<a@example.org> REQUIRETLS", extraParameters=frozenset({"REQUIRETLS"}))
        assert isinstance(parsed, MailFrom)
        self.assertTrue(parsed.requireTLS)
        refused = parseMailFrom("FROM:<a@example.org> REQUIRETLS")
        self.assertEqual(getattr(refused, "code", None), 555)
        valued = parseMailFrom(
            "FROM:<a@example.org> REQUIRETLS=yes", extraParameters=frozenset({"REQUIRETLS"})
        )
        self.assertEqual(getattr(valued, "code", None), 501)

    def test_queueEncoding(self) -> None:
        """
        The flag survives the queue's envelope encoding; rows written
        before it existed load without it.
        """
        env = envelope(requireTLS=True)
        self.assertTrue(envelopeFromJSON(envelopeToJSON(env)).requireTLS)
        old = json.loads(envelopeToJSON(env))
        del old["requireTLS"]
        self.assertFalse(envelopeFromJSON(json.dumps(old)).requireTLS)


class TLSReportTests(SynchronousTestCase):
    def test_recordAndReport(self) -> None:
        """
        Results are counted in the shared state and mailed through the
        queue as RFC 8460 JSON, gzipped, to the domain's rua address; only
        once per day and domain.
        """
        import gzip
        from email import message_from_bytes

        from mailfw.queue._memory import MemoryQueue

        clock = Clock()
        clock.advance(86400 * 3 + 10)
        state = MemorySharedState()
        results = TLSResults(state, clock)
        results.record("example.net", "sts", None)
        results.record("example.net", "sts", None)
        results.record("example.net", "sts", "validation-failure")
        queue = MemoryQueue(clock)
        txt = {"_smtp._tls.example.net": ["v=TLSRPTv1; rua=mailto:tlsrpt@example.net,https://x.example/"]}
        reporter = TLSReporter(
            results,
            queue,
            lambda name: succeed(txt[name]),
            "mx.example.org",
            Address("postmaster", "example.org"),
        )
        day = "1970-01-04"
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(reporter.sendReports(day))), 1)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(reporter.sendReports(day))), 0)
        [queueID] = queue.queueIDs()
        envelope_, body = queue.envelope(queueID), queue.body(queueID)
        self.assertEqual([str(r.address) for r in envelope_.recipients], ["tlsrpt@example.net"])
        message = message_from_bytes(body)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "tlsrpt")
        [attachment] = [p for p in message.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
        payload = attachment.get_payload(decode=True)
        assert isinstance(payload, bytes)
        report = json.loads(gzip.decompress(payload))
        [policy] = report["policies"]
        self.assertEqual(
            policy["summary"], {"total-successful-session-count": 2, "total-failure-session-count": 1}
        )
        self.assertEqual(
            policy["failure-details"], [{"result-type": "validation-failure", "failed-session-count": 1}]
        )

    def test_record(self) -> None:
        """
        The record's C{mailto:} and C{https:} destinations; none unless
        exactly one record starts C{v=TLSRPTv1} (RFC 8460 3).
        """
        self.assertEqual(
            parseTLSRPTRecord(
                ["v=spf1 -all", "v=TLSRPTv1; rua=mailto:a@b.example?subject=x, https://r.example/tls,ftp://x"]
            ),
            ReportDestinations(("a@b.example",), ("https://r.example/tls",)),
        )
        self.assertEqual(parseTLSRPTRecord(["v=spf1"]), ReportDestinations())
        two = ["v=TLSRPTv1; rua=mailto:a@b.example", "v=TLSRPTv1; rua=mailto:c@b.example"]
        self.assertEqual(parseTLSRPTRecord(two), ReportDestinations())
        report = reportJSON("2026-01-01", "example.net", {("tlsa", "success"): 3}, "mx.example.org", "pm")
        self.assertEqual(report["date-range"]["start-datetime"], "2026-01-01T00:00:00Z")

    def test_postedOverHTTPS(self) -> None:
        """
        An C{https:} destination gets the same gzipped JSON by POST (and a
        C{mailto:} one by mail); a destination that answers other than 2xx
        or fails is logged and does not count, and without a poster
        C{https:} destinations are skipped.
        """
        import gzip

        from mailfw.queue._memory import MemoryQueue

        clock = Clock()
        clock.advance(86400 * 3 + 10)
        results = TLSResults(MemorySharedState(), clock)
        for domain in ("ok.example", "broken.example", "down.example", "both.example"):
            results.record(domain, "sts", None)
        txt = {
            "_smtp._tls.ok.example": ["v=TLSRPTv1; rua=https://r.ok.example/tls"],
            "_smtp._tls.broken.example": ["v=TLSRPTv1; rua=https://r.broken.example/"],
            "_smtp._tls.down.example": ["v=TLSRPTv1; rua=https://r.down.example/"],
            "_smtp._tls.both.example": ["v=TLSRPTv1; rua=mailto:t@both.example,https://r.both.example/"],
        }
        answers = {"r.ok.example": 201, "r.broken.example": 500, "r.both.example": 200}
        posted: list[tuple[str, bytes]] = []

        def post(url: str, data: bytes) -> Deferred[int]:
            posted.append((url, data))
            host = url.split("/")[2]
            if host not in answers:
                return fail(ConnectionRefusedError(f"{host} refused"))
            return succeed(answers[host])

        queue = MemoryQueue(clock)
        reporter = TLSReporter(results, queue, lambda name: succeed(txt[name]), "mx.example.org", post=post)
        with capturedLogs() as events:
            sent = self.successResultOf(Deferred.fromCoroutine(reporter.sendReports("1970-01-04")))
        self.assertEqual(sent, 2)
        self.assertEqual(
            sorted(url for url, _ in posted),
            [
                "https://r.both.example/",
                "https://r.broken.example/",
                "https://r.down.example/",
                "https://r.ok.example/tls",
            ],
        )
        for url, data in posted:
            report = json.loads(gzip.decompress(data))
            self.assertEqual(
                report["policies"][0]["policy"]["policy-domain"], url.split(".", 1)[1].split("/")[0]
            )
        [queueID] = queue.queueIDs()
        self.assertEqual([str(r.address) for r in queue.envelope(queueID).recipients], ["t@both.example"])
        text = " ".join(formatEvent(event) for event in events)
        self.assertIn("to https://r.broken.example/: HTTP 500", text)
        self.assertIn("to https://r.down.example/ failed: ConnectionRefusedError", text)

        results.record("ok.example", "sts", None)
        unposted = TLSReporter(results, queue, lambda name: succeed(txt[name]), "mx.example.org")
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(unposted.sendReports("1970-01-05"))), 0)

    def test_daily(self) -> None:
        """
        After the first count, the previous day's reports go out five
        minutes after midnight UTC, and again every day; from the null
        sender.
        """
        from mailfw.outbound._tlsrpt import DailyReports
        from mailfw.queue._memory import MemoryQueue

        clock = Clock()
        clock.advance(86400 * 10 + 3600)
        results = TLSResults(MemorySharedState(), clock)
        queue = MemoryQueue(clock)
        txt = {"_smtp._tls.example.net": ["v=TLSRPTv1; rua=mailto:tlsrpt@example.net"]}
        daily = DailyReports(
            TLSReporter(results, queue, lambda name: succeed(txt[name]), "mx.example.org"), clock
        )
        results.record("example.net", "tlsa", None)
        daily.ensureStarted()
        daily.ensureStarted()
        clock.advance(86400 - 3600 + 299)
        self.assertEqual(queue.queueIDs(), [])
        clock.advance(1)
        [queueID] = queue.queueIDs()
        self.assertIsNone(queue.envelope(queueID).sender)
        self.assertIn(b"1970-01-11", queue.body(queueID))
        results.record("example.net", "tlsa", "validation-failure")
        clock.advance(86400)
        self.assertEqual(len(queue.queueIDs()), 2)


class ServerTests(SynchronousTestCase):
    def test_offeredOnlyOverTLS(self) -> None:
        """
        Over TLS (port 465's implicit TLS here) EHLO offers REQUIRETLS and
        a MAIL with it is taken and the flag queued; in plaintext it is
        neither offered nor accepted.
        """
        from mailfw.testing import connectedServer

        plain = connectedServer("smtp")
        plain.send(b"EHLO client.example\r\n")
        self.assertNotIn(b"REQUIRETLS", plain.transport.value())
        plain.send(b"MAIL FROM:<a@example.net> REQUIRETLS\r\n")
        self.assertEqual(plain.replies()[-1], b"555 5.5.4 Unsupported parameter REQUIRETLS")

        tls = connectedServer("smtp")
        tls.protocol.session = replace(tls.protocol.session, tls=True)
        tls.send(b"EHLO client.example\r\n")
        self.assertIn(b"REQUIRETLS", tls.replies()[-1])
        tls.send(b"MAIL FROM:<a@example.net> REQUIRETLS\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        tls.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(tls.codes()[-4:], [250, 250, 354, 250])
        [queueID] = tls.queue.queueIDs()  # type: ignore[attr-defined]
        self.assertTrue(tls.queue.envelope(queueID).requireTLS)  # type: ignore[attr-defined]
