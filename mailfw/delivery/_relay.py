"""
The C{smtp-relay} delivery agent: deliver to other mail servers over SMTP.

For each group of recipients the agent finds the hosts to try (the MX
hosts of the next hop domain, or a configured C{[host]:port}), tries them
in order and uses the first that takes the transaction:

  - a connection failure, a 4xx/5xx greeting, a refused EHLO/HELO, a
    failed TLS requirement or a 4xx to MAIL moves on to the next host (at
    most C{max_addresses} addresses per attempt);
  - with the opportunistic TLS level C{may}, a failed TLS handshake is
    retried once on the same host in plaintext, and logged;
  - once RCPT replies arrive, each recipient's outcome is final for this
    attempt: 2xx delivered, 4xx deferred, 5xx failed; the end-of-data
    reply decides for the accepted ones (a timeout or lost connection
    there defers them: the message may have arrived);
  - if no host worked, every recipient is deferred (4.4.1, or the last
    host's 4xx reply when there was one, such as a TLS failure).

A route with no next hop (the router's default for remote domains) is
delivered to each recipient's domain, so recipients of several domains in
one group are split by domain.

After a transaction the connection is kept for C{connection_cache_time}
seconds (default 2, like Postfix's C{smtp_connection_cache_time_limit})
and the next delivery to the same next hop uses a cached connection to
any of its hosts (in preference order) instead of connecting, greeting
and negotiating TLS again; a connection is reused for at most
L{SMTPRelayAgent.reuseLimit} seconds after it was made, then closed with
C{QUIT}.  A cached connection that turns out stale (the host closed it, or
answers MAIL with a 4xx) is dropped and a new one made, without counting
as a failure of the host.

Which TLS each host must have is the answer of the agent's
L{TLSPolicyResolver} (DANE, then MTA-STS, then the C{tls} level and the
per-destination C{tls_policy} table, then REQUIRETLS): a host the policy
refuses is not contacted, a certificate that fails DANE or MTA-STS
verification moves on to the next host, and when no host is left the
recipients are deferred (4.7.x), never bounced at once; only a
REQUIRETLS message that no verified host can take bounces (5.7.30).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailfw import tracing
from mailfw.config import ConfigError, Section
from mailfw.delivery._maildir import ThreadPoolRunner
from mailfw.envelope import Envelope, RecipientOutcome
from mailfw.interfaces import IConnectionGate, IConnectionShaping, IDeliveryAgent, IMessageBody
from mailfw.outbound._dane import verifyDANE
from mailfw.outbound._mtasts import loadTrustStore, pkixProblem
from mailfw.outbound._policy import POLICY_LEVELS, REQUIRETLS_FAILED, HostTLS, TLSPolicy, TLSPolicyResolver
from mailfw.outbound._tlsrpt import DailyReports, TLSReporter, TLSResults
from mailfw.queue._produce import ThreadRunner
from mailfw.reply import SMTPReply
from mailfw.routing._mx import MailHost, MXResolver, Resolution
from mailfw.routing._nexthop import NexthopError, parseNexthop
from mailfw.sharedstate import sharedStateFor
from mailfw.smtp._client import (
    TLS_LEVELS,
    ClientOptions,
    HostFailure,
    SMTPClient,
    Timeouts,
    TLSFailure,
)

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["SMTPRelayAgent", "fromConfig"]

Connector = Callable[[MailHost, int, SMTPClient], "Deferred[Any]"]

BAD_NEXTHOP = SMTPReply(451, "4.3.5", "Delivery configuration error (bad next hop)")
INTERNAL = SMTPReply(451, "4.3.0", "Internal error while relaying")


@dataclass
class _Idle:
    """
    A connection waiting for the next transaction to its host.
    """

    client: SMTPClient
    connectedAt: float
    expiry: IDelayedCall
    tls: HostTLS | None = None


@implementer(IDeliveryAgent, IConnectionShaping)
class SMTPRelayAgent:
    """
    Delivers over SMTP to the next hop's mail hosts.

    @ivar connect: connects an L{SMTPClient} to a host and port; fires
        when connected, fails when the connection cannot be made.  Tests
        replace it with an in-memory connection.
    @ivar cacheTime: how long a connection waits for another transaction
        after one (0: close at once).
    @ivar reuseLimit: seconds after which a connection is not used again
        (like Postfix's C{smtp_connection_reuse_time_limit}).
    @ivar maxIdle: idle connections kept per host and port at most.
    @ivar tlsPolicy: decides the TLS of each next hop; C{None}: every host
        gets C{options.tls}.
    @ivar runInThread: reads a message's header section (for
        C{TLS-Required: No}) off the reactor thread.
    @ivar tlsResults: where TLS successes and failures are counted for
        TLS reporting (RFC 8460), or C{None}.
    @ivar tlsReports: mails the daily reports (started by the first
        count), or C{None}.
    @ivar pkixStore: CA certificates (a C{cryptography} C{Store}) to check
        peers under MTA-STS C{testing} policies, only to log; C{None}: no
        such check.
    """

    log = Logger()
    reuseLimit = 300.0
    maxIdle = 20

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        resolver: MXResolver,
        connect: Connector,
        options: ClientOptions,
        port: int = 25,
        cacheTime: float = 2.0,
        tlsPolicy: TLSPolicyResolver | None = None,
        runInThread: ThreadRunner | None = None,
        tlsResults: TLSResults | None = None,
        tlsReports: DailyReports | None = None,
        pkixStore: Any = None,
    ) -> None:
        self.name = name
        self.pkixStore = pkixStore
        self.tlsReports = tlsReports
        self.tlsPolicy = tlsPolicy
        self.runInThread = runInThread
        self.tlsResults = tlsResults
        self.clock = clock
        self.resolver = resolver
        self.connect = connect
        self.options = options
        self.port = port
        self.cacheTime = cacheTime
        self._idle: dict[tuple[str, int], list[_Idle]] = {}
        self._gate: IConnectionGate | None = None

    def shapeConnections(self, gate: IConnectionGate) -> None:
        """
        Traffic shaping: wait for C{gate} before each new connection, and
        close a connection after the transactions it allows.
        """
        self._gate = gate

    def _takeIdle(self, address: str, port: int, tls: HostTLS | None = None) -> _Idle | None:
        """
        A cached connection to C{address} and C{port} that is still open
        and was made under the same TLS requirement C{tls}.
        """
        key = (address, port)
        idle = self._idle.get(key, [])
        found = None
        for entry in reversed([e for e in idle if e.tls == tls]):
            idle.remove(entry)
            entry.expiry.cancel()
            if entry.client.connected:
                found = entry
                break
        if not idle:
            # Hosts come and go: no empty entry is kept for each one seen.
            self._idle.pop(key, None)
        return found

    def _release(
        self, client: SMTPClient, address: str, port: int, connectedAt: float, tls: HostTLS | None = None
    ) -> None:
        """
        A transaction on C{client} is over: keep the connection for the
        next one to this host, or say C{QUIT}.
        """
        key = (address, port)
        if (
            self.cacheTime <= 0
            or not client.connected
            or self.clock.seconds() - connectedAt >= self.reuseLimit
            or len(self._idle.get(key, ())) >= self.maxIdle
            or client.transactionsLeft == 0
        ):
            client.quit()
            return

        def expire() -> None:
            idle = self._idle.get(key, [])
            if entry in idle:
                idle.remove(entry)
            if not idle:
                self._idle.pop(key, None)
            client.quit()

        entry = _Idle(client, connectedAt, self.clock.callLater(self.cacheTime, expire), tls)
        self._idle.setdefault(key, []).append(entry)

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        d: Deferred[Sequence[RecipientOutcome]] = self._deliver(envelope, body, nexthop)
        return d

    @inlineCallbacks
    def _deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Generator[Deferred[Any], Any, Sequence[RecipientOutcome]]:
        groups: dict[str, list[int]] = {}
        for i, recipient in enumerate(envelope.recipients):
            groups.setdefault(nexthop or recipient.address.domain, []).append(i)
        outcomes: list[RecipientOutcome | None] = [None] * len(envelope.recipients)
        for hop, indices in groups.items():
            part = replace(envelope, recipients=tuple(envelope.recipients[i] for i in indices))
            try:
                results: list[RecipientOutcome] = yield self._deliverGroup(part, body, hop)
            except Exception:
                self.log.failure("Bug while relaying to {nexthop}", agent=self.name, nexthop=hop)
                results = [RecipientOutcome(r, INTERNAL) for r in part.recipients]
            for i, outcome in zip(indices, results, strict=False):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    @inlineCallbacks
    def _deliverGroup(
        self, envelope: Envelope, body: IMessageBody, nexthop: str
    ) -> Generator[Deferred[Any], Any, list[RecipientOutcome]]:
        def everyone(reply: SMTPReply, host: str | None = None) -> list[RecipientOutcome]:
            for recipient in envelope.recipients:
                self.log.info(
                    "Relaying to {recipient} via {nexthop}: {code} {enhanced} {text}",
                    agent=self.name,
                    recipient=str(recipient.address),
                    nexthop=nexthop,
                    host=host,
                    code=reply.code,
                    enhanced=reply.enhanced,
                    text=reply.text,
                )
            return [RecipientOutcome(r, reply, host) for r in envelope.recipients]

        try:
            parsed = parseNexthop(nexthop)
        except NexthopError as e:
            self.log.error("Bad next hop {nexthop}: {why}", agent=self.name, nexthop=nexthop, why=str(e))
            return everyone(BAD_NEXTHOP)
        port = parsed.port or self.port
        trace = envelope.traceparent
        resolution: Resolution = yield tracing.tracedDeferred(
            tracing.continueSpan(trace, "dns", {"mailfw.nexthop": nexthop}),
            self.resolver.resolve(nexthop),
            _resolutionCode,
        )
        if resolution.failure is not None:
            return everyone(resolution.failure)

        policy: TLSPolicy = yield Deferred.fromCoroutine(
            self._tlsPolicy(envelope, body, nexthop, resolution, port)
        )
        if policy.failure is not None:
            self.log.warn(
                "Not relaying via {nexthop}: {why}",
                agent=self.name,
                nexthop=nexthop,
                why=policy.why,
                code=policy.failure.code,
                enhanced=policy.failure.enhanced,
            )
            self._recordTLS(
                nexthop, policy.forHost(""), "validation-failure" if policy.source != "table" else None
            )
            return everyone(policy.failure)

        # A cached connection to any of the next hop's hosts comes first.
        for host in resolution.hosts:
            hostTLS = policy.forHost(host.name)
            if hostTLS.refusal is not None:
                continue
            cached = self._takeIdle(host.address, port, hostTLS)
            if cached is None:
                continue
            if self._requireTLSRefused(envelope, cached.client):
                cached.client.quit()
                continue
            try:
                reused: list[SMTPReply] = yield _traced(
                    trace, "smtp.transaction", host, port, cached.client.transaction(envelope, body), True
                )
            except HostFailure as f:
                cached.client.quit()
                if f.permanent:
                    return everyone(f.reply, host.name)
                # Stale (closed by the host, or it wants a new connection):
                # connect afresh below.
                break
            self._release(cached.client, host.address, port, cached.connectedAt, hostTLS)
            return self._relayed(envelope, reused, cached.client, host, port, nexthop)

        lastReply: SMTPReply | None = None
        lastHost: str | None = None
        for host in resolution.hosts:
            hostTLS = policy.forHost(host.name)
            if hostTLS.refusal is not None:
                self.log.warn(
                    "Not using {host}[{address}] for {nexthop}: {text}",
                    agent=self.name,
                    host=host.name,
                    address=host.address,
                    nexthop=nexthop,
                    text=hostTLS.refusal.text,
                )
                if hostTLS.refusal is not REQUIRETLS_FAILED:
                    self._recordTLS(nexthop, hostTLS, "validation-failure")
                lastReply, lastHost = hostTLS.refusal, host.name
                continue
            testing: list[str] = []
            options = self._optionsFor(hostTLS, testing)
            useTLS = True
            for _attempt in range(2):
                client = SMTPClient(options, self.clock, host.name, host.address, useTLS)
                if self._gate is not None:
                    domain = envelope.recipients[0].address.domain if envelope.recipients else nexthop
                    client.maxTransactions = yield self._gate.connect(domain, host.name)
                connectedAt = self.clock.seconds()
                try:
                    yield _traced(trace, "connect", host, port, self.connect(host, port, client))
                except Exception as e:
                    self.log.info(
                        "Cannot connect to {host}[{address}]:{port} for {nexthop}: {why}",
                        agent=self.name,
                        host=host.name,
                        address=host.address,
                        port=port,
                        nexthop=nexthop,
                        why=str(e),
                    )
                    lastReply = SMTPReply(
                        451, "4.4.1", f"Cannot connect to {host.name}[{host.address}]:{port}"
                    )
                    lastHost = host.name
                    break
                lastHost = host.name
                try:
                    # The greeting, EHLO and STARTTLS with its TLS handshake.
                    yield _traced(trace, "handshake", host, port, client.handshake(), tls=client)
                    if self._requireTLSRefused(envelope, client):
                        client.quit()
                        lastReply = REQUIRETLS_FAILED
                        break
                    if client.tls:
                        self._recordTLS(nexthop, hostTLS, "validation-failure" if testing else None)
                    replies: list[SMTPReply] = yield _traced(
                        trace, "smtp.transaction", host, port, client.transaction(envelope, body)
                    )
                except TLSFailure as f:
                    lastReply = f.reply
                    self._recordTLS(nexthop, hostTLS, "validation-failure")
                    if options.tls == "may" and useTLS:
                        self.log.warn(
                            "TLS with {host}[{address}] failed; retrying in plaintext",
                            agent=self.name,
                            host=host.name,
                            address=host.address,
                            nexthop=nexthop,
                        )
                        useTLS = False
                        continue
                    self.log.warn(
                        "TLS with {host}[{address}] failed: {text}",
                        agent=self.name,
                        host=host.name,
                        address=host.address,
                        nexthop=nexthop,
                        text=f.reply.text,
                        tlsPolicy=policy.why,
                    )
                    break
                except HostFailure as f:
                    client.quit()
                    if f.permanent:
                        return everyone(f.reply, host.name)
                    if f.stage == "starttls" and options.tlsRequired:
                        self._recordTLS(nexthop, hostTLS, "starttls-not-supported")
                    self.log.info(
                        "{host}[{address}] failed at {stage}: {code} {enhanced} {text}",
                        agent=self.name,
                        host=host.name,
                        address=host.address,
                        nexthop=nexthop,
                        stage=f.stage,
                        code=f.reply.code,
                        enhanced=f.reply.enhanced,
                        text=f.reply.text,
                    )
                    lastReply = f.reply
                    break
                self._release(client, host.address, port, connectedAt, hostTLS)
                return self._relayed(envelope, replies, client, host, port, nexthop)

        if lastReply is REQUIRETLS_FAILED:
            # RFC 8689 5: rather than leave without verified TLS, bounce.
            return everyone(lastReply, lastHost)
        if lastReply is None or not lastReply.isTransient or lastReply.enhanced == "4.4.1":
            text = "No mail host for the next hop could be reached"
            if lastReply is not None:
                text += f"; last error: {lastReply.code} {lastReply.enhanced} {lastReply.text}"
            lastReply = SMTPReply(451, "4.4.1", text[:500])
        return everyone(lastReply, lastHost)

    async def _tlsPolicy(
        self, envelope: Envelope, body: IMessageBody, nexthop: str, resolution: Resolution, port: int
    ) -> TLSPolicy:
        """
        Ask the resolver; a message whose policy is DANE or MTA-STS has
        its header read for C{TLS-Required: No} (only then, to keep the
        common case free of disk reads).
        """
        if self.tlsPolicy is None:
            return TLSPolicy("table", f"{self.options.tls} (the agent's tls setting)", self.options.tls)
        policy = await self.tlsPolicy.policyFor(nexthop, resolution.hosts, port, envelope.requireTLS)
        if policy.source in ("dane", "mta-sts") and not envelope.requireTLS and self.runInThread is not None:
            try:
                optOut = await self.runInThread(lambda: tlsNotRequired(body))
            except Exception as e:
                self.log.info("Cannot read the header of the message: {why}", why=str(e))
                optOut = False
            if optOut:
                self.log.info(
                    "TLS-Required: No: not enforcing {why} for {nexthop}",
                    agent=self.name,
                    nexthop=nexthop,
                    why=policy.why,
                )
                policy = await self.tlsPolicy.policyFor(nexthop, resolution.hosts, port, False, True)
        return policy

    def _optionsFor(self, host: HostTLS, testing: list[str]) -> ClientOptions:
        """
        The client options for one host under its TLS requirement.

        @param testing: under an MTA-STS C{testing} policy, what C{enforce}
            would have refused about the peer's certificate is appended
            here (and logged), and the delivery goes on.
        """
        if host.level == self.options.tls and not host.tlsa and host.policyType != "sts":
            return self.options
        peerCheck: Callable[[list[Any]], str | None] | None = None
        clock = self.clock
        if host.level == "dane":
            records, names = host.tlsa, host.names

            def peerCheck(chain: list[Any]) -> str | None:
                return verifyDANE(records, chain, names, clock.seconds())

        elif host.policyType == "sts" and not host.verified and self.pkixStore is not None:
            store, name = self.pkixStore, host.names[0]

            def peerCheck(chain: list[Any]) -> str | None:
                problem = pkixProblem(chain, name, clock.seconds(), store)
                if problem is not None:
                    self.log.warn(
                        "MTA-STS (testing): {host} would be refused under enforce: {why}",
                        agent=self.name,
                        host=name,
                        why=problem,
                    )
                    testing.append(problem)
                return None

        return replace(self.options, tls=host.level, peerCheck=peerCheck)

    def _requireTLSRefused(self, envelope: Envelope, client: SMTPClient) -> bool:
        """
        Whether a REQUIRETLS message may not go over C{client}: the host
        does not offer REQUIRETLS after TLS (RFC 8689 4.2.2).
        """
        if not envelope.requireTLS:
            return False
        if client.tls and client.capabilities.has("REQUIRETLS"):
            return False
        self.log.warn(
            "{host} does not offer REQUIRETLS over TLS; not sending a REQUIRETLS message",
            agent=self.name,
            host=client.hostname,
            address=client.address,
        )
        return True

    def _recordTLS(self, nexthop: str, host: HostTLS, failure: str | None) -> None:
        """
        Count one TLS session (or failed attempt) for TLS reporting.
        """
        if self.tlsResults is None or nexthop.startswith("["):
            return
        self.tlsResults.record(nexthop, host.policyType, failure)
        if self.tlsReports is not None:
            self.tlsReports.ensureStarted()

    def _relayed(
        self,
        envelope: Envelope,
        replies: Sequence[SMTPReply],
        client: SMTPClient,
        host: MailHost,
        port: int,
        nexthop: str,
    ) -> list[RecipientOutcome]:
        """
        Log and return the outcomes of a transaction with C{host}.
        """
        outcomes = []
        for recipient, reply in zip(envelope.recipients, replies, strict=False):
            self.log.info(
                "Relayed to {recipient} via {host}[{address}]:{port}: {code} {enhanced} {text}",
                agent=self.name,
                recipient=str(recipient.address),
                nexthop=nexthop,
                host=host.name,
                address=host.address,
                port=port,
                tls=client.tlsInfo,
                code=reply.code,
                enhanced=reply.enhanced,
                text=reply.text,
            )
            outcomes.append(RecipientOutcome(recipient, reply, host.name))
        return outcomes


def tlsNotRequired(body: IMessageBody, limit: int = 64 * 1024) -> bool:
    """
    Whether the message's header section has C{TLS-Required: No} (RFC
    8689 5).  Reads at most C{limit} octets; blocking, so run in a thread.
    """
    with body.open() as f:
        head = f.read(limit)
    end = head.find(b"\r\n\r\n")
    header = head if end < 0 else head[: end + 2]
    unfolded = header.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in unfolded.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"tls-required" and value.strip().lower() == b"no":
            return True
    return False


def _resolutionCode(resolution: Resolution) -> int | None:
    return None if resolution.failure is None else resolution.failure.code


def _traced(
    traceparent: str,
    name: str,
    host: MailHost,
    port: int,
    d: Deferred[Any],
    reused: bool = False,
    tls: SMTPClient | None = None,
) -> Deferred[Any]:
    """
    C{d}, one step with C{host}, as a span below the delivery attempt
    (L{mailfw.tracing}): the remote replies of a transaction (the worst
    one ends the span), the TLS outcome of a handshake.
    """
    span = tracing.continueSpan(
        traceparent,
        name,
        {
            "net.peer.name": host.name,
            "net.peer.ip": host.address,
            "net.peer.port": port,
            "mailfw.reused": reused,
        },
    )
    if span is None:
        return d

    def ended(result: Any) -> Any:
        if tls is not None:
            span.set_attribute("tls.negotiated", tls.tls)
            if tls.tlsInfo:
                span.set_attribute("tls.info", tls.tlsInfo)
        if isinstance(result, list) and result and isinstance(result[0], SMTPReply):
            span.set_attribute("smtp.replies", [f"{r.code} {r.enhanced}".strip() for r in result])
            return max(r.code for r in result)
        return None

    traced: Deferred[Any] = tracing.tracedDeferred(span, d, ended)
    return traced


def tcpConnector(reactor: Any, timeout: float, sourceAddress: str | None = None) -> Connector:
    """
    Connect over TCP with the endpoint for the address family.
    """
    import ipaddress

    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol

    def connect(host: MailHost, port: int, protocol: SMTPClient) -> Deferred[Any]:
        bind = None if sourceAddress is None else (sourceAddress, 0)
        endpoint: Any
        if ipaddress.ip_address(host.address).version == 6:
            endpoint = TCP6ClientEndpoint(reactor, host.address, port, timeout, bind)
        else:
            endpoint = TCP4ClientEndpoint(reactor, host.address, port, timeout, bind)
        d: Deferred[Any] = connectProtocol(endpoint, protocol)
        return d

    return connect


def tlsContextFactory(caFile: str | None = None) -> Callable[[str, str], Any]:
    """
    Build TLS client contexts: for C{verify}, checking the certificate
    chain (against C{caFile}, or the platform's trust store) and the host
    name with service-identity; for the other levels, accepting any
    certificate (opportunistic TLS still hides the message from passive
    listeners).

    @raise ConfigError: if C{caFile} cannot be read.
    """
    from twisted.internet import ssl

    trust: Any
    if caFile is None:
        trust = ssl.platformTrust()
    else:
        try:
            with open(caFile, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read CA file {caFile}: {e.strerror}") from None
        marker = b"-----END CERTIFICATE-----"
        blocks = [b + marker for b in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
        try:
            certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
        except Exception as e:
            raise ConfigError(f"bad certificate in CA file {caFile}: {e}") from None
        if not certificates:
            raise ConfigError(f"no certificate in CA file {caFile}")
        trust = ssl.trustRootFromCertificates(certificates)

    def build(hostname: str, level: str) -> Any:
        if level == "verify":
            return ssl.optionsForClientTLS(hostname, trustRoot=trust)
        return ssl.CertificateOptions()

    return build


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> SMTPRelayAgent:
    """
    Build an L{SMTPRelayAgent} from C{[delivery.NAME]}.

    Options: C{port} (default 25; a next hop's own port wins), C{tls}
    (C{auto} (default: DANE if published, else MTA-STS if published, else
    C{may}), C{none}, C{may}, C{encrypt}, C{verify}, C{dane}, C{mta-sts}),
    C{tls_policy} (a table of next hop to one of those levels),
    C{mta_sts} (default true), C{mta_sts_cache} (default C{"mta-sts"},
    under the data directory), C{tls_reports} (default true: mail daily
    RFC 8460 reports to domains that ask for them), C{ca_file} (PEM
    bundle for C{verify}; default the platform's), C{helo} (default the
    server's host name), C{auth_user} and C{auth_password} (for a smart
    host; sent only over TLS), C{source_address}, C{max_addresses}
    (default 5), C{address_families} (default C{["ipv6", "ipv4"]}), and
    timeouts in seconds: C{connect_timeout} (30), C{command_timeout}
    (300), C{data_timeout} (120), C{transfer_timeout} (180),
    C{data_done_timeout} (600), and C{connection_cache_time} (2; how long
    a connection waits for the next transaction to its host, 0 to close
    it at once).

    @raise ConfigError: naming the bad option.
    """
    import ipaddress

    section = Section(f"[delivery.{instanceName}]", options)
    port = section.integer("port", 25, minimum=1)
    if port > 65535:
        raise ConfigError(f"{section.title} port: must be at most 65535")
    level = section.choice("tls", POLICY_LEVELS, "auto")
    table: dict[str, str] = {}
    for key, value in section.table("tls_policy", {}).items():
        try:
            hop = str(parseNexthop(str(key).lower()))
        except NexthopError as e:
            raise ConfigError(f"{section.title} tls_policy: bad next hop {key!r}: {e}") from None
        if value not in POLICY_LEVELS:
            raise ConfigError(
                f"{section.title} tls_policy {key!r}: must be one of {', '.join(map(repr, POLICY_LEVELS))}"
            )
        table[hop] = value
    useSTS = section.flag("mta_sts", True)
    stsCache = section.text("mta_sts_cache", "mta-sts")
    tlsReports = section.flag("tls_reports", True)
    caFile = section.text("ca_file", None)
    helo = section.text("helo", context.hostname)
    if not helo or not helo.isascii() or any(c.isspace() for c in helo):
        raise ConfigError(f"{section.title} helo: must be one ASCII word")
    user = section.text("auth_user", None)
    password = section.text("auth_password", None)
    if (user is None) != (password is None):
        raise ConfigError(f"{section.title}: auth_user and auth_password go together")
    source = section.text("source_address", None)
    if source is not None:
        try:
            source = ipaddress.ip_address(source).compressed
        except ValueError:
            raise ConfigError(f"{section.title} source_address: not an IP address") from None
    maxAddresses = section.integer("max_addresses", 5, minimum=1)
    families = section.strings("address_families", ["ipv6", "ipv4"])
    if not families or any(f not in ("ipv4", "ipv6") for f in families):
        raise ConfigError(f'{section.title} address_families: use "ipv6" and/or "ipv4"')
    timeouts = Timeouts(
        connect=section.number("connect_timeout", 30.0, minimum=1),
        command=section.number("command_timeout", 300.0, minimum=1),
        data=section.number("data_timeout", 120.0, minimum=1),
        transfer=section.number("transfer_timeout", 180.0, minimum=1),
        dataDone=section.number("data_done_timeout", 600.0, minimum=1),
    )
    cacheTime = section.number("connection_cache_time", 2.0, minimum=0)
    section.finish()
    if caFile is not None:
        caFile = str(context.path(caFile))
    try:
        tlsContext = tlsContextFactory(caFile)
    except ConfigError as e:
        raise ConfigError(f"{section.title} ca_file: {e}") from None
    clientOptions = ClientOptions(
        helo=helo,
        tls=level if level in TLS_LEVELS else "may",
        tlsContext=tlsContext,
        credentials=None if user is None else (user, password),
        timeouts=timeouts,
    )
    resolver = MXResolver(context.resolver(), families=families, maxAddresses=maxAddresses)
    runInThread = ThreadPoolRunner(context.reactor, f"mailfw-relay-{instanceName}", 2)
    results = TLSResults(sharedStateFor(context.queue), context.reactor)
    reports = None
    if tlsReports and context.queue is not None:
        from mailfw.outbound._mtasts import txtLookup
        from mailfw.outbound._tlsrpt import httpsPoster

        reporter = TLSReporter(
            results,
            context.queue,
            txtLookup(context.resolver()),
            context.hostname,
            post=httpsPoster(context.reactor),
        )
        reports = DailyReports(reporter, context.reactor)
    return SMTPRelayAgent(
        instanceName,
        context.reactor,
        resolver,
        tcpConnector(context.reactor, timeouts.connect, source),
        clientOptions,
        port,
        cacheTime,
        tlsPolicy=policyResolver(context, level, table, useSTS, stsCache, runInThread),
        runInThread=runInThread,
        tlsResults=results,
        tlsReports=reports,
        pkixStore=loadTrustStore(caFile) if useSTS else None,
    )


def policyResolver(
    context: ComponentContext,
    level: str,
    table: Mapping[str, str],
    useSTS: bool = True,
    stsCache: str = "mta-sts",
    runInThread: ThreadRunner | None = None,
) -> TLSPolicyResolver:
    """
    The L{TLSPolicyResolver} of an agent: DANE through C{[dns]}'s
    resolvers when C{[dns] dnssec = "trust-ad"}, MTA-STS with C{treq} and
    a disk cache under the data directory.
    """
    from mailfw.outbound._dane import DNSSECResolver
    from mailfw.outbound._mtasts import STSPolicies, treqFetcher, txtLookup

    dnssec = None
    if context.dnssec == "trust-ad":
        dnssec = DNSSECResolver(context.reactor, context.nameservers, trustAD=True)
    sts = None
    if useSTS:
        runner = runInThread or ThreadPoolRunner(context.reactor, "mailfw-mta-sts", 2)
        sts = STSPolicies(
            context.reactor,
            txtLookup(context.resolver()),
            treqFetcher(context.reactor),
            runner,
            context.path(stsCache),
        )
    return TLSPolicyResolver(context.reactor, level, table, dnssec, sts)
