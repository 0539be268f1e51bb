"""
Prometheus metrics, counted by an observer of the event stream.

L{Metrics} is a C{twisted.logger} observer: it looks at the C{event} field
of each log event and moves its counters and histograms; nothing in the
server counts anything itself, so a number in C{/metrics} is always the
count of a documented log event.  Worker processes forward their named
events to the parent (see L{mailfw._workers}), where the same observer
sees them: one scrape of the parent covers the whole server.

The queue's gauges come from a L{QueueSnapshot} the endpoint refreshes
(see L{mailfw.ops._service}).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.logger import ILogObserver
from zope.interface import implementer

from mailfw.queued import QueuedMessage

__all__ = ["Metrics", "QueueSnapshot", "summarise"]

# Latencies from milliseconds (a group commit) to minutes (a slow MX).
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class QueueSnapshot:
    """
    The queue at one moment, summed up: recipients by state and by
    destination domain (the busiest C{topDomains} and C{"other"}), the
    number of messages and the age of the oldest.

    @ivar taken: when the snapshot was taken (the clock's seconds).
    """

    taken: float
    messages: int = 0
    byState: dict[str, int] = field(default_factory=dict)
    byDomain: dict[str, int] = field(default_factory=dict)
    oldestAge: float = 0.0


def summarise(messages: Sequence[QueuedMessage], now: float, topDomains: int = 10) -> QueueSnapshot:
    """
    Sum up what C{IQueueAdmin.list} returned.  Domains beyond the
    C{topDomains} busiest are counted as C{"other"}, so the label set stays
    bounded whatever the queue holds.
    """
    states: Counter[str] = Counter()
    domains: Counter[str] = Counter()
    oldest = now
    for message in messages:
        oldest = min(oldest, message.envelope.arrival)
        for r in message.recipients:
            states[r.state.value] = states[r.state.value] + 1
            domains[r.recipient.address.domain.lower()] += 1
    byDomain = dict(domains.most_common(topDomains))
    rest = sum(domains.values()) - sum(byDomain.values())
    if rest:
        byDomain["other"] = rest
    return QueueSnapshot(
        now, len(messages), dict(states), byDomain, max(0.0, now - oldest) if messages else 0.0
    )


class _QueueCollector(Collector):
    """
    Reports the last L{QueueSnapshot} as gauges.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._metrics.queue
        if snapshot is None:
            return
        states = GaugeMetricFamily("mailfw_queue_recipients", "Queued recipients by state", labels=["state"])
        for state in ("ready", "leased", "hold", "etrn"):
            states.add_metric([state], snapshot.byState.get(state, 0))
        yield states
        domains = GaugeMetricFamily(
            "mailfw_queue_recipients_by_domain",
            "Queued recipients by destination domain (the busiest, then 'other')",
            labels=["domain"],
        )
        for domain, count in snapshot.byDomain.items():
            domains.add_metric([domain], count)
        yield domains
        yield GaugeMetricFamily("mailfw_queue_messages", "Queued messages", value=snapshot.messages)
        yield GaugeMetricFamily(
            "mailfw_queue_oldest_age_seconds", "Age of the oldest queued message", value=snapshot.oldestAge
        )
        yield GaugeMetricFamily(
            "mailfw_queue_snapshot_age_seconds",
            "How old the queue figures above are",
            value=max(0.0, time.time() - snapshot.taken),
        )


@implementer(ILogObserver)
class Metrics:
    """
    The server's Prometheus metrics, in a registry of their own, moved by
    the named events this observes.

    @ivar registry: what C{/metrics} exposes.
    @ivar queue: the last queue snapshot, or C{None} before the first.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.queue: QueueSnapshot | None = None
        self._refused: set[str] = set()

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> PCounter:
            return PCounter(name, doc, labels, registry=registry)

        self.connections = counter(
            "mailfw_connections", "Client connections ended, by listener and outcome", ["listener", "outcome"]
        )
        self.connectionsOpen = Gauge(
            "mailfw_connections_open", "Client connections open now", ["listener"], registry=registry
        )
        self.transactions = counter(
            "mailfw_transactions",
            "Transactions ended, by stage, outcome and reply class",
            ["stage", "outcome", "class"],
        )
        self.verdicts = counter(
            "mailfw_policy_verdicts", "Deciding policy verdicts by policy", ["policy", "stage", "verdict"]
        )
        self.receivedBytes = counter("mailfw_received_bytes", "Octets of messages accepted")
        self.received = counter("mailfw_messages_received", "Messages accepted (250 sent)", ["listener"])
        self.enqueueSeconds = Histogram(
            "mailfw_enqueue_seconds",
            "End of data to the 250: the queue's commit",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.deliveries = counter(
            "mailfw_deliveries", "Recipient outcomes by agent and outcome", ["agent", "outcome"]
        )
        self.attempts = counter("mailfw_delivery_attempts", "Delivery agent calls by agent", ["agent"])
        self.deliverySeconds = Histogram(
            "mailfw_delivery_seconds",
            "How long a delivery agent call took",
            ["agent"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.notices = counter("mailfw_notices", "DSNs made, by action", ["action"])
        self.sessions = counter("mailfw_sessions", "SMTP sessions, by direction", ["direction"])
        self.tlsSessions = counter(
            "mailfw_tls_sessions", "SMTP sessions with TLS, by direction", ["direction"]
        )
        self.auth = counter("mailfw_auth", "AUTH attempts by outcome", ["outcome"])
        self.dnsSeconds = Histogram(
            "mailfw_dns_lookup_seconds",
            "DNS lookups for delivery",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dnsErrors = counter("mailfw_dns_lookup_errors", "DNS lookups that failed", ["kind", "outcome"])
        self.events = counter("mailfw_events", "Named log events seen, by process", ["process"])
        registry.register(_QueueCollector(self))
        self._handlers = {
            "connection.opened": self._opened,
            "connection.refused": self._connectionRefused,
            "connection.closed": self._closed,
            "session.auth": lambda e: self.auth.labels("success").inc(),
            "session.authFailed": lambda e: self.auth.labels("failure").inc(),
            "policy.verdict": self._verdict,
            "transaction.refused": self._transactionRefused,
            "message.received": self._received,
            "delivery.attempt": self._attempt,
            "delivery.delivered": self._outcome,
            "delivery.deferred": self._outcome,
            "delivery.bounced": self._outcome,
            "delivery.expired": self._outcome,
            "notice.created": lambda e: self.notices.labels(str(e.get("action", ""))).inc(),
            "client.connected": lambda e: self.sessions.labels("outbound").inc(),
            "client.tls": lambda e: self.tlsSessions.labels("outbound").inc(),
            "dns.lookup": self._dns,
        }

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name is None:
            return
        handler = self._handlers.get(name)
        if handler is not None:
            self.events.labels(str(event.get("worker", 0))).inc()
            handler(event)

    def _opened(self, event: dict[str, Any]) -> None:
        self.connectionsOpen.labels(event.get("listener", "")).inc()

    def _connectionRefused(self, event: dict[str, Any]) -> None:
        # Counted when the connection closes, as "refused".
        if len(self._refused) < 100_000:
            self._refused.add(f"{event.get('worker', 0)} {event.get('peer')}")

    def _closed(self, event: dict[str, Any]) -> None:
        listener = event.get("listener", "")
        self.connectionsOpen.labels(listener).dec()
        key = f"{event.get('worker', 0)} {event.get('peer')}"
        if key in self._refused:
            self._refused.discard(key)
            outcome = "refused"
        else:
            outcome = "mail" if event.get("accepted") else "nomail"
        self.connections.labels(listener, outcome).inc()
        self.sessions.labels("inbound").inc()
        if event.get("tls"):
            self.tlsSessions.labels("inbound").inc()

    def _verdict(self, event: dict[str, Any]) -> None:
        self.verdicts.labels(event.get("policy", ""), event.get("stage", ""), event.get("verdict", "")).inc()

    def _transactionRefused(self, event: dict[str, Any]) -> None:
        self.transactions.labels(event.get("stage", ""), "refused", _replyClass(event.get("code"))).inc()

    def _received(self, event: dict[str, Any]) -> None:
        self.transactions.labels("DATA", "accepted", "2xx").inc()
        self.received.labels(event.get("listener", "")).inc()
        self.receivedBytes.inc(_number(event.get("size")))
        self.enqueueSeconds.observe(_number(event.get("latency")))

    def _attempt(self, event: dict[str, Any]) -> None:
        agent = event.get("agent", "")
        self.attempts.labels(agent).inc()
        self.deliverySeconds.labels(agent).observe(_number(event.get("duration")))

    def _outcome(self, event: dict[str, Any]) -> None:
        self.deliveries.labels(event.get("agent", ""), event["event"].partition(".")[2]).inc()

    def _dns(self, event: dict[str, Any]) -> None:
        kind = event.get("kind", "")
        self.dnsSeconds.labels(kind).observe(_number(event.get("duration")))
        outcome = event.get("outcome")
        if outcome != "ok":
            self.dnsErrors.labels(kind, str(outcome)).inc()


def _replyClass(code: object) -> str:
    return f"{code // 100}xx" if isinstance(code, int) and 200 <= code < 600 else "other"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
