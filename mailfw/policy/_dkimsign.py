"""
DKIM signing (plugin C{dkim-sign}): mail that a relay client sends (an
authenticated submission user, or a client from a network allowed to
relay) is signed for the domain of its C{From:} address when a key is
configured for that domain (or a parent domain), before it is queued: the
signature is an L{AddHeader} edit, so the queued copy is the signed one.

(C{relay_networks} names those networks: the router's are not the
session's to know.)

Each domain may have an RSA key (rsa-sha256, 2048 bits recommended) and an
Ed25519 key (ed25519-sha256, RFC 8463); with both, the message gets both
signatures, so receivers that do not know Ed25519 still see a signature
they can check.  Signatures use C{relaxed/relaxed} canonicalization, sign
the usual header fields that are present, and oversign C{From}, C{To} and
C{Subject} (list them once more than present), so that no such field can
be added later without breaking the signature.

The body hash is computed as the body streams
(L{mailfw.policy._dkimstream}); the header signature is computed in a
thread by L{signHeader}: dkimpy's steps and helpers, OpenSSL's signature
(dkimpy's own C{DKIM.sign} would hash the body it holds, and it holds
none).

Keys: an RSA key in PEM (PKCS#1 C{BEGIN RSA PRIVATE KEY}, as C{mailfw dkim
keygen} and dkimpy's C{dknewkey} write, or PKCS#8 C{BEGIN PRIVATE KEY} as
C{openssl genpkey} writes), or an Ed25519 key as dkimpy keeps it (the
base64 32-octet seed) or in PKCS#8 PEM.  They are read and checked at
start-up.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import Policy
from mailfw.policy._dkimstream import BodyHashes
from mailfw.queue._produce import ThreadRunner
from mailfw.verdict import AddHeader, AuthResult, Verdict

__all__ = [
    "OVERSIGNED",
    "SIGNED_FIELDS",
    "DKIMSigner",
    "SigningKey",
    "fromConfig",
    "generateKey",
    "keyRecord",
    "loadKey",
    "signedFields",
]

RSA = b"rsa-sha256"
ED25519 = b"ed25519-sha256"

#: Header fields signed when present (RFC 6376 5.4.1's list, trimmed).
SIGNED_FIELDS = (
    b"from",
    b"reply-to",
    b"subject",
    b"date",
    b"to",
    b"cc",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"content-id",
    b"content-description",
    b"sender",
    b"resent-date",
    b"resent-from",
    b"resent-sender",
    b"resent-to",
    b"resent-cc",
    b"resent-message-id",
    b"list-id",
    b"list-help",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"list-subscribe",
    b"list-post",
    b"list-owner",
    b"list-archive",
)

#: Fields signed once more than present, so none can be added later.
OVERSIGNED = (b"from", b"to", b"subject")


@dataclass(frozen=True)
class SigningKey:
    """
    One configured key.

    @ivar algorithm: C{b"rsa-sha256"} or C{b"ed25519-sha256"}.
    @ivar private: the key as dkimpy takes it: PKCS#1 PEM for RSA, the
        base64 seed for Ed25519.
    @ivar public: the public key as the C{p=} tag of the DNS record has it
        (base64).
    @ivar signer: the private key as a C{cryptography} key, which signs.
    """

    domain: str
    selector: str
    algorithm: bytes
    private: bytes
    public: str
    signer: Any = field(default=None, compare=False, repr=False)

    @property
    def record(self) -> str:
        """
        The TXT record to publish at C{selector._domainkey.domain}.
        """
        return keyRecord(self.algorithm, self.public)


def keyRecord(algorithm: bytes, public: str) -> str:
    """
    The DKIM key record (RFC 6376 3.6.1) for a public key.
    """
    kind = "ed25519" if algorithm == ED25519 else "rsa"
    return f"v=DKIM1; k={kind}; p={public}"


def loadKey(data: bytes, domain: str, selector: str) -> SigningKey:
    """
    Read a private key file's contents (see the module's docstring for the
    forms accepted).

    @raise ValueError: naming what is wrong.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    text = data.strip()
    if not text.startswith(b"-----BEGIN"):
        try:
            seed = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("not a PEM key nor a base64 Ed25519 seed") from None
        if len(seed) != 32:
            raise ValueError("a base64 Ed25519 key must hold 32 octets")
        key: Any = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    else:
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"unreadable PEM key ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise ValueError(f"RSA key of {key.key_size} bits is too short (2048 recommended)")
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return SigningKey(domain, selector, RSA, private, base64.b64encode(public).decode("ascii"), key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return SigningKey(
            domain, selector, ED25519, base64.b64encode(seed), base64.b64encode(public).decode("ascii"), key
        )
    raise ValueError(f"unsupported key type {type(key).__name__}; use RSA or Ed25519")


def generateKey(algorithm: str, domain: str, selector: str) -> tuple[bytes, SigningKey]:
    """
    A new key: C{algorithm} is C{"rsa"} (2048 bits) or C{"ed25519"}.

    @return: the file contents to keep secret, and the loaded key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    elif algorithm == "ed25519":
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        private = base64.b64encode(seed) + b"\n"
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; use rsa or ed25519")
    return private, loadKey(private, domain, selector)


def signedFields(fieldNames: Sequence[bytes]) -> list[bytes]:
    """
    The C{h=} list for a header section with C{fieldNames} (in order): each
    present field of L{SIGNED_FIELDS} as often as present, and those of
    L{OVERSIGNED} once more.
    """
    names = [name.lower().strip() for name in fieldNames]
    signed = [name for name in names if name in SIGNED_FIELDS]
    return signed + list(OVERSIGNED)


def signHeader(
    header: bytes, key: SigningKey, include: Sequence[bytes], bodyHash: bytes, timestamp: int
) -> str:
    """
    The value of a C{DKIM-Signature:} field over C{header} (the header
    section to be queued) and the body with C{bodyHash}.  Blocking (RSA
    arithmetic): runs in a thread.

    The steps of dkimpy's C{DomainSigner.gen_header}, with its own helpers
    (C{fold}, C{RE_BTAG}, C{hash_headers}: the fields chosen, canonicalized
    and hashed exactly as dkimpy does), except the signature itself, made
    by C{cryptography} (OpenSSL): dkimpy's pure-Python RSA took 87 ms per
    signature on the test machine, OpenSSL 1 to 5 ms.
    """
    import dkim
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils
    from dkim.canonicalization import CanonicalizationPolicy

    name = b"DKIM-Signature"
    fields = [
        (b"v", b"1"),
        (b"a", key.algorithm),
        (b"c", b"relaxed/relaxed"),
        (b"d", key.domain.encode("idna")),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(timestamp).encode("ascii")),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(bodyHash)),
        # dkimpy's placeholder: b= folds onto lines of its own, so the
        # tags before it fold the same way before and after signing.
        (b"b", b"0" * 60),
    ]
    unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(name), linesep=b"\r\n")
    unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
    canonicalization = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    parsed, _ = dkim.rfc822_parse(header)
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher,
        canonicalization,
        canonicalization.canonicalize_headers(parsed),
        list(include),
        (name, b" " + unsigned),
        dict(fields),
    )
    if key.algorithm == RSA:
        signature = key.signer.sign(hasher.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    else:
        # RFC 8463: Ed25519 signs the SHA-256 hash of the header data.
        signature = key.signer.sign(hasher.digest())
    fields[-1] = (b"b", base64.b64encode(signature))
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(name), linesep=b"\r\n")
    # Folded (CRLF and a space), which header edits keep.
    return bytes(value).rstrip(b"\r\n").decode("ascii")


class DKIMSigner(Policy):
    """
    Signs the mail of relay clients for the configured domains.

    @ivar keys: per domain (lowercase), its keys (at most one per
        algorithm).
    @ivar relayNetworks: client networks whose mail is signed without
        AUTH (the networks the router lets relay).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        keys: Mapping[str, Sequence[SigningKey]],
        clock: IReactorTime,
        runInThread: ThreadRunner,
        relayNetworks: Sequence[IPNetwork] = (),
    ) -> None:
        self.name = name
        self.keys = {domain.lower(): tuple(ks) for domain, ks in keys.items()}
        self.clock = clock
        self.runInThread = runInThread
        self.relayNetworks = tuple(relayNetworks)

    def signsFor(self, session: Session) -> bool:
        """
        Whether mail of C{session} is ours to sign: an authenticated user's,
        a relay client's, or from one of L{relayNetworks}.
        """
        if session.authenticated or session.relayClient:
            return True
        try:
            address = ipaddress.ip_address(session.peerHost)
        except ValueError:
            return False
        return any(address in network for network in self.relayNetworks)

    def keysFor(self, domain: str) -> tuple[SigningKey, ...]:
        """
        The keys of C{domain} or of its nearest parent domain that has some.
        """
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            keys = self.keys.get(".".join(labels[start:]))
            if keys:
                return keys
        return ()

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        if not self.signsFor(session):
            return None
        import dkim

        try:
            fields, _ = dkim.rfc822_parse(header)
        except dkim.MessageFormatError:
            return None
        domain = _fromDomain(fields)
        keys = self.keysFor(domain) if domain else ()
        if not keys:
            self.log.debug(
                "not signing {queueID}: no DKIM key for From domain {domain!r}",
                queueID=envelope.queueID,
                domain=domain,
            )
            return None
        include = signedFields([name for name, _ in fields])
        return _Signing(self, header, keys, include)


