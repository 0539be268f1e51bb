"""
SMTP TLS reporting (RFC 8460): count each day's TLS sessions per
recipient domain, and once a day send a report to the domains that ask
for one in their C{_smtp._tls} TXT record, by mail or HTTPS POST.

The counts are shared state (L{mailfw.interfaces.ISharedState}), so every
process and node of a server adds to the same numbers.  ISharedState
cannot list its keys, so each process also remembers (bounded) which
domains and result types it counted; the report for a domain is sent by
the first process to claim it (the first C{count} of a claim key for
that day), and it reads
the shared counts, so it includes what every process counted for those
result types.
"""

from __future__ import annotations

import datetime
import gzip
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.address import Address, AddressError
from mailfw.envelope import Envelope, Recipient
from mailfw.interfaces import IMessageQueue, ISharedState
from mailfw.outbound._mtasts import TXTLookup, _describe, _discard, httpsClient

__all__ = [
    "DailyReports",
    "ReportDestinations",
    "TLSReporter",
    "TLSResults",
    "httpsPoster",
    "parseTLSRPTRecord",
]

# Seconds for one report's HTTPS POST, connection included.
POST_TIMEOUT = 60.0

_WINDOW = 3 * 86400.0


def _day(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")


class TLSResults:
    """
    Counts TLS results per day, domain, policy type and result type.

    @ivar maxDomains: domains remembered per day in this process at most.
    """

    log = Logger()
    maxDomains = 10_000

    def __init__(self, state: ISharedState, clock: IReactorTime) -> None:
        self.state = state
        self.clock = clock
        self._seen: dict[str, dict[str, set[tuple[str, str]]]] = {}

    def record(self, domain: str, policyType: str, failure: str | None) -> None:
        """
        Count one session to C{domain}: a success (C{failure} C{None}) or
        a failure of an RFC 8460 result type (C{"validation-failure"},
        C{"starttls-not-supported"}, ...).
        """
        now = self.clock.seconds()
        day = _day(now)
        domain = domain.lower()
        result = failure or "success"
        seen = self._seen.setdefault(day, {})
        for old in [d for d in self._seen if d < _day(now - _WINDOW)]:
            del self._seen[old]
        if domain not in seen and len(seen) >= self.maxDomains:
            return
        seen.setdefault(domain, set()).add((policyType, result))
        key = f"tlsrpt:{day}:{domain}:{policyType}:{result}"
        self.state.count(key, 1, _WINDOW, now).addErrback(
            lambda f: self.log.failure("Cannot count a TLS result for {nexthop}", f, nexthop=domain)
        )

    def domains(self, day: str) -> list[str]:
        return sorted(self._seen.get(day, {}))

    async def counts(self, day: str, domain: str) -> dict[tuple[str, str], int]:
        """
        The shared counts for C{domain} on C{day}, by (policy type,
        result type).
        """
        out = {}
        for policyType, result in sorted(self._seen.get(day, {}).get(domain, ())):
            key = f"tlsrpt:{day}:{domain}:{policyType}:{result}"
            out[(policyType, result)] = await self.state.count(key, 0, _WINDOW, self.clock.seconds())
        return out


@dataclass(frozen=True)
class ReportDestinations:
    """
    Where a domain asks for its TLS reports (the C{rua} of its record).

    @ivar mailto: addresses to mail the report to.
    @ivar https: URLs to POST it to (RFC 8460 5.3.2).
    """

    mailto: tuple[str, ...] = ()
    https: tuple[str, ...] = ()


def parseTLSRPTRecord(texts: list[str]) -> ReportDestinations:
    """
    The destinations of a domain's C{_smtp._tls} TXT records: of the
    records that start C{v=TLSRPTv1}, there must be exactly one, or the
    domain has none (RFC 8460 3); other URI schemes are ignored.
    """
    records = [text for text in texts if text.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(records) != 1:
        return ReportDestinations()
    fields = dict(p.strip().partition("=")[::2] for p in records[0].split(";") if p.strip())
    mailto: list[str] = []
    https: list[str] = []
    for uri in (u.strip() for u in fields.get("rua", "").split(",")):
        scheme = uri[:8].lower()
        if scheme.startswith("mailto:"):
            mailto.append(uri[7:].split("?", 1)[0])
        elif scheme == "https://":
            https.append(uri)
    return ReportDestinations(tuple(mailto), tuple(https))


class ReportPoster(Protocol):
    def __call__(self, url: str, data: bytes) -> Deferred[int]:
        """
        POST a gzipped report to C{url}; the HTTP status it answered.
        """


def httpsPoster(
    reactor: Any,
    trustRoot: Any = None,
    addressFor: Callable[[str], str] | None = None,
    timeout: float = POST_TIMEOUT,
) -> ReportPoster:
    """
    The real poster, with C{treq}: the server's certificate verified
    (L{httpsClient}), redirects not followed, C{timeout} seconds for it all.
    """
    client = httpsClient(reactor, trustRoot, addressFor, timeout)

    async def post(url: str, data: bytes) -> int:
        response = await client.post(
            url,
            data=data,
            headers={b"Content-Type": [b"application/tlsrpt+gzip"]},
            allow_redirects=False,
            timeout=timeout,
        )
        await _discard(response, reactor)
        return int(response.code)

    return lambda url, data: Deferred.fromCoroutine(post(url, data))


def reportJSON(
    day: str, domain: str, counts: Mapping[tuple[str, str], int], organisation: str, contact: str
) -> dict[str, Any]:
    """
    The RFC 8460 4.4 report for one domain and one day.
    """
    policies: dict[str, dict[str, Any]] = {}
    for (policyType, result), count in counts.items():
        entry = policies.setdefault(
            policyType,
            {
                "policy": {"policy-type": policyType, "policy-domain": domain},
                "summary": {"total-successful-session-count": 0, "total-failure-session-count": 0},
                "failure-details": [],
            },
        )
        if result == "success":
            entry["summary"]["total-successful-session-count"] += count
        else:
            entry["summary"]["total-failure-session-count"] += count
            entry["failure-details"].append({"result-type": result, "failed-session-count": count})
    return {
        "organization-name": organisation,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": f"{day}.{domain}.{secrets.token_hex(8)}@{organisation}",
        "policies": list(policies.values()),
    }


class TLSReporter:
    """
    Sends the day's reports by mail through the queue.

    @ivar sender: the envelope sender; C{None} (the default) for the null
        reverse-path, so that an undeliverable report does not bounce.
    @ivar post: sends a report to an C{https:} destination; C{None}: such
        destinations are skipped.
    """

    log = Logger()

    def __init__(
        self,
        results: TLSResults,
        queue: IMessageQueue,
        lookupTXT: TXTLookup,
        hostname: str,
        sender: Address | None = None,
        post: ReportPoster | None = None,
    ) -> None:
        self.results = results
        self.queue = queue
        self.lookupTXT = lookupTXT
        self.hostname = hostname
        self.sender = sender
        self.post = post

    async def sendReports(self, day: str) -> int:
        """
        Send C{day}'s report to each domain counted that publishes a
        TLSRPT record, by mail and by HTTPS as the record asks; returns
        for how many domains at least one destination took it.  Failures
        are logged with the domain and the reason (a report is sent once:
        RFC 8460 5.3 allows, and does not require, retrying).
        """
        sent = 0
        for domain in self.results.domains(day):
            claims = await self.results.state.count(
                f"tlsrpt-sent:{day}:{domain}", 1, _WINDOW, self.results.clock.seconds()
            )
            if claims != 1:
                continue  # another process sent it
            try:
                destinations = parseTLSRPTRecord(await self.lookupTXT(f"_smtp._tls.{domain}"))
            except Exception as e:
                self.log.info("No TLSRPT record for {nexthop}: {why}", nexthop=domain, why=str(e)[:200])
                continue
            recipients = []
            for text in destinations.mailto:
                try:
                    recipients.append(Recipient(Address.parse(text)))
                except AddressError:
                    self.log.info("Bad TLSRPT address {address} of {nexthop}", address=text, nexthop=domain)
            urls = destinations.https if self.post is not None else ()
            if not recipients and not urls:
                continue
            counts = await self.results.counts(day, domain)
            report = reportJSON(day, domain, counts, self.hostname, f"postmaster@{self.hostname}")
            data = gzip.compress(json.dumps(report).encode("utf-8"))
            taken = False
            if recipients:
                body = self._message(day, domain, report, data, recipients)
                message = self.queue.receive(Envelope(self.sender, tuple(recipients), size=len(body)))
                message.write(body)
                queueID = await message.commit()
                self.log.info(
                    "Queued the TLS report for {nexthop} as {queueID}", nexthop=domain, queueID=queueID
                )
                taken = True
            for url in urls:
                taken = await self._postTo(url, domain, data) or taken
            if taken:
                sent += 1
        return sent

    async def _postTo(self, url: str, domain: str, data: bytes) -> bool:
        """
        POST the report to C{url}; whether it answered 2xx (RFC 8460 5.3.2).
        """
        assert self.post is not None
        try:
            code = await self.post(url, data)
        except Exception as e:
            self.log.warn(
                "Posting the TLS report for {nexthop} to {url} failed: {why}",
                nexthop=domain,
                url=url,
                why=_describe(e),
            )
            return False
        if not 200 <= code < 300:
            self.log.warn(
                "Posting the TLS report for {nexthop} to {url}: HTTP {code}",
                nexthop=domain,
                url=url,
                code=code,
            )
            return False
        self.log.info("Posted the TLS report for {nexthop} to {url}", nexthop=domain, url=url)
        return True

    def _message(
        self, day: str, domain: str, report: dict[str, Any], data: bytes, recipients: list[Recipient]
    ) -> bytes:
        message = EmailMessage()
        message["From"] = f"TLS reports <postmaster@{self.hostname}>"
        message["To"] = ", ".join(str(r.address) for r in recipients)
        message["Subject"] = (
            f"Report Domain: {domain} Submitter: {self.hostname} Report-ID: <{report['report-id']}>"
        )
        message["Date"] = formatdate(usegmt=True)
        message["TLS-Report-Domain"] = domain
        message["TLS-Report-Submitter"] = self.hostname
        message.set_content(f"TLS report for {domain} on {day} from {self.hostname}.\n")
        message.add_attachment(
            data,
            maintype="application",
            subtype="tlsrpt+gzip",
            filename=f"{self.hostname}!{domain}!{day}.json.gz",
        )
        message.set_type("multipart/report")
        message.set_param("report-type", "tlsrpt")
        return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


class DailyReports:
    """
    Sends yesterday's reports a few minutes after each midnight (UTC).

    Started by the first recorded result rather than by a service, so an
    agent that never relays never schedules anything; the timer is a
    plain C{callLater} on the agent's clock.
    """

    log = Logger()
    delay = 300.0

    def __init__(self, reporter: TLSReporter, clock: IReactorTime) -> None:
        self.reporter = reporter
        self.clock = clock
        self._timer: Any = None

    def ensureStarted(self) -> None:
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        now = self.clock.seconds()
        nextMidnight = (int(now) // 86400 + 1) * 86400
        self._timer = self.clock.callLater(nextMidnight + self.delay - now, self._fire)

    def _fire(self) -> None:
        day = _day(self.clock.seconds() - 86400)

        def failed(failure: Any) -> None:
            self.log.failure("Sending the TLS reports for {day} failed", failure, day=day)

        Deferred.fromCoroutine(self.reporter.sendReports(day)).addErrback(failed)
        self._schedule()
