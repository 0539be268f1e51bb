"""
The answer cache in front of the server's shared L{twisted.names} client.

Every policy and the relay ask the same questions again and again (the
sender domain's SPF and DMARC records for each message from it, the MX of a
busy destination), and twisted.names' client sends each one to the name
server on a new UDP socket.  Postfix leaves caching to a local resolver;
mailfw keeps the answers itself, for their time to live, so a server
without a local cache does not pay a round trip per question:

  - positive answers (also empty ones) for the smallest TTL of their
    records, at most L{MAX_TTL};
  - "no such name" for the negative TTL of the zone's SOA (RFC 2308: the
    smaller of the SOA record's TTL and its MINIMUM field), at most
    L{MAX_NEGATIVE_TTL}; without an SOA it is not kept;
  - temporary failures (SERVFAIL, timeouts) never.

Records handed out from the cache carry the time they have left, as a
resolver's would, so a caller that keeps derived results for the TTL (the
DNSBL policy) does not keep them longer.  At most C{size} answers are kept,
the least recently used forgotten first, so a flood of distinct names costs
bounded memory.  DANE asks its own validating resolver and never sees this
cache.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from mailfw.policy._cache import TTLCache

__all__ = ["MAX_NEGATIVE_TTL", "MAX_TTL", "CachingResolver", "answerTTL", "missingTTL"]

MAX_TTL = 86400
"""The longest an answer is kept (unbound's C{cache-max-ttl})."""

MAX_NEGATIVE_TTL = 3600
"""The longest a "no such name" is kept (unbound's C{cache-max-negative-ttl})."""

_Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class CachingResolver(ResolverBase):
    """
    A resolver that answers from its cache, or asks C{upstream} and keeps
    what it says for its time to live.
    """

    def __init__(self, upstream: Any, clock: IReactorTime, size: int = 10000) -> None:
        ResolverBase.__init__(self)
        self._upstream = upstream
        self._clock = clock
        # name -> (when stored, the answer, or the NXDOMAIN error).
        self._cache: TTLCache[tuple[float, _Answer | error.DNSNameError]] = TTLCache(clock, size)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[_Answer]:
        key = f"{name.decode('ascii', 'replace').lower()} {cls} {type}"
        cached = self._cache.get(key)
        if cached is not None:
            stored, answer = cached
            if isinstance(answer, error.DNSNameError):
                return fail(answer)
            age = int(self._clock.seconds() - stored)
            answers, authority, additional = ([_aged(record, age) for record in part] for part in answer)
            return succeed((answers, authority, additional))
        d: Deferred[_Answer] = self._upstream.query(dns.Query(name, type, cls), timeout)
        return d.addCallbacks(self._keep, self._keepMissing, callbackArgs=(key,), errbackArgs=(key,))

    def _keep(self, answer: _Answer, key: str) -> _Answer:
        answers, authority, _additional = answer
        self._cache.put(key, (self._clock.seconds(), answer), answerTTL(answers, authority))
        return answer

    def _keepMissing(self, failure: Failure, key: str) -> Failure:
        missing = failure.value
        if isinstance(missing, error.DNSNameError):
            # twisted.names' client raises it with the response message.
            self._cache.put(key, (self._clock.seconds(), missing), missingTTL(missing))
        return failure


def answerTTL(answers: list[dns.RRHeader], authority: list[dns.RRHeader]) -> int:
    """
    How long an answer may be kept: its smallest TTL, or for an empty one
    the negative TTL, at most L{MAX_TTL}.
    """
    if answers:
        return min(min(int(record.ttl) for record in answers), MAX_TTL)
    return _negativeTTL(authority)


def _negativeTTL(authority: list[dns.RRHeader]) -> int:
    """
    RFC 2308 section 5: the smaller of the SOA's TTL and its MINIMUM, at
    most L{MAX_NEGATIVE_TTL}; 0 (not kept) without an SOA.
    """
    for record in authority:
        soa: Any = record.payload
        if isinstance(soa, dns.Record_SOA):
            return min(int(record.ttl), int(soa.minimum), MAX_NEGATIVE_TTL)
    return 0


def missingTTL(missing: error.DNSNameError) -> int:
    """
    How long a "no such name" may be kept (twisted.names' client raises it
    with the response, whose authority section has the SOA).
    """
    message = missing.args[0] if missing.args else None
    return _negativeTTL(getattr(message, "authority", []))


def _aged(record: dns.RRHeader, age: int) -> dns.RRHeader:
    """
    C{record} with C{age} seconds less to live.
    """
    if age <= 0:
        return record
    return dns.RRHeader(
        record.name.name, record.type, record.cls, max(0, record.ttl - age), record.payload, record.auth
    )
