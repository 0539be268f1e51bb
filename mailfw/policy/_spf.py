"""
The C{spf} policy: the sender's SPF record (RFC 7208) checked at MAIL.

The evaluation is pyspf's, run in a thread of the policy's own pool; its
DNS questions come back to the reactor thread and are answered by the
server's L{twisted.names} resolver (C{[dns]}), so SPF sees the same
nameservers, cache and time limits as everything else.  pyspf enforces
the RFC's limits itself: 10 lookups that cause DNS queries, 2 void
lookups, and the per-check time limit given here.

A result is kept, for the same client address, sender and HELO name, as
long as the shortest time to live of the DNS answers it was computed from
(L{mailfw._dnscache.answerTTL}): evaluating again within that time would
ask the same questions and get the same answers, so a busy sender costs
one evaluation per TTL instead of a thread hop and a pyspf run per message.
C{temperror} is never kept.

The result is recorded as an L{AuthResult} for C{Authentication-Results:}
(and for the C{dmarc} policy); by default nothing is refused, since DMARC
decides with DKIM's results too.  C{fail = "reject"} refuses an SPF
C{fail} with 550 5.7.23 (RFC 7372); a DNS failure is C{temperror},
never a refusal, unless C{temperror = "defer"} asks for 451 4.4.3.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Mapping
from typing import Any

import spf
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError as TwistedTimeout
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.names import dns, error

from mailfw._dnscache import MAX_TTL, answerTTL, missingTTL
from mailfw.address import Address
from mailfw.config import ComponentContext, Section
from mailfw.envelope import Session
from mailfw.policy import CONTINUE, AuthResult, Policy, Verdict
from mailfw.policy._cache import TTLCache
from mailfw.queue._produce import ThreadPoolRunner, ThreadRunner

__all__ = ["SPFPolicy", "fromConfig"]

SPF_FAIL = Verdict.reject(550, "5.7.23", "SPF validation failed")
SPF_TEMPERROR = Verdict.reject(451, "4.4.3", "SPF check failed temporarily, try again later")

# How the thread running pyspf asks the reactor's resolver: one function
# per check, found through the thread (pyspf looks DNS up through its
# module's DNSLookup hook, the one its own test suite replaces).
_lookups = threading.local()


def _dnsLookup(name: str, qtype: str, strict: object = True, timeout: object = None) -> list[Any]:
    lookup: Callable[[str, str], list[Any]] = _lookups.lookup
    return lookup(name, qtype)


spf.DNSLookup = _dnsLookup

# The resolver's method for each record type pyspf asks for.
_METHODS = {
    "A": "lookupAddress",
    "AAAA": "lookupIPV6Address",
    "MX": "lookupMailExchange",
    "TXT": "lookupText",
    "SPF": "lookupSenderPolicy",
    "PTR": "lookupPointer",
}


def _records(answers: list[dns.RRHeader], qtype: str) -> list[Any]:
    """
    twisted.names answers in pyspf's shape: C{((name, type), value)}.
    """
    out: list[Any] = []
    for answer in answers:
        name = answer.name.name.decode("ascii", "replace").rstrip(".")
        payload: Any = answer.payload
        if isinstance(payload, dns.Record_A):
            out.append(((name, "A"), payload.dottedQuad()))
        elif isinstance(payload, dns.Record_AAAA):
            out.append(((name, "AAAA"), str(ipaddress.IPv6Address(payload.address))))
        elif isinstance(payload, dns.Record_MX):
            out.append(((name, "MX"), (payload.preference, str(payload.name))))
        elif isinstance(payload, dns.Record_TXT | dns.Record_SPF):
            out.append(((name, qtype), list(payload.data)))
        elif isinstance(payload, dns.Record_PTR):
            out.append(((name, "PTR"), str(payload.name)))
        elif isinstance(payload, dns.Record_CNAME):
            out.append(((name, "CNAME"), str(payload.name)))
    return out


class SPFPolicy(Policy):
    """
    Checks the MAIL FROM identity (or the HELO identity for C{<>}).

    @ivar fail: C{"mark"} or C{"reject"}: what an SPF C{fail} does.
    @ivar temperror: C{"mark"} or C{"defer"}.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        resolver: Any,
        runInThread: ThreadRunner,
        callFromThread: Callable[..., Any],
        hostname: str,
        fail: str = "mark",
        temperror: str = "mark",
        timeout: float = 20.0,
        clock: Any = None,
        cacheSize: int = 10000,
    ) -> None:
        self.name = name
        self._resolver = resolver
        self._runInThread = runInThread
        self._callFromThread = callFromThread
        self._hostname = hostname
        self.fail = fail
        self.temperror = temperror
        self._timeout = timeout
        # (client, sender, HELO) -> (result, explanation), for the TTL of
        # the answers it came from.
        self._results: TTLCache[tuple[str, str]] | None = (
            None if clock is None else TTLCache(clock, cacheSize)
        )

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        if session.authenticated is not None or session.relayClient or not session.peerHost:
            # Our own users and networks are not the Internet.
            return CONTINUE
        helo = session.helo or ""
        mailfrom = "" if sender is None else str(sender)
        identity = ("smtp.mailfrom", mailfrom) if mailfrom else ("smtp.helo", helo)
        host = session.peerHost
        key = f"{host} {mailfrom} {helo}"

        def evaluate() -> tuple[str, str, int]:
            _lookups.lookup = self._lookupFromThread
            _lookups.ttl = MAX_TTL
            try:
                query = spf.query(
                    host,
                    mailfrom,
                    helo,
                    receiver=self._hostname,
                    timeout=self._timeout,
                    querytime=self._timeout,
                )
                result, _code, explanation = query.check()
                return str(result), str(explanation), _lookups.ttl
            finally:
                del _lookups.lookup, _lookups.ttl

        def keep(outcome: tuple[str, str, int]) -> tuple[str, str]:
            result, explanation, ttl = outcome
            if self._results is not None and result != "temperror":
                self._results.put(key, (result, explanation), ttl)
            return result, explanation

        def decided(outcome: tuple[str, str]) -> Verdict:
            result, explanation = outcome
            if result == "ambiguous":
                result = "permerror"
            # pyspf explains every result; only a failure needs it.
            reason = explanation or None if result not in ("pass", "none", "neutral") else None
            found = AuthResult("spf", result, reason=reason, properties=(identity,))
            if result == "fail" and self.fail == "reject":
                self.log.info(
                    "spf {policy}: {result} for {identity} from {host}",
                    policy=self.name,
                    result=result,
                    identity=identity[1],
                    host=host,
                )
                return Verdict(SPF_FAIL.reply, results=(found,))
            if result == "temperror" and self.temperror == "defer":
                return Verdict(SPF_TEMPERROR.reply, results=(found,))
            return Verdict(results=(found,))

        known = self._results.get(key) if self._results is not None else None
        if known is not None:
            return decided(known)
        return self._runInThread(evaluate).addCallback(keep).addCallback(decided)

    def _lookupFromThread(self, name: str, qtype: str) -> list[Any]:
        """
        One DNS question of pyspf, asked on the reactor thread; DNS
        failures become pyspf's C{TempError}, a missing name an empty
        answer.
        """
        if qtype not in _METHODS:
            return []

        def ask() -> Deferred[Any]:
            lookup = getattr(self._resolver, _METHODS[qtype])
            d: Deferred[Any] = lookup(name)
            return d

        try:
            answers, authority, _additional = self._callFromThread(ask)
        except error.DNSNameError as e:
            _lookups.ttl = min(_lookups.ttl, missingTTL(e))
            return []
        except (error.DNSServerError, error.DNSQueryRefusedError, error.DNSUnknownError, TwistedTimeout) as e:
            raise spf.TempError(f"DNS {type(e).__name__} for {name} {qtype}") from None
        except error.DomainError:
            _lookups.ttl = 0
            return []
        except Exception as e:
            raise spf.TempError(f"DNS error for {name} {qtype}: {e}") from None
        _lookups.ttl = min(_lookups.ttl, answerTTL(answers, authority))
        return _records(answers, qtype)


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> SPFPolicy:
    section = Section(f"[policy.{instanceName}]", options)
    fail = section.choice("fail", ("mark", "reject"), "mark")
    temperror = section.choice("temperror", ("mark", "defer"), "mark")
    timeout = section.number("lookup_time", 20.0, minimum=1)
    threads = section.integer("threads", 16, minimum=1)
    section.finish()
    reactor = context.reactor
    return SPFPolicy(
        instanceName,
        context.resolver(),
        ThreadPoolRunner(reactor, f"mailfw-spf-{instanceName}", threads),
        lambda f: blockingCallFromThread(reactor, f),
        context.hostname,
        fail,
        temperror,
        timeout,
        clock=reactor,
    )
