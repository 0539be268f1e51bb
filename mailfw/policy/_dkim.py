"""
DKIM verification (plugin C{dkim}): every C{DKIM-Signature:} of a
message checked (RFC 6376, with rsa-sha256 and ed25519-sha256 keys as in
RFC 8463), one L{AuthResult} per signature for the session's
C{Authentication-Results:} field (and for DMARC after it in the chain).

Where the work happens, so that nothing blocks the reactor and nothing
holds a whole message:

 - at the end of the header section the signatures are parsed and their
   key records asked for with L{twisted.names} (through the configured
   C{[dns]} name servers), while the body still arrives;
 - the body hash of each signature is computed as the body streams
   (L{mailfw.policy._dkimstream});
 - at the end of data the body hashes are compared on the reactor thread,
   and the header signatures are checked by dkimpy in a thread.

The seam into dkimpy: L{dkim.DKIM} is given the header section only;
C{DKIM.verify_headerprep} parses the signature as dkimpy always does, the
key comes from L{dkim.evaluate_pk} over the TXT record fetched here, and
C{DomainSigner.verify_sig_process} checks the header hash and signature
with the signature's tags minus C{bh=} (so dkimpy does not hash the empty
body it was given; the body hash was checked here).  No global of dkimpy
is touched.

Results: C{pass}; C{fail} (the body hash or the signature does not
match); C{permerror} (a malformed signature or key record, no key, a key
that does not fit the signature); C{temperror} (the key lookup timed out
or the DNS server failed); C{none} when the message has no signature.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import Policy
from mailfw.policy._dkimstream import HASHES, BodyHashes, BodyHashKey
from mailfw.queue._produce import ThreadRunner
from mailfw.verdict import AuthResult, Verdict

__all__ = ["DKIMVerifier", "fromConfig", "parseSignatures"]

DEFAULT_DNS_TIMEOUT = 10.0
DEFAULT_MAX_SIGNATURES = 5
DEFAULT_MIN_KEY_BITS = 1024


@dataclass
class Signature:
    """
    One C{DKIM-Signature:} field of a message, as far as it parsed.

    @ivar index: its position among the message's signature fields (0 is
        the topmost), as dkimpy counts them.
    @ivar tags: its tags, or C{None} if they do not parse.
    @ivar problem: why the signature is a C{permerror} before any lookup,
        or C{None}.
    @ivar bodyKey: the body hash it needs, once it is known to be usable.
    """

    index: int
    tags: dict[bytes, bytes] | None
    problem: str | None = None
    bodyKey: BodyHashKey | None = None

    def tag(self, name: bytes) -> str | None:
        if self.tags is None or name not in self.tags:
            return None
        return re.sub(rb"\s+", b"", self.tags[name]).decode("utf-8", "replace")

    @property
    def keyName(self) -> str:
        return f"{self.tag(b's')}._domainkey.{self.tag(b'd')}"

    def result(self, result: str, reason: str | None = None) -> AuthResult:
        """
        This signature's L{AuthResult}, with the properties DMARC reads.
        """
        properties: list[tuple[str, str]] = []
        domain = self.tag(b"d")
        if domain is not None:
            properties.append(("header.d", domain.lower()))
            properties.append(("header.i", self.tag(b"i") or f"@{domain}"))
        for prop, tag in (("header.s", b"s"), ("header.a", b"a")):
            value = self.tag(tag)
            if value is not None:
                properties.append((prop, value))
        b = self.tag(b"b")
        if b:
            properties.append(("header.b", b[:8]))
        return AuthResult("dkim", result, reason, tuple(properties))


def parseSignatures(header: bytes, now: float) -> list[Signature]:
    """
    Find and check the C{DKIM-Signature:} fields of C{header} (a header
    section) the way dkimpy does, without DNS.

    @param now: the time, for C{t=} and C{x=}.
    @raise dkim.MessageFormatError: if the header section does not parse.
    """
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    fields, _ = dkim.rfc822_parse(header)
    signatures: list[Signature] = []
    for name, value in fields:
        if name.lower() != b"dkim-signature":
            continue
        signature = Signature(len(signatures), None)
        signatures.append(signature)
        try:
            signature.tags = parse_tag_value(value)
        except InvalidTagValueList as e:
            signature.problem = f"malformed signature: {e!r}"
            continue
        signature.problem = _checkTags(signature.tags, now)
    return signatures


def _checkTags(tags: dict[bytes, bytes], now: float) -> str | None:
    """
    Why the signature with C{tags} cannot pass, or C{None}.
    """
    import dkim

    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as e:
        return f"malformed signature: {e}"
    except (IndexError, KeyError, TypeError, ValueError) as e:
        # dkimpy's checks index into tags they have not checked (i= and d=).
        return f"malformed signature: {type(e).__name__}"
    algorithm = tags[b"a"]
    if algorithm not in HASHES:
        return f"unknown algorithm {algorithm.decode('ascii', 'replace')}"
    if algorithm == b"rsa-sha1":
        return "rsa-sha1 is not accepted (RFC 8301)"
    canonicalization = tags.get(b"c", b"simple/simple").split(b"/")
    if len(canonicalization) > 2 or any(c not in (b"simple", b"relaxed") for c in canonicalization):
        return f"unknown canonicalization {tags.get(b'c', b'').decode('ascii', 'replace')}"
    if b"x" in tags and int(tags[b"x"]) < now:
        return "signature expired"
    for tag in (b"d", b"s"):
        # Only names that can be looked up (IDNs in their A-label form).
        value = tags[tag]
        if len(value) > 253 or not _DNS_NAME.match(value):
            return f"malformed {tag.decode()}="
    try:
        base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]), validate=True)
    except (binascii.Error, ValueError):
        return "malformed bh="
    return None


_DNS_NAME = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\Z")


def _bodyHashKey(hashes: BodyHashes, tags: dict[bytes, bytes]) -> BodyHashKey:
    canonicalization = tags.get(b"c", b"simple/simple").split(b"/")
    relaxed = len(canonicalization) == 2 and canonicalization[1] == b"relaxed"
    limit = int(tags[b"l"]) if b"l" in tags else None
    return hashes.add(relaxed, HASHES[tags[b"a"]], limit)


# --- the DNS side ---------------------------------------------------------------


@dataclass(frozen=True)
class KeyAnswer:
    """
    What DNS said about one key name: the record, or the result it makes.
    """

    record: bytes | None
    result: str | None = None
    reason: str | None = None


def fetchKey(resolver: Any, name: str, clock: IReactorTime, timeout: float) -> Deferred[KeyAnswer]:
    """
    Look up the key record at C{name}; never fails.
    """

    def found(answer: tuple[list[dns.RRHeader], Any, Any]) -> KeyAnswer:
        records = [
            b"".join(rr.payload.data)  # type: ignore[attr-defined]
            for rr in answer[0]
            if rr.type == dns.TXT and rr.payload is not None
        ]
        if not records:
            return KeyAnswer(None, "permerror", "no key for signature")
        if len(records) > 1:
            return KeyAnswer(None, "permerror", "more than one key record")
        return KeyAnswer(records[0])

    def failed(f: Failure) -> KeyAnswer:
        if f.check(CancelledError):
            # The message was aborted; nobody reads this.
            return KeyAnswer(None, "temperror", "key lookup cancelled")
        if f.check(error.DNSNameError):
            return KeyAnswer(None, "permerror", "no key for signature")
        if f.check(TimeoutError, error.DNSQueryTimeoutError):
            return KeyAnswer(None, "temperror", "key lookup timed out")
        if f.check(error.DNSServerError):
            return KeyAnswer(None, "temperror", "key lookup failed (SERVFAIL)")
        if f.check(error.DomainError, error.DNSQueryRefusedError, error.DNSFormatError):
            return KeyAnswer(None, "temperror", f"key lookup failed ({f.getErrorMessage()})")
        DKIMVerifier.log.failure("DKIM key lookup for {name} failed", f, name=name)
        return KeyAnswer(None, "temperror", "key lookup failed")

    try:
        d = resolver.lookupText(name)
    except Exception:
        return succeed(failed(Failure()))
    d.addTimeout(timeout, clock)
    answered: Deferred[KeyAnswer] = d.addCallbacks(found, failed)
    return answered


# --- the thread side -------------------------------------------------------------


def verifyHeaders(
    header: bytes, keys: Sequence[tuple[int, bytes]], minKeyBits: int
) -> list[tuple[str, str | None]]:
    """
    Check the header signature of each C{(index, key record)} with dkimpy;
    blocking (RSA and ed25519 arithmetic), so it runs in a thread.

    @return: C{(result, reason)} per signature, in order.
    """
    return [_verifyOne(header, index, record, minKeyBits) for index, record in keys]


def _noDNS(name: bytes, timeout: float = 0) -> bytes:
    raise AssertionError("dkimpy must not query DNS here; the key was fetched already")


def _verifyOne(header: bytes, index: int, record: bytes, minKeyBits: int) -> tuple[str, str | None]:
    import dkim
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        keyTags = parse_tag_value(record)
    except InvalidTagValueList:
        return "permerror", "malformed key record"
    if keyTags.get(b"p", b"x").strip() == b"":
        return "permerror", "key revoked"
    try:
        verifier = dkim.DKIM(header, minkey=minKeyBits)
        prepared = verifier.verify_headerprep(index)
        if not prepared:
            return "permerror", "signature not found"
        tags, include, fields = prepared
        name = tags[b"s"] + b"._domainkey." + tags[b"d"]
        pk, keysize, ktag, tlsrpt = dkim.evaluate_pk(name, record)
        if pk is None:
            return "permerror", "key is not for email (s=)"
        if tags[b"a"].split(b"-")[0] != ktag:
            return "permerror", "key type does not match a="
        verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = pk, keysize, ktag, tlsrpt
        withoutBodyHash = {tag: value for tag, value in tags.items() if tag != b"bh"}
        good = verifier.verify_sig_process(withoutBodyHash, include, fields[index], _noDNS)
    except dkim.KeyFormatError as e:
        return "permerror", f"bad key: {e}"
    except dkim.DKIMException as e:
        return "permerror", str(e) or type(e).__name__
    except (ValueError, TypeError, IndexError, KeyError, binascii.Error) as e:
        # dkimpy's parsers let some malformed input through as these.
        return "permerror", f"malformed signature or key: {type(e).__name__}"
    if good:
        return "pass", None
    return "fail", "signature did not verify"


# --- the policy ------------------------------------------------------------------------


class DKIMVerifier(Policy):
    """
    Verifies every DKIM signature of each message at the end of data.

    @ivar maxSignatures: signatures checked per message; the others are
        reported C{neutral} without a lookup (a message with a hundred
        signatures must not cost a hundred lookups).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        resolver: Any,
        clock: IReactorTime,
        runInThread: ThreadRunner,
        dnsTimeout: float = DEFAULT_DNS_TIMEOUT,
        maxSignatures: int = DEFAULT_MAX_SIGNATURES,
        minKeyBits: int = DEFAULT_MIN_KEY_BITS,
    ) -> None:
        self.name = name
        self.resolver = resolver
        self.clock = clock
        self.runInThread = runInThread
        self.dnsTimeout = dnsTimeout
        self.maxSignatures = maxSignatures
        self.minKeyBits = minKeyBits

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> _Verification:
        return _Verification(self, header)


