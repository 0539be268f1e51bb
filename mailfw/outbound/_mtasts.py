"""
MTA-STS (RFC 8461): a domain publishes, over HTTPS with a certificate
valid for C{mta-sts.DOMAIN}, which MX hosts may receive its mail and
whether senders must refuse anything else (C{enforce}) or only report it
(C{testing}).

L{STSPolicies.policyFor} answers "what policy applies to this domain
now": a C{_mta-sts} TXT lookup through twisted.names, then the policy from
the memory or disk cache (kept for the policy's C{max_age}, at most a
year), fetching it when the cache has none or the TXT record's C{id}
changed.  A fetch happens at most once at a time per domain; a refresh of a
policy that is still cached happens in the background and the cached one
is used meanwhile.

Bad input never becomes a failure of the mail by itself: a missing or
malformed TXT record or policy, a failed fetch (certificate, status,
redirect, size over 64 KiB, 60 seconds) are logged with the domain and the
reason, and the domain then has no policy (or keeps its cached one), as
RFC 8461 5 says.  What an enforced policy means for a delivery is the
caller's business (L{mailfw.outbound._policy}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import error as dnserror
from twisted.python.failure import Failure

from mailfw.queue._produce import ThreadRunner

__all__ = [
    "FETCH_TIMEOUT",
    "MAX_POLICY_SIZE",
    "HTTPSFetcher",
    "PolicyError",
    "STSPolicies",
    "STSPolicy",
    "mxMatches",
    "parsePolicy",
    "parseSTSRecord",
]

log = Logger()

MAX_POLICY_SIZE = 64 * 1024
FETCH_TIMEOUT = 60.0
# RFC 8461 3.2: max_age is at most 31557600 (a year).
MAX_AGE_LIMIT = 31_557_600
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """
    A TXT record or policy file that does not follow RFC 8461; the text
    says what is wrong.
    """


@dataclass(frozen=True)
class STSPolicy:
    """
    One domain's policy.

    @ivar mode: C{"enforce"}, C{"testing"} or C{"none"}.
    @ivar mx: the MX patterns (C{mail.example.com}, C{*.example.net}).
    @ivar maxAge: seconds the policy may be cached.
    @ivar id: the TXT record's C{id} the policy was fetched for.
    @ivar fetched: when it was fetched (POSIX time).
    """

    mode: str
    mx: tuple[str, ...]
    maxAge: int
    id: str = ""
    fetched: float = 0.0

    def allows(self, host: str) -> bool:
        """
        Whether C{host} (an MX host name) matches one of the patterns.
        """
        return any(mxMatches(p, host) for p in self.mx)

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.maxAge


def mxMatches(pattern: str, host: str) -> bool:
    """
    RFC 8461 4.1: C{*.example.com} matches one more label on the left
    (C{mx.example.com}, not C{a.b.example.com} or C{example.com}); any
    other pattern matches the name exactly, case-insensitively.
    """
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == host


def parseSTSRecord(texts: Sequence[str]) -> str | None:
    """
    The C{id} of the one C{v=STSv1} TXT record among C{texts} (each one
    record's strings joined), or C{None} when there is none.

    @raise PolicyError: for several STSv1 records (RFC 8461 3.1: then
        there is no policy) or a malformed one.
    """
    records = [t for t in texts if t.startswith("v=STSv1")]
    if not records:
        return None
    if len(records) > 1:
        raise PolicyError("several v=STSv1 TXT records")
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PolicyError(f"TXT field without '=': {part[:40]!r}")
        fields[key.strip()] = value.strip()
    if fields.get("v") != "STSv1":
        raise PolicyError("TXT record does not start with v=STSv1")
    ident = fields.get("id", "")
    if not _ID.match(ident):
        raise PolicyError(f"bad id {ident[:40]!r} in the TXT record")
    return ident


def parsePolicy(text: str, ident: str = "", fetched: float = 0.0) -> STSPolicy:
    """
    Parse a policy file (RFC 8461 3.2: C{key: value} lines).

    @raise PolicyError: naming the problem.
    """
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line without ':': {line[:60]!r}")
        fields.setdefault(key.strip(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode", [""])
    if len(mode) != 1 or mode[0] not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode!r}")
    ages = fields.get("max_age", [])
    if len(ages) != 1 or not ages[0].isdigit() or len(ages[0]) > 10:
        raise PolicyError("max_age missing or not a number")
    mx = tuple(m.lower() for m in fields.get("mx", []))
    if mode[0] != "none" and not mx:
        raise PolicyError("no mx line")
    return STSPolicy(mode[0], mx, min(int(ages[0]), MAX_AGE_LIMIT), ident, fetched)


class HTTPSFetcher(Protocol):
    """
    Fetches C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}.
    """

    def __call__(self, domain: str) -> Deferred[str]:
        """
        @return: the policy text; fails with L{PolicyError} saying why
            (certificate, status, redirect, size, time, encoding).
        """


def httpsClient(
    reactor: Any, trustRoot: Any = None, addressFor: Callable[[str], str] | None = None, timeout: float = 60
) -> Any:
    """
    A C{treq} client that speaks only HTTPS and verifies the server's
    certificate for the URL's host against C{trustRoot} (default the
    platform's): what MTA-STS and TLS reporting ask for.

    @param addressFor: maps a host name to the address to connect to
        (tests point it at 127.0.0.1); default a normal name lookup.
    """
    from treq.client import HTTPClient
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
    from twisted.web.iweb import IAgentEndpointFactory
    from zope.interface import implementer

    policy = BrowserLikePolicyForHTTPS(trustRoot)

    @implementer(IAgentEndpointFactory)
    class Endpoints:
        def endpointForURI(self, uri: Any) -> Any:
            if uri.scheme != b"https":
                raise ValueError(f"not an https URL: {uri.toBytes()!r}")
            host = uri.host.decode("ascii")
            tcp: Any
            if addressFor is None:
                tcp = HostnameEndpoint(reactor, host, uri.port, timeout=timeout)
            else:
                tcp = TCP4ClientEndpoint(reactor, addressFor(host), uri.port, timeout=timeout)
            return wrapClientTLS(policy.creatorForNetloc(uri.host, uri.port), tcp)

    return HTTPClient(Agent.usingEndpointFactory(reactor, Endpoints()))


def treqFetcher(
    reactor: Any,
    trustRoot: Any = None,
    addressFor: Callable[[str], str] | None = None,
    port: int = 443,
    timeout: float = FETCH_TIMEOUT,
    maxSize: int = MAX_POLICY_SIZE,
) -> HTTPSFetcher:
    """
    The real fetcher, with C{treq}: the certificate is verified for
    C{mta-sts.DOMAIN} against C{trustRoot} (default the platform's),
    redirects are not followed, the body is cut off past C{maxSize} and
    the whole fetch past C{timeout} seconds.

    @param addressFor: maps the host name to the address to connect to
        (tests point it at 127.0.0.1); default a normal name lookup.
    """
    import treq

    client = httpsClient(reactor, trustRoot, addressFor, timeout)

    async def fetch(domain: str) -> str:
        url = f"https://mta-sts.{domain}:{port}/.well-known/mta-sts.txt"
        if port == 443:
            url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        try:
            response = await client.get(url, allow_redirects=False, timeout=timeout)
        except Exception as e:
            raise PolicyError(f"fetching {url} failed: {_describe(e)}") from None
        if response.code != 200:
            await _discard(response, reactor)
            raise PolicyError(f"{url} answered HTTP {response.code} (redirects are not followed)")
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        if not kind.startswith(b"text/plain"):
            await _discard(response, reactor)
            raise PolicyError(f"{url} is {kind.decode('latin-1')!r}, not text/plain")
        length = response.length
        if isinstance(length, int) and length > maxSize:
            await _discard(response, reactor)
            raise PolicyError(f"{url} is {length} octets (limit {maxSize})")
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > maxSize:
                raise PolicyError(f"{url} is longer than {maxSize} octets")
            chunks.append(data)

        try:
            body = treq.collect(response, collect)
            body.addTimeout(timeout, reactor)
            await body
        except PolicyError:
            raise
        except Exception as e:
            raise PolicyError(f"reading {url} failed: {_describe(e)}") from None
        try:
            return b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{url} is not UTF-8") from None

    def start(domain: str) -> Deferred[str]:
        d = Deferred.fromCoroutine(fetch(domain))
        d.addTimeout(timeout, reactor)

        def timedOut(failure: Any) -> Any:
            from twisted.internet.defer import TimeoutError as DeferredTimeout

            if failure.check(DeferredTimeout):
                raise PolicyError(f"fetching the policy of {domain} took more than {timeout:g} s")
            return failure

        return d.addErrback(timedOut)

    return start


async def _discard(response: Any, clock: Any) -> None:
    """
    Read and drop a refused response's body (bounded by time and by the
    server closing), so the connection is not left half read.
    """
    import treq

    try:
        body = treq.collect(response, lambda data: None)
        body.addTimeout(5, clock)
        await body
    except Exception:
        pass


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if hasattr(error, "reasons"):
        text = "; ".join(str(getattr(r, "value", r)) for r in error.reasons) or text
    return f"{type(error).__name__}: {text}"[:300]


class TXTLookup(Protocol):
    def __call__(self, name: str) -> Deferred[list[str]]:
        """
        The TXT records at C{name}, each one's strings joined; fails with
        L{dnserror.DNSNameError} for NXDOMAIN, anything else for trouble.
        """


def txtLookup(resolver: Any) -> TXTLookup:
    """
    TXT lookups through a twisted.names resolver.
    """

    def lookup(name: str) -> Deferred[list[str]]:
        def texts(result: Any) -> list[str]:
            answers = result[0]
            out = []
            for rr in answers:
                if rr.type == 16:
                    out.append(b"".join(rr.payload.data).decode("utf-8", "replace"))
            return out

        d: Deferred[list[str]] = resolver.lookupText(name).addCallback(texts)
        return d

    return lookup


class STSPolicies:
    """
    MTA-STS policies by domain: looked up, fetched, cached in memory and
    on disk.

    @ivar cacheDir: one JSON file per domain, or C{None} for memory only.
    @ivar maxDomains: policies kept in memory at most (the oldest are
        dropped; the disk copy stays).
    """

    log = Logger()
    maxDomains = 10_000

    def __init__(
        self,
        clock: IReactorTime,
        lookupTXT: TXTLookup,
        fetch: HTTPSFetcher,
        runInThread: ThreadRunner,
        cacheDir: Path | None,
    ) -> None:
        self.clock = clock
        self.lookupTXT = lookupTXT
        self.fetch = fetch
        self.runInThread = runInThread
        self.cacheDir = cacheDir
        self._memory: dict[str, STSPolicy] = {}
        self._fetching: dict[str, list[Deferred[STSPolicy | None]]] = {}

    def policyFor(self, domain: str) -> Deferred[STSPolicy | None]:
        """
        The policy that applies to C{domain} now (C{None}: none, or a
        policy whose mode is C{none}).  Never fails.
        """
        return Deferred.fromCoroutine(self._policyFor(domain.lower().rstrip(".")))

    async def _policyFor(self, domain: str) -> STSPolicy | None:
        now = self.clock.seconds()
        cached = self._memory.get(domain)
        if cached is None:
            cached = await self._readCache(domain)
        if cached is not None and cached.expired(now):
            cached = None
        try:
            ident = parseSTSRecord(await self.lookupTXT(f"_mta-sts.{domain}"))
        except dnserror.DNSNameError:
            ident = None
        except PolicyError as e:
            self.log.info("MTA-STS TXT record of {nexthop} is unusable: {why}", nexthop=domain, why=str(e))
            ident = None
        except Exception as e:
            self.log.info("MTA-STS TXT lookup for {nexthop} failed: {why}", nexthop=domain, why=_describe(e))
            return _applies(cached)
        if ident is None:
            # RFC 8461 5.1: a cached, unexpired policy still applies.
            return _applies(cached)
        if cached is not None and cached.id == ident:
            return _applies(cached)
        if cached is not None:
            self._refresh(domain, ident)
            return _applies(cached)
        return _applies(await self._refresh(domain, ident))

    def _refresh(self, domain: str, ident: str) -> Deferred[STSPolicy | None]:
        """
        Fetch the policy, once at a time per domain; the result is cached.
        """
        out: Deferred[STSPolicy | None] = Deferred()
        waiters = self._fetching.get(domain)
        if waiters is not None:
            waiters.append(out)
            return out
        self._fetching[domain] = [out]

        def done(result: STSPolicy | Failure | None) -> None:
            if isinstance(result, Failure):
                self.log.failure("Bug fetching the MTA-STS policy of {nexthop}", result, nexthop=domain)
                result = None
            for waiter in self._fetching.pop(domain, []):
                waiter.callback(result)

        Deferred.fromCoroutine(self._fetch(domain, ident)).addBoth(done)
        return out

    async def _fetch(self, domain: str, ident: str) -> STSPolicy | None:
        try:
            text = await self.fetch(domain)
            policy = parsePolicy(text, ident, self.clock.seconds())
        except PolicyError as e:
            self.log.warn("MTA-STS policy of {nexthop} unusable: {why}", nexthop=domain, why=str(e))
            return None
        except Exception as e:
            self.log.warn("MTA-STS policy of {nexthop} unusable: {why}", nexthop=domain, why=_describe(e))
            return None
        self.log.info(
            "MTA-STS policy of {nexthop}: mode {mode}, mx {mx}, max_age {maxAge}",
            nexthop=domain,
            mode=policy.mode,
            mx=" ".join(policy.mx),
            maxAge=policy.maxAge,
        )
        self._remember(domain, policy)
        await self._writeCache(domain, policy)
        return policy

    def _remember(self, domain: str, policy: STSPolicy) -> None:
        self._memory.pop(domain, None)
        self._memory[domain] = policy
        while len(self._memory) > self.maxDomains:
            self._memory.pop(next(iter(self._memory)))

    def _path(self, domain: str) -> Path | None:
        if self.cacheDir is None or not re.match(r"^[a-z0-9.-]{1,253}$", domain):
            return None
        return self.cacheDir / f"{domain}.json"

    async def _readCache(self, domain: str) -> STSPolicy | None:
        path = self._path(domain)
        if path is None:
            return None

        def read() -> STSPolicy | None:
            try:
                data: Mapping[str, Any] = json.loads(path.read_text("utf-8"))
                return STSPolicy(
                    data["mode"], tuple(data["mx"]), int(data["maxAge"]), data["id"], float(data["fetched"])
                )
            except (OSError, ValueError, KeyError, TypeError):
                return None

        policy = await self.runInThread(read)
        if policy is not None:
            self._remember(domain, policy)
        return policy

    async def _writeCache(self, domain: str, policy: STSPolicy) -> None:
        path = self._path(domain)
        if path is None:
            return
        data = json.dumps(
            {
                "mode": policy.mode,
                "mx": list(policy.mx),
                "maxAge": policy.maxAge,
                "id": policy.id,
                "fetched": policy.fetched,
            }
        )

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(data, "utf-8")
            temporary.replace(path)

        try:
            await self.runInThread(write)
        except OSError as e:
            self.log.warn("Cannot cache the MTA-STS policy of {nexthop}: {why}", nexthop=domain, why=str(e))


def _applies(policy: STSPolicy | None) -> STSPolicy | None:
    if policy is None or policy.mode == "none":
        return None
    return policy


_stores: dict[str | None, Any] = {}


def loadTrustStore(caFile: str | None = None) -> Any:
    """
    The CA certificates that MTA-STS C{testing} mode checks certificates
    against (only to log what C{enforce} would refuse): C{caFile}, else
    the system's bundle; read once per process.  C{None} when none can
    be read.  Blocking: for start-up.
    """
    if caFile not in _stores:
        _stores[caFile] = _readStore(caFile)
    return _stores[caFile]


def _readStore(caFile: str | None) -> Any:
    import ssl
    import warnings

    from cryptography import x509
    from cryptography.x509.verification import Store

    paths = (
        [caFile] if caFile else [ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"]
    )
    for path in paths:
        if not path:
            continue
        try:
            with open(path, "rb") as f, warnings.catch_warnings():
                # Old roots in system bundles have serial numbers that
                # newer cryptography releases warn about.
                warnings.simplefilter("ignore")
                certificates = x509.load_pem_x509_certificates(f.read())
        except (OSError, ValueError):
            continue
        if certificates:
            return Store(certificates)
    return None


def pkixProblem(chain: Sequence[Any], name: str, now: float, store: Any) -> str | None:
    """
    Why the chain (the peer's certificate first) is not valid for C{name}
    under the web PKI, or C{None} when it is.
    """
    import datetime

    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, VerificationError

    if not chain:
        return "the server presented no certificate"
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    try:
        verifier = PolicyBuilder().store(store).time(when).build_server_verifier(x509.DNSName(name))
        verifier.verify(chain[0], list(chain[1:]))
    except (VerificationError, ValueError) as e:
        return f"certificate not valid for {name}: {e}"[:300]
    return None
