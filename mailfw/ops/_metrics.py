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
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Metric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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


# name: (help, label names) of every counter, and of every histogram.
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mailfw_connections": ("Client connections ended, by listener and outcome", ("listener", "outcome")),
    "mailfw_transactions": (
        "Transactions ended, by stage, outcome and reply class",
        ("stage", "outcome", "class"),
    ),
    "mailfw_policy_verdicts": ("Deciding policy verdicts by policy", ("policy", "stage", "verdict")),
    "mailfw_received_bytes": ("Octets of messages accepted", ()),
    "mailfw_messages_received": ("Messages accepted (250 sent)", ("listener",)),
    "mailfw_deliveries": ("Recipient outcomes by agent and outcome", ("agent", "outcome")),
    "mailfw_delivery_attempts": ("Delivery agent calls by agent", ("agent",)),
    "mailfw_notices": ("DSNs made, by action", ("action",)),
    "mailfw_sessions": ("SMTP sessions, by direction", ("direction",)),
    "mailfw_tls_sessions": ("SMTP sessions with TLS, by direction", ("direction",)),
    "mailfw_auth": ("AUTH attempts by outcome", ("outcome",)),
    "mailfw_dns_lookup_errors": ("DNS lookups that failed", ("kind", "outcome")),
    "mailfw_events": ("Named log events seen, by process (0: the parent)", ("process",)),
}
_HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mailfw_enqueue_seconds": ("End of data to the 250: the queue's commit", ()),
    "mailfw_delivery_seconds": ("How long a delivery agent call took", ("agent",)),
    "mailfw_dns_lookup_seconds": ("DNS lookups for delivery", ("kind",)),
}


class _Histogram:
    """
    One labelled histogram's buckets (not cumulative) and sum.
    """

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value


