"""
The server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC
7677), without I/O: the SMTP session feeds it the client's decoded
messages and sends back what it returns.

The exchange::

    client-first  ->  clientFirst() names the user to look up
    server-first  <-  serverFirst(keys) with that user's salt and count
    client-final  ->  clientFinal() checks binding, nonce and proof
    server-final  <-  its return value, "v=" and the server's signature

Channel binding (the C{-PLUS} variant) ties the exchange to the TLS
connection it runs on, so that a man in the middle who terminates TLS
cannot relay it: C{tls-exporter} (RFC 9266) on TLS 1.3, C{tls-unique}
(RFC 5929) on TLS 1.2; L{channelBindingFor} reads them from a Twisted TLS
transport.  The session must offer C{-PLUS} exactly when that function
gives a binding: a client that could bind but was not offered it says
C{y}, and the exchange refuses a C{y} whenever it has a binding (RFC 5802
section 6), which is what stops an attacker from stripping C{-PLUS} from
the EHLO reply.

Every failure raises L{ScramError}: a C{535 5.7.8} for the session, and
an RFC 5802 C{server-error-value} for clients that want one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.cred.credentials import ICredentials
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "DEFAULT_ITERATIONS",
    "MECHANISMS",
    "ChannelBinding",
    "IScramCredentials",
    "IScramKeySource",
    "ScramCredentials",
    "ScramError",
    "ScramExchange",
    "ScramKeys",
    "channelBindingFor",
    "saslPrep",
]

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
MECHANISMS = (SCRAM_PLUS, SCRAM)
"""The mechanism names, strongest first."""

DEFAULT_ITERATIONS = 4096
"""RFC 7677's minimum, and Dovecot's and PostgreSQL's default: the client
pays it on every login, the server only when the password is set."""
MIN_ITERATIONS = 4096
MAX_ITERATIONS = 10_000_000
SALT_OCTETS = 16
KEY_OCTETS = 32  # SHA-256

# Limits on what the client controls.
MAX_MESSAGE = 2048
MAX_NONCE = 256
MAX_USERNAME = 255  # octets, as for the password file

_PREFIX = "$scram-sha-256$"
_STORED = re.compile(
    r"\$scram-sha-256\$i=([0-9]{1,9})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\Z"
)
_CB_NAME = re.compile(r"[A-Za-z0-9.-]{1,64}\Z")
# printable = %x21-2B / %x2D-7E: anything visible but a comma.
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+\Z")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_EXTENSION = re.compile(r"[A-Za-z]=")
_EXPORTER_LABEL = b"EXPORTER-Channel-Binding"

# RFC 5802 section 7, server-error-value.
INVALID_ENCODING = "invalid-encoding"
EXTENSIONS_NOT_SUPPORTED = "extensions-not-supported"
INVALID_PROOF = "invalid-proof"
CHANNEL_BINDINGS_DONT_MATCH = "channel-bindings-dont-match"
SERVER_DOES_SUPPORT_CHANNEL_BINDING = "server-does-support-channel-binding"
CHANNEL_BINDING_NOT_SUPPORTED = "channel-binding-not-supported"
UNSUPPORTED_CHANNEL_BINDING_TYPE = "unsupported-channel-binding-type"
INVALID_USERNAME_ENCODING = "invalid-username-encoding"
OTHER_ERROR = "other-error"


class ScramError(Exception):
    """
    The exchange failed; the session answers C{535 5.7.8} and counts a
    failed attempt.

    @ivar value: the RFC 5802 C{server-error-value}.
    @ivar reason: what went wrong, for the log (never for the client: it
        could tell which users exist).
    """

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"{value}: {reason}")
        self.value = value
        self.reason = reason

    def serverFinal(self) -> bytes:
        """
        The C{server-final-message} that reports this error (C{e=...}).
        """
        return b"e=" + self.value.encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    # The password file leaves padding out, as its scrypt hashes do.
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def saslPrep(text: str, allowUnassigned: bool = False) -> str:
    """
    Prepare C{text} with SASLprep (RFC 4013): map, normalise with NFKC,
    refuse prohibited characters and malformed bidirectional text.

    C{stringprep} and C{unicodedata.ucd_3_2_0} are the standard library's
    Unicode 3.2 tables that RFC 3454 is defined against; the packages that
    offer SASLprep (scramp, pymongo) build on the same two modules.

    @param allowUnassigned: C{True} for a query (a user name the client
        sends), C{False} for a stored string (a password being hashed).
    @raise ValueError: if C{text} cannot be prepared.
    """
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for c in prepared:
        if any(table(c) for table in prohibited):
            raise ValueError(f"prohibited character U+{ord(c):04X}")
        if not allowUnassigned and stringprep.in_table_a1(c):
            raise ValueError(f"unassigned code point U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise ValueError("mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("right-to-left text must start and end with a right-to-left character")
    return prepared


@dataclass(frozen=True)
class ScramKeys:
    """
    What the server stores for one user: enough to check a proof, not
    enough to log in elsewhere (RFC 5802 section 3).

    @ivar decoy: keys made up for a user who has none, so that the
        exchange looks the same up to its failure.
    """

    salt: bytes
    iterations: int
    storedKey: bytes
    serverKey: bytes
    decoy: bool = False

    @classmethod
    def fromPassword(
        cls, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramKeys:
        """
        Derive the keys for C{password} (prepared with SASLprep, as clients
        do) and a new random salt unless one is given.

        @raise ValueError: if SASLprep refuses C{password}: no client could
            send it either.
        """
        salt = secrets.token_bytes(SALT_OCTETS) if salt is None else salt
        salted = hashlib.pbkdf2_hmac("sha256", saslPrep(password).encode("utf-8"), salt, iterations)
        clientKey = _hmac(salted, b"Client Key")
        return cls(salt, iterations, hashlib.sha256(clientKey).digest(), _hmac(salted, b"Server Key"))

    @classmethod
    def decoyFor(cls, user: str, secret: bytes, like: ScramKeys | None = None) -> ScramKeys:
        """
        Keys for a user without any: the salt depends only on the name and
        C{secret}, so asking twice gives the same answer, as for a real
        user; no proof matches them.

        @param like: real keys whose iteration count and salt length the
            decoy copies (a file written with C{--scram-iterations} would
            otherwise tell real users from unknown ones by the count).
        """
        saltOctets = SALT_OCTETS if like is None else len(like.salt)
        iterations = DEFAULT_ITERATIONS if like is None else like.iterations
        salt = _hmac(secret, b"mailfw scram salt\0" + user.encode("utf-8"))[:saltOctets]
        stored = _hmac(secret, b"mailfw scram key\0" + user.encode("utf-8"))
        return cls(salt, iterations, stored, stored, decoy=True)

    @classmethod
    def parse(cls, text: str) -> ScramKeys:
        """
        Read keys in the password file's form,
        C{$scram-sha-256$i=ITERATIONS$SALT$STOREDKEY$SERVERKEY} (base64
        without padding).

        @raise ValueError: if C{text} is malformed or out of range.
        """
        m = _STORED.match(text)
        if m is None:
            raise ValueError("not $scram-sha-256$ keys")
        iterations = int(m.group(1))
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"SCRAM iteration count must be {MIN_ITERATIONS} to {MAX_ITERATIONS}")
        try:
            salt, stored, server = (_unb64(m.group(n)) for n in (2, 3, 4))
        except (binascii.Error, ValueError):
            raise ValueError("bad base64 in SCRAM keys") from None
        if not 8 <= len(salt) <= 64 or len(stored) != KEY_OCTETS or len(server) != KEY_OCTETS:
            raise ValueError("SCRAM salt or key of the wrong length")
        return cls(salt, iterations, stored, server)

    def format(self) -> str:
        """
        The keys in the password file's form (see L{parse}).
        """
        parts = (_b64(v).rstrip("=") for v in (self.salt, self.storedKey, self.serverKey))
        return f"{_PREFIX}i={self.iterations}$" + "$".join(parts)

    def sameAs(self, other: ScramKeys) -> bool:
        """
        Whether C{other} holds the same real keys (compared in constant
        time); a decoy is never the same as anything.
        """
        if self.decoy or other.decoy or self.iterations != other.iterations:
            return False
        return (
            hmac.compare_digest(self.salt, other.salt)
            & hmac.compare_digest(self.storedKey, other.storedKey)
            & hmac.compare_digest(self.serverKey, other.serverKey)
        )


@dataclass(frozen=True)
class ChannelBinding:
    """
    The channel binding data of one TLS connection.

    @ivar name: C{tls-exporter} or C{tls-unique}.
    """

    name: str
    data: bytes


def channelBindingFor(transport: Any, server: bool = True) -> ChannelBinding | None:
    """
    The channel binding of a Twisted TLS transport whose handshake is
    done, or C{None} if it has none: no TLS yet, another TLS version, or
    a resumed TLS 1.2 session (offering no binding is safe, a wrong one is
    not).

    @param transport: a transport whose C{getHandle()} is a pyOpenSSL
        C{Connection} (C{startTLS} and C{TLSMemoryBIOProtocol} both are).
    @param server: whether this side accepted the connection; only
        C{tls-unique} depends on it.
    """
    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    if not isinstance(connection, SSL.Connection):
        return None
    try:
        version = connection.get_protocol_version_name()
        if version == "TLSv1.3":
            data = connection.export_keying_material(_EXPORTER_LABEL, 32, b"")
            return ChannelBinding("tls-exporter", data)
        if version == "TLSv1.2":
            # RFC 5929: the first Finished of the handshake, the client's
            # in a full one.  A resumed session (whose first Finished is
            # the server's) binds nothing, and neither does one without
            # the extended master secret (RFC 7627): the triple handshake
            # attack makes tls-unique unsafe there (RFC 9266 section 1).
            # pyOpenSSL has the two OpenSSL calls in its bindings but no
            # public methods; without them, offer no binding rather than
            # guess.
            lib = getattr(SSL, "_lib", None)
            reused = getattr(lib, "SSL_session_reused", None)
            extendedMasterSecret = getattr(lib, "SSL_get_extms_support", None)
            if reused is None or extendedMasterSecret is None:
                return None
            if reused(connection._ssl) or extendedMasterSecret(connection._ssl) != 1:
                return None
            finished = connection.get_peer_finished() if server else connection.get_finished()
            return None if finished is None else ChannelBinding("tls-unique", finished)
    except SSL.Error:
        return None
    return None


class IScramCredentials(ICredentials):
    """
    A user who completed a SCRAM exchange: the checker confirms that the
    keys the exchange used are still that user's.
    """

    username = Attribute("C{str}: the user the exchange authenticated.")

    def checkKeys(keys: ScramKeys) -> bool:
        """
        Whether the exchange succeeded with exactly C{keys}.
        """


class IScramKeySource(Interface):
    """
    A credentials checker that can run SCRAM: it gives a user's keys in
    the middle of the exchange, and accepts the L{IScramCredentials} the
    exchange ends with.  The session offers SCRAM exactly when the
    portal's checker for L{IScramCredentials} provides this (a checker
    that only sees passwords, such as Dovecot's or a C{strcred} one,
    cannot).
    """

    def scramKeys(user: str) -> Deferred[ScramKeys]:
        """
        C{user}'s keys, or decoy keys (L{ScramKeys.decoyFor}) when the
        user is unknown or has none, so that the exchange goes on and fails
        like a wrong password.  Fails (454) if they cannot be read now.
        """


@implementer(IScramCredentials)
@dataclass(frozen=True)
class ScramCredentials:
    """
    What L{ScramExchange.credentials} gives the session to log in with.
    """

    username: str
    keys: ScramKeys

    def checkKeys(self, keys: ScramKeys) -> bool:
        return self.keys.sameAs(keys)


def _decodeSaslName(value: str) -> str:
    if "," in value or re.search(r"=(?!2C|3D)", value):
        raise ScramError(INVALID_USERNAME_ENCODING, "bad '=' escape in a name")
    return value.replace("=2C", ",").replace("=3D", "=")


def _attribute(part: str, name: str, what: str) -> str:
    if not part.startswith(name + "="):
        raise ScramError(INVALID_ENCODING, f"{what}: expected {name}=")
    return part[len(name) + 1 :]


class ScramExchange:
    """
    One SCRAM-SHA-256 or SCRAM-SHA-256-PLUS exchange on the server side.

    Call L{clientFirst}, L{serverFirst} and L{clientFinal} in that order,
    once each; after any L{ScramError} the exchange is over.

    @ivar user: the user name from the client-first message, after
        SASLprep.
    """

    def __init__(
        self,
        mechanism: str,
        channelBinding: ChannelBinding | None,
        serverNonce: str | None = None,
    ) -> None:
        """
        @param mechanism: C{SCRAM-SHA-256} or C{SCRAM-SHA-256-PLUS}.
        @param channelBinding: this connection's binding, exactly when the
            session offered C{-PLUS} (see L{channelBindingFor}).
        @param serverNonce: only for tests that replay fixed messages; a
            random one otherwise.
        """
        if mechanism not in MECHANISMS:
            raise ValueError(f"not a SCRAM mechanism: {mechanism!r}")
        self.mechanism = mechanism
        self.channelBinding = channelBinding
        self._serverNonce = serverNonce or _b64(secrets.token_bytes(18))
        self._step = "client-first"
        self.user = ""
        self._gs2Header = b""
        self._clientNonce = ""
        self._clientFirstBare = ""
        self._serverFirst = ""
        self._keys: ScramKeys | None = None
        self._credentials: ScramCredentials | None = None

    def _advance(self, expected: str, then: str) -> None:
        if self._step != expected:
            self._step = "failed"
            raise ScramError(OTHER_ERROR, f"{expected} out of turn")
        self._step = then

    def _decode(self, data: bytes, what: str) -> str:
        if len(data) > MAX_MESSAGE:
            raise ScramError(INVALID_ENCODING, f"{what} longer than {MAX_MESSAGE} octets")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError(INVALID_ENCODING, f"{what} is not UTF-8") from None

    def clientFirst(self, data: bytes) -> str:
        """
        Read the client-first message.

        @return: the user name whose keys L{serverFirst} needs.
        @raise ScramError: if the message is malformed or asks for a
            channel binding this exchange cannot or must not use.
        """
        self._advance("client-first", "failed")
        text = self._decode(data, "client-first")
        fields = text.split(",", 2)
        if len(fields) != 3:
            raise ScramError(INVALID_ENCODING, "client-first: no GS2 header")
        flag, authzid, bare = fields
        self._checkBinding(flag)
        parts = bare.split(",")
        if parts[0].startswith("m="):
            raise ScramError(EXTENSIONS_NOT_SUPPORTED, "client-first: mandatory extension")
        if len(parts) < 2:
            raise ScramError(INVALID_ENCODING, "client-first: expected n= and r=")
        name = _decodeSaslName(_attribute(parts[0], "n", "client-first"))
        nonce = _attribute(parts[1], "r", "client-first")
        if not all(_EXTENSION.match(part) for part in parts[2:]):
            raise ScramError(INVALID_ENCODING, "client-first: malformed extension")
        if not name or len(name.encode("utf-8")) > MAX_USERNAME:
            raise ScramError(INVALID_USERNAME_ENCODING, "empty or too long user name")
        if not 1 <= len(nonce) <= MAX_NONCE or not _NONCE.match(nonce):
            raise ScramError(INVALID_ENCODING, "client-first: bad nonce")
        try:
            user = saslPrep(name, allowUnassigned=True)
        except ValueError as e:
            raise ScramError(INVALID_USERNAME_ENCODING, f"user name: {e}") from None
        if not user:
            raise ScramError(INVALID_USERNAME_ENCODING, "user name empty after SASLprep")
        if authzid:
            # Acting as another user is not supported, as with PLAIN.
            other = _decodeSaslName(_attribute(authzid, "a", "authzid"))
            if other != name:
                raise ScramError(OTHER_ERROR, "authorization identity differs from the user")
        self.user = user
        self._gs2Header = f"{flag},{authzid},".encode()
        self._clientNonce = nonce
        self._clientFirstBare = bare
        self._step = "server-first"
        return user

    def _checkBinding(self, flag: str) -> None:
        plus = self.mechanism == SCRAM_PLUS
        if flag == "n":
            if plus:
                raise ScramError(OTHER_ERROR, f"{SCRAM_PLUS} without channel binding")
        elif flag == "y":
            if plus:
                raise ScramError(OTHER_ERROR, f"{SCRAM_PLUS} without channel binding")
            if self.channelBinding is not None:
                # RFC 5802 section 6: the client could bind and we offered
                # -PLUS, so someone removed it from what the client saw.
                raise ScramError(SERVER_DOES_SUPPORT_CHANNEL_BINDING, "downgrade from -PLUS")
        elif flag.startswith("p="):
            name = flag[2:]
            if not _CB_NAME.match(name):
                raise ScramError(INVALID_ENCODING, "bad channel binding name")
            if not plus or self.channelBinding is None:
                raise ScramError(CHANNEL_BINDING_NOT_SUPPORTED, f"channel binding {name} not offered")
            if name != self.channelBinding.name:
                raise ScramError(UNSUPPORTED_CHANNEL_BINDING_TYPE, f"channel binding {name}")
        else:
            raise ScramError(INVALID_ENCODING, "bad GS2 channel binding flag")

    def serverFirst(self, keys: ScramKeys) -> bytes:
        """
        The server-first message, with C{keys}' salt and iteration count:
        the user's, or L{ScramKeys.decoyFor} when there are none.
        """
        self._advance("server-first", "client-final")
        self._keys = keys
        self._serverFirst = (
            f"r={self._clientNonce}{self._serverNonce},s={_b64(keys.salt)},i={keys.iterations}"
        )
        return self._serverFirst.encode("ascii")

    def clientFinal(self, data: bytes) -> bytes:
        """
        Check the client-final message.

        @return: the server-final message (C{v=}); after it L{credentials}
            names the authenticated user.
        @raise ScramError: for a malformed message, a channel binding or
            nonce that does not match, or a wrong proof.
        """
        self._advance("client-final", "failed")
        keys = self._keys
        assert keys is not None
        text = self._decode(data, "client-final")
        withoutProof, separator, proofText = text.rpartition(",p=")
        if not separator:
            raise ScramError(INVALID_ENCODING, "client-final: no proof")
        parts = withoutProof.split(",")
        if len(parts) < 2:
            raise ScramError(INVALID_ENCODING, "client-final: expected c= and r=")
        binding = _attribute(parts[0], "c", "client-final")
        nonce = _attribute(parts[1], "r", "client-final")
        if not all(_EXTENSION.match(part) for part in parts[2:]):
            raise ScramError(INVALID_ENCODING, "client-final: malformed extension")
        if not _BASE64.match(binding) or not _BASE64.match(proofText):
            raise ScramError(INVALID_ENCODING, "client-final: bad base64")
        expected = self._gs2Header
        if self._gs2Header.startswith(b"p="):
            assert self.channelBinding is not None
            expected += self.channelBinding.data
        if not hmac.compare_digest(base64.b64decode(binding), expected):
            raise ScramError(CHANNEL_BINDINGS_DONT_MATCH, "channel binding differs")
        if not hmac.compare_digest(
            nonce.encode("utf-8"), (self._clientNonce + self._serverNonce).encode("utf-8")
        ):
            raise ScramError(OTHER_ERROR, "nonce differs from the one this exchange made")
        proof = base64.b64decode(proofText)
        if len(proof) != KEY_OCTETS:
            raise ScramError(INVALID_ENCODING, "client-final: proof of the wrong length")
        authMessage = f"{self._clientFirstBare},{self._serverFirst},{withoutProof}".encode()
        signature = _hmac(keys.storedKey, authMessage)
        clientKey = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(clientKey).digest(), keys.storedKey) or keys.decoy:
            raise ScramError(INVALID_PROOF, "wrong proof (wrong password or no such user)")
        self._step = "done"
        self._credentials = ScramCredentials(self.user, keys)
        return b"v=" + _b64(_hmac(keys.serverKey, authMessage)).encode("ascii")

    def credentials(self) -> ScramCredentials:
        """
        The credentials to log in with through the portal (whose checker
        confirms the keys are still the user's).

        @raise ScramError: unless L{clientFinal} succeeded.
        """
        if self._credentials is None:
            raise ScramError(OTHER_ERROR, "the exchange has not succeeded")
        return self._credentials