def _fromDomain(fields: Sequence[Sequence[bytes]]) -> str | None:
    for name, value in fields:
        if name.strip().lower() == b"from":
            addresses = email.utils.getaddresses([value.decode("utf-8", "replace")])
            for _, address in addresses:
                if "@" in address:
                    return address.rpartition("@")[2].strip().lower().rstrip(".") or None
            return None
    return None


@implementer(IMessageCheck)
class _Signing:
    """
    The signing of one message: its body hashed as it streams.
    """

    def __init__(
        self, policy: DKIMSigner, header: bytes, keys: Sequence[SigningKey], include: Sequence[bytes]
    ) -> None:
        self._policy = policy
        self._header = header
        self._keys = keys
        self._include = include
        self._hashes = BodyHashes()
        self._bodyKey = self._hashes.add(True, "sha256")

    def write(self, data: bytes) -> None:
        self._hashes.write(data)

    def end(self, results: tuple[AuthResult, ...]) -> Deferred[Verdict]:
        self._hashes.end()
        bodyHash = self._hashes.digest(self._bodyKey)
        header, keys, include = self._header, self._keys, self._include
        timestamp = int(self._policy.clock.seconds())

        def sign() -> list[str]:
            return [signHeader(header, key, include, bodyHash, timestamp) for key in keys]

        def signed(values: list[str]) -> Verdict:
            return Verdict(edits=tuple(AddHeader("DKIM-Signature", value, index=0) for value in values))

        return self._policy.runInThread(sign).addCallback(signed)

    def abort(self) -> None:
        pass


