"""
The C{dmarc} policy (RFC 7489): is the domain in C{From:} the one that SPF
or DKIM authenticated, and what does that domain ask receivers to do when
it is not?

It runs at the end of data, after the C{spf} and C{dkim} policies (put it
after them in the file): their L{AuthResult}s are its input.  The
organisational domain comes from the Public Suffix List
(C{publicsuffixlist}); the record is looked up with the server's
resolver.  The result is recorded for C{Authentication-Results:}; the
domain's policy is applied only with C{enforce = true}: C{p=reject} is
refused with 550 5.7.1, C{p=quarantine} is held in the queue
(C{quarantine = "hold"}) or only marked.  Every evaluation is appended to
a history file (JSON lines, as OpenDMARC's), the data a later aggregate
report sender reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from publicsuffixlist import PublicSuffixList
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.names import error
from zope.interface import implementer

from mailfw.config import ComponentContext, Section
from mailfw.envelope import Envelope, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import AuthResult, Policy, Quarantine, Verdict
from mailfw.queue._produce import ThreadPoolRunner, ThreadRunner

__all__ = ["DMARCPolicy", "DMARCRecord", "fromConfig", "parseRecord"]

_FROM_FIELD = re.compile(rb"^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)
_TAG = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


@dataclass(frozen=True)
class DMARCRecord:
    """
    The tags of a DMARC record that a receiver acts on.
    """

    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: str = ""


def parseRecord(text: str) -> DMARCRecord | None:
    """
    A DMARC record, or C{None} if C{text} is not one (RFC 7489 6.3: it
    must start with C{v=DMARC1}; an unknown or missing C{p} makes it
    invalid, unless C{rua} is given, when it counts as C{p=none}).
    """
    parts = text.split(";")
    first = _TAG.match(parts[0])
    if first is None or first.group(1) != "v" or first.group(2) != "DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        match = _TAG.match(part)
        if match is not None:
            tags.setdefault(match.group(1).lower(), match.group(2))
    policies = ("none", "quarantine", "reject")
    p = tags.get("p", "").lower()
    if p not in policies:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return DMARCRecord(
        p=p,
        sp=sp if sp in policies else None,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=pct,
        rua=tags.get("rua", ""),
    )


def fromDomain(header: bytes) -> str | None:
    """
    The one domain of the C{From:} field of C{header}, lower-cased, or
    C{None} when there is not exactly one From address with a domain
    (RFC 7489 6.6.1: such a message cannot be evaluated).
    """
    fields = _FROM_FIELD.findall(header)
    if len(fields) != 1:
        return None
    value = fields[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [address for _name, address in getaddresses([value]) if address]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


_psl: PublicSuffixList | None = None


def _publicSuffixList() -> PublicSuffixList:
    """
    The Public Suffix List, loaded once (it takes a third of a second).
    """
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    return _psl


@implementer(IMessageCheck)
class _DMARCCheck:
    """
    Waits for the end of data: DMARC needs no body, only the results.
    """

    def __init__(self, policy: DMARCPolicy, session: Session, envelope: Envelope, domain: str | None) -> None:
        self._policy = policy
        self._session = session
        self._envelope = envelope
        self._domain = domain

    def write(self, data: bytes) -> None:
        return None

    def end(self, results: tuple[AuthResult, ...]) -> Deferred[Verdict] | Verdict:
        return self._policy.evaluate(self._session, self._envelope, self._domain, results)

    def abort(self) -> None:
        pass


class DMARCPolicy(Policy):
    """
    Evaluates DMARC for each message from the Internet.

    @ivar enforce: apply the domains' reject and quarantine policies.
    @ivar quarantine: C{"hold"} (keep in the queue for an operator) or
        C{"mark"} (deliver, with the result in the header).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        resolver: Any,
        enforce: bool = False,
        quarantine: str = "hold",
        history: Path | None = None,
        runInThread: ThreadRunner | None = None,
        sample: Callable[[], float] = random.random,
        clock: Any = None,
    ) -> None:
        self.name = name
        self._resolver = resolver
        self.enforce = enforce
        self.quarantine = quarantine
        self._history = history
        self._runInThread = runInThread
        self._sample = sample
        self._clock = clock
        self._psl = _publicSuffixList()
        self._unwritten: list[str] = []
        self._writing = False
        self._timer: IDelayedCall | None = None

    def organizationalDomain(self, domain: str) -> str:
        """
        The registrable domain of C{domain} (itself if it is a public
        suffix or unknown).
        """
        return self._psl.privatesuffix(domain) or domain

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        if session.authenticated is not None or session.relayClient:
            return None
        return _DMARCCheck(self, session, envelope, fromDomain(header))

    def evaluate(
        self, session: Session, envelope: Envelope, domain: str | None, results: Sequence[AuthResult]
    ) -> Deferred[Verdict] | Verdict:
        """
        Find the record for C{domain} (or its organisational domain) and
        judge C{results} against it.
        """
        if domain is None:
            return Verdict(results=(AuthResult("dmarc", "permerror", reason="no single From domain"),))
        organizational = self.organizationalDomain(domain)

        def found(record: tuple[str, DMARCRecord] | None) -> Verdict:
            return self._judge(session, envelope, domain, organizational, record, results)

        def failed(f: Any) -> Verdict:
            self.log.info(
                "dmarc {policy}: lookup for {domain} failed: {error}",
                policy=self.name,
                domain=domain,
                error=f.getErrorMessage(),
            )
            return Verdict(results=(AuthResult("dmarc", "temperror", properties=(("header.from", domain),)),))

        d = self._record(domain)

        def orOrganizational(record: DMARCRecord | None) -> Any:
            if record is not None:
                return (domain, record)
            if organizational == domain:
                return None
            return self._record(organizational).addCallback(
                lambda r: None if r is None else (organizational, r)
            )

        return d.addCallback(orOrganizational).addCallbacks(found, failed)

    def _record(self, domain: str) -> Deferred[DMARCRecord | None]:
        """
        The DMARC record at C{_dmarc.domain}; C{None} if there is none (or
        more than one); fails on a DNS failure.
        """

        def parsed(answer: Any) -> DMARCRecord | None:
            answers = answer[0]
            texts = [
                b"".join(a.payload.data).decode("utf-8", "replace")
                for a in answers
                if hasattr(a.payload, "data")
            ]
            records = [r for r in (parseRecord(t) for t in texts) if r is not None]
            return records[0] if len(records) == 1 else None

        def missing(f: Any) -> None:
            f.trap(error.DNSNameError)
            return None

        d: Deferred[Any] = self._resolver.lookupText(f"_dmarc.{domain}")
        return d.addCallbacks(parsed, missing)

    def _aligned(self, domain: str, other: str, mode: str) -> bool:
        other = other.rstrip(".").lower()
        if mode == "s":
            return other == domain
        return self.organizationalDomain(other) == self.organizationalDomain(domain)

    def _judge(
        self,
        session: Session,
        envelope: Envelope,
        domain: str,
        organizational: str,
        found: tuple[str, DMARCRecord] | None,
        results: Sequence[AuthResult],
    ) -> Verdict:
        if found is None:
            return Verdict(results=(AuthResult("dmarc", "none", properties=(("header.from", domain),)),))
        recordDomain, record = found
        spfAligned = dkimAligned = False
        for result in results:
            if result.result != "pass":
                continue
            if result.method == "spf":
                identity = result.property("smtp.mailfrom") or result.property("smtp.helo") or ""
                spfAligned = spfAligned or self._aligned(domain, identity.rpartition("@")[2], record.aspf)
            elif result.method == "dkim":
                signer = result.property("header.d") or ""
                dkimAligned = dkimAligned or self._aligned(domain, signer, record.adkim)
        passed = spfAligned or dkimAligned
        requested = record.p
        if recordDomain != domain and record.sp is not None:
            requested = record.sp
        disposition = "none"
        if not passed and requested != "none":
            disposition = requested
            if record.pct < 100 and self._sample() * 100 >= record.pct:
                # Out of the sample: the next milder policy (RFC 7489 6.6.4).
                disposition = "quarantine" if requested == "reject" else "none"
        applied = disposition if self.enforce else "none"
        judged = AuthResult(
            "dmarc",
            "pass" if passed else "fail",
            reason=f"p={record.p} dis={applied}",
            properties=(("header.from", domain),),
        )
        self._remember(session, envelope, domain, recordDomain, record, results, passed, applied)
        if applied == "reject":
            self.log.info(
                "dmarc {policy}: rejected {queueID} from {peer}: {domain} p={p}",
                policy=self.name,
                queueID=envelope.queueID,
                peer=session.peerHost,
                domain=domain,
                p=requested,
            )
            return Verdict(
                Verdict.reject(550, "5.7.1", f"Rejected by the DMARC policy of {domain}").reply,
                results=(judged,),
            )
        if applied == "quarantine" and self.quarantine == "hold":
            return Verdict(results=(judged,), edits=(Quarantine(f"DMARC policy of {domain}"),))
        return Verdict(results=(judged,))

    def _remember(
        self,
        session: Session,
        envelope: Envelope,
        domain: str,
        recordDomain: str,
        record: DMARCRecord,
        results: Sequence[AuthResult],
        passed: bool,
        disposition: str,
    ) -> None:
        """
        Append the evaluation to the history file, off the reactor thread.
        """
        history, runInThread = self._history, self._runInThread
        if history is None or runInThread is None:
            return
        line = json.dumps(
            {
                "time": self._clock.seconds() if self._clock is not None else None,
                "queueID": envelope.queueID,
                "sourceIP": session.peerHost,
                "headerFrom": domain,
                "policyDomain": recordDomain,
                "p": record.p,
                "sp": record.sp,
                "pct": record.pct,
                "adkim": record.adkim,
                "aspf": record.aspf,
                "rua": record.rua,
                "result": "pass" if passed else "fail",
                "disposition": disposition,
                "auth": [
                    {"method": r.method, "result": r.result, "domain": _identity(r)}
                    for r in results
                    if r.method in ("spf", "dkim")
                ],
            },
            separators=(",", ":"),
        )

        if len(self._unwritten) >= MAX_UNWRITTEN:
            # The disk stalls: the oldest evaluations go, not the memory.
            del self._unwritten[0]
            self.log.warn(
                "dmarc {policy}: the history falls behind; an evaluation was dropped", policy=self.name
            )
        self._unwritten.append(line + "\n")
        self._writeSoon()

    def _writeSoon(self) -> None:
        """
        Have what waits written within L{HISTORY_INTERVAL} (at once without
        a clock), unless a write is under way: it schedules the next.
        """
        if self._writing or self._timer is not None or not self._unwritten:
            return
        if self._clock is None:
            self.flush()
        else:
            self._timer = self._clock.callLater(HISTORY_INTERVAL, self.flush)

    def flush(self) -> Deferred[None]:
        """
        Append every evaluation not yet written, in one thread call of the
        policy's one-thread pool (so appends keep their order).  Called at
        most once a L{HISTORY_INTERVAL} while mail arrives, not once a
        message, and by the server before it stops.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        history, runInThread = self._history, self._runInThread
        if not self._unwritten or history is None or runInThread is None:
            return succeed(None)
        lines, self._unwritten = "".join(self._unwritten), []
        self._writing = True

        def append() -> None:
            with history.open("a", encoding="utf-8") as f:
                f.write(lines)

        def written(_: object) -> None:
            self._writing = False
            self._writeSoon()

        return (
            runInThread(append)
            .addErrback(
                lambda f: self.log.failure("dmarc {policy}: writing the history failed", f, policy=self.name)
            )
            .addCallback(written)
        )


HISTORY_INTERVAL = 1.0
"""Seconds between appends to the history while mail arrives."""

MAX_UNWRITTEN = 10000
"""Evaluations kept for the history while the disk does not keep up."""


def _identity(result: AuthResult) -> str:
    identity = result.property("header.d") or result.property("smtp.mailfrom") or result.property("smtp.helo")
    return (identity or "").rpartition("@")[2]


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> DMARCPolicy:
    section = Section(f"[policy.{instanceName}]", options)
    enforce = section.flag("enforce", False)
    quarantine = section.choice("quarantine", ("hold", "mark"), "hold")
    history = section.text("history", "dmarc-history.jsonl")
    section.finish()
    reactor = context.reactor
    policy = DMARCPolicy(
        instanceName,
        context.resolver(),
        enforce,
        quarantine,
        context.path(history) if history else None,
        ThreadPoolRunner(reactor, f"mailfw-dmarc-{instanceName}", 1) if history else None,
        clock=reactor,
    )
    if history:
        # What waits for the next append is written before the server stops.
        reactor.addSystemEventTrigger("before", "shutdown", policy.flush)
    return policy