class _Collector(Collector):
    """
    Reports L{Metrics}' counts, histograms and gauges when scraped.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        for name, (doc, labels) in _COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for values, count in metrics.counts.get(name, {}).items():
                family.add_metric(values, count)
            yield family
        bounds = [*(repr(float(b)) for b in _LATENCY_BUCKETS), "+Inf"]
        for name, (doc, labels) in _HISTOGRAMS.items():
            histogram = HistogramMetricFamily(name, doc, labels=labels)
            for values, h in metrics.histograms.get(name, {}).items():
                histogram.add_metric(
                    list(values), list(zip(bounds, accumulate(h.buckets), strict=True)), h.sum
                )
            yield histogram
        open_ = GaugeMetricFamily(
            "mailfw_connections_open", "Client connections open now", labels=["listener"]
        )
        for listener, count in metrics.open.items():
            open_.add_metric([listener], count)
        yield open_
        yield from _queueGauges(metrics.queue)


def _queueGauges(snapshot: QueueSnapshot | None) -> Iterator[Metric]:
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
    The server's Prometheus metrics, moved by the named events this
    observes, and exposed by a collector in a registry of their own.

    Counting is plain dictionary arithmetic, and the Prometheus families
    are built only when scraped: a log event costs about a microsecond
    here (prometheus-client's own counters cost several times that, with
    a lock each).  Named events are emitted, and the registry is scraped,
    in the reactor thread, so the counts need no lock.

    @ivar registry: what C{/metrics} exposes.
    @ivar counts: C{{metric: {label values: count}}}.
    @ivar histograms: C{{metric: {label values: histogram}}}.
    @ivar open: open connections by listener.
    @ivar queue: the last queue snapshot, or C{None} before the first.
    """

    def __init__(self) -> None:
        self.counts: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _COUNTERS}
        self.histograms: dict[str, dict[tuple[str, ...], _Histogram]] = {name: {} for name in _HISTOGRAMS}
        self.open: dict[str, int] = {}
        self.queue: QueueSnapshot | None = None
        self._refused: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "connection.opened": self._opened,
            "connection.refused": self._connectionRefused,
            "connection.closed": self._closed,
            "session.auth": lambda e: self._count("mailfw_auth", ("success",)),
            "session.authFailed": lambda e: self._count("mailfw_auth", ("failure",)),
            "policy.verdict": self._verdict,
            "transaction.refused": self._transactionRefused,
            "message.received": self._received,
            "delivery.attempt": self._attempt,
            "delivery.delivered": self._outcome,
            "delivery.deferred": self._outcome,
            "delivery.bounced": self._outcome,
            "delivery.expired": self._outcome,
            "notice.created": lambda e: self._count("mailfw_notices", (str(e.get("action", "")),)),
            "client.connected": lambda e: self._count("mailfw_sessions", ("outbound",)),
            "client.tls": lambda e: self._count("mailfw_tls_sessions", ("outbound",)),
            "dns.lookup": self._dns,
        }

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name is None:
            return
        self._count("mailfw_events", (str(event.get("worker", 0)),))
        handler = self._handlers.get(name)
        if handler is not None:
            handler(event)

    def _count(self, name: str, labels: tuple[str, ...], amount: float = 1) -> None:
        counts = self.counts[name]
        counts[labels] = counts.get(labels, 0) + amount

    def _observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        histograms = self.histograms[name]
        histogram = histograms.get(labels)
        if histogram is None:
            histogram = histograms[labels] = _Histogram()
        histogram.observe(value)

    def _opened(self, event: dict[str, Any]) -> None:
        listener = str(event.get("listener", ""))
        self.open[listener] = self.open.get(listener, 0) + 1

    def _connectionRefused(self, event: dict[str, Any]) -> None:
        # Counted when the connection closes, as "refused".
        if len(self._refused) < 100_000:
            self._refused.add(f"{event.get('worker', 0)} {event.get('peer')}")

    def _closed(self, event: dict[str, Any]) -> None:
        listener = str(event.get("listener", ""))
        self.open[listener] = self.open.get(listener, 0) - 1
        if self._refused:
            key = f"{event.get('worker', 0)} {event.get('peer')}"
            refused = key in self._refused
            self._refused.discard(key)
        else:
            refused = False
        outcome = "refused" if refused else "mail" if event.get("accepted") else "nomail"
        self._count("mailfw_connections", (listener, outcome))
        self._count("mailfw_sessions", ("inbound",))
        if event.get("tls"):
            self._count("mailfw_tls_sessions", ("inbound",))

    def _verdict(self, event: dict[str, Any]) -> None:
        labels = (str(event.get("policy", "")), str(event.get("stage", "")), str(event.get("verdict", "")))
        self._count("mailfw_policy_verdicts", labels)

    def _transactionRefused(self, event: dict[str, Any]) -> None:
        labels = (str(event.get("stage", "")), "refused", _replyClass(event.get("code")))
        self._count("mailfw_transactions", labels)

    def _received(self, event: dict[str, Any]) -> None:
        self._count("mailfw_transactions", ("DATA", "accepted", "2xx"))
        self._count("mailfw_messages_received", (str(event.get("listener", "")),))
        self._count("mailfw_received_bytes", (), _number(event.get("size")))
        self._observe("mailfw_enqueue_seconds", (), _number(event.get("latency")))

    def _attempt(self, event: dict[str, Any]) -> None:
        agent = str(event.get("agent", ""))
        self._count("mailfw_delivery_attempts", (agent,))
        self._observe("mailfw_delivery_seconds", (agent,), _number(event.get("duration")))

    def _outcome(self, event: dict[str, Any]) -> None:
        self._count("mailfw_deliveries", (str(event.get("agent", "")), event["event"].partition(".")[2]))

    def _dns(self, event: dict[str, Any]) -> None:
        kind = str(event.get("kind", ""))
        self._observe("mailfw_dns_lookup_seconds", (kind,), _number(event.get("duration")))
        outcome = event.get("outcome")
        if outcome != "ok":
            self._count("mailfw_dns_lookup_errors", (kind, str(outcome)))


def _replyClass(code: object) -> str:
    return f"{code // 100}xx" if isinstance(code, int) and 200 <= code < 600 else "other"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