@implementer(IMessageCheck)
class _Verification:
    """
    The verification of one message: key lookups started at once, body
    hashes fed as the body streams.
    """

    def __init__(self, policy: DKIMVerifier, header: bytes) -> None:
        self._policy = policy
        self._header = header
        self._hashes = BodyHashes()
        self._lookups: dict[str, Deferred[KeyAnswer]] = {}
        self._problem: str | None = None
        try:
            self._signatures = parseSignatures(header, policy.clock.seconds())
        except Exception as e:
            # dkimpy refuses header sections it cannot split into fields.
            self._signatures = []
            self._problem = f"header section does not parse: {e}"
        for signature in self._signatures[: policy.maxSignatures]:
            if signature.problem is None and signature.tags is not None:
                signature.bodyKey = _bodyHashKey(self._hashes, signature.tags)
                name = signature.keyName
                if name not in self._lookups:
                    self._lookups[name] = fetchKey(policy.resolver, name, policy.clock, policy.dnsTimeout)

    def write(self, data: bytes) -> None:
        self._hashes.write(data)

    def end(self, results: tuple[AuthResult, ...]) -> Deferred[Verdict]:
        self._hashes.end()
        return Deferred.fromCoroutine(self._verify())

    def abort(self) -> None:
        for lookup in self._lookups.values():
            lookup.cancel()

    async def _verify(self) -> Verdict:
        if self._problem is not None:
            return Verdict(results=(AuthResult("dkim", "permerror", self._problem),))
        if not self._signatures:
            return Verdict(results=(AuthResult("dkim", "none"),))
        names = list(self._lookups)
        answers = dict(zip(names, await gatherResults([self._lookups[n] for n in names]), strict=True))
        outcomes: dict[int, tuple[str, str | None]] = {}
        toVerify: list[tuple[int, bytes]] = []
        for position, signature in enumerate(self._signatures):
            if position >= self._policy.maxSignatures:
                outcomes[position] = ("neutral", "not checked: too many signatures")
            elif signature.problem is not None or signature.tags is None:
                outcomes[position] = ("permerror", signature.problem)
            else:
                outcome = self._checkBody(signature, answers[signature.keyName])
                if outcome is not None:
                    outcomes[position] = outcome
                else:
                    record = answers[signature.keyName].record
                    assert record is not None
                    toVerify.append((signature.index, record))
        if toVerify:
            header, minKeyBits = self._header, self._policy.minKeyBits
            verified = await self._policy.runInThread(lambda: verifyHeaders(header, toVerify, minKeyBits))
            byIndex = {index: outcome for (index, _), outcome in zip(toVerify, verified, strict=True)}
            for position, signature in enumerate(self._signatures):
                if signature.index in byIndex and position not in outcomes:
                    outcomes[position] = byIndex[signature.index]
        return Verdict(
            results=tuple(
                signature.result(*outcomes[position]) for position, signature in enumerate(self._signatures)
            )
        )

    def _checkBody(self, signature: Signature, answer: KeyAnswer) -> tuple[str, str | None] | None:
        """
        The result the body hash or the key lookup decides, or C{None} to
        check the header signature.
        """
        if answer.record is None:
            return answer.result or "temperror", answer.reason
        assert signature.tags is not None and signature.bodyKey is not None
        expected = base64.b64decode(re.sub(rb"\s+", b"", signature.tags[b"bh"]))
        if self._hashes.digest(signature.bodyKey) != expected:
            return "fail", "body hash mismatch"
        return None


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> DKIMVerifier:
    """
    Build the C{dkim} policy from C{[policy.NAME]}: C{dns_timeout}
    (seconds per key lookup), C{max_signatures}, C{min_key_bits}.
    """
    from mailfw.delivery import ThreadPoolRunner

    section = Section(f"[policy.{instanceName}]", options)
    dnsTimeout = section.number("dns_timeout", DEFAULT_DNS_TIMEOUT, minimum=0.1)
    maxSignatures = section.integer("max_signatures", DEFAULT_MAX_SIGNATURES, minimum=1)
    minKeyBits = section.integer("min_key_bits", DEFAULT_MIN_KEY_BITS, minimum=512)
    section.finish()
    _requireDkimpy(f"[policy.{instanceName}]")
    return DKIMVerifier(
        instanceName,
        context.resolver(),
        context.reactor,
        ThreadPoolRunner(context.reactor, f"mailfw-dkim-{instanceName}", maxThreads=2),
        dnsTimeout=dnsTimeout,
        maxSignatures=maxSignatures,
        minKeyBits=minKeyBits,
    )


def _requireDkimpy(title: str) -> None:
    """
    Refuse at start-up when dkimpy (or PyNaCl, for ed25519) is missing.
    """
    try:
        import dkim  # noqa: F401
        import nacl.signing  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{title} needs dkimpy and pynacl (mailfw's dependencies): {e}") from None