@dataclass(frozen=True)
class _KeyEntry:
    where: str
    domain: str
    selector: str
    path: Path


def _keyEntries(section: Section, context: ComponentContext) -> list[_KeyEntry]:
    """
    The keys C{domains} configures, checked for unknown options before any
    key file is read.
    """
    domains = section.table("domains")
    if not domains:
        raise ConfigError(f"{section.title} domains: configure at least one domain's key")
    found: list[_KeyEntry] = []
    for domain, options in domains.items():
        title = f"{section.title} domains.{domain}"
        if not isinstance(options, dict):
            raise ConfigError(f"{title}: expected a table with selector and key")
        entries = options.get("keys")
        if entries is None:
            entries = [options]
        elif set(options) != {"keys"} or not isinstance(entries, list):
            raise ConfigError(f"{title}: give either selector and key, or keys = [...]")
        for number, entry in enumerate(entries):
            where = title if len(entries) == 1 else f"{title} keys[{number}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected a table with selector and key")
            one = Section(where, entry)
            selector = one.text("selector")
            path = context.path(one.text("key"))
            one.finish()
            found.append(_KeyEntry(where, domain.lower(), selector, path))
    return found


def _loadKeys(entries: Sequence[_KeyEntry], title: str) -> dict[str, list[SigningKey]]:
    keys: dict[str, list[SigningKey]] = {}
    for entry in entries:
        try:
            data = entry.path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{entry.where} key: cannot read {entry.path}: {e.strerror}") from None
        try:
            key = loadKey(data, entry.domain, entry.selector)
        except ValueError as e:
            raise ConfigError(f"{entry.where} key: {entry.path}: {e}") from None
        loaded = keys.setdefault(entry.domain, [])
        if any(k.algorithm == key.algorithm for k in loaded):
            raise ConfigError(
                f"{title} domains.{entry.domain}: two {key.algorithm.decode()} keys; give at most one of each"
            )
        _warnIfReadable(entry.path)
        loaded.append(key)
    return keys


def _warnIfReadable(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        DKIMSigner.log.warn(
            "DKIM key {path} can be read by other users (mode {mode:o}); chmod 600 it",
            path=str(path),
            mode=mode & 0o777,
        )


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> DKIMSigner:
    """
    Build the C{dkim-sign} policy from C{[policy.NAME]}: C{domains}, a
    table of domain to C{{selector, key}} or C{{keys = [{selector, key},
    ...]}} (key paths relative to the data directory), and
    C{relay_networks}.
    """
    from mailfw.delivery import ThreadPoolRunner
    from mailfw.policy._dkim import _requireDkimpy

    section = Section(f"[policy.{instanceName}]", options)
    _requireDkimpy(section.title)
    networks: list[IPNetwork] = []
    for text in section.strings("relay_networks", []):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{section.title} relay_networks: bad network {text!r}") from None
    entries = _keyEntries(section, context)
    section.finish()
    return DKIMSigner(
        instanceName,
        _loadKeys(entries, section.title),
        context.reactor,
        ThreadPoolRunner(context.reactor, f"mailfw-dkim-sign-{instanceName}", maxThreads=2),
        networks,
    )
