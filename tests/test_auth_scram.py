"""
SCRAM-SHA-256(-PLUS) on the server side (L{mailfw.auth._scram}): RFC
7677's test vector, scramp as an independent client with and without
channel binding, channel binding data from real TLS 1.2 and 1.3
connections (in memory, through L{twisted.test.iosim}), every kind of bad
input, and the checker's key lookup and login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import scramp.core
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.auth import IMailUser, MailRealm, PasswordFileChecker, hashPassword
from mailfw.auth._scram import (
    SCRAM,
    SCRAM_PLUS,
    ChannelBinding,
    IScramCredentials,
    ScramCredentials,
    ScramError,
    ScramExchange,
    ScramKeys,
    channelBindingFor,
    saslPrep,
)
from mailfw.tls import selfSignedCertificate
from tests._tlspair import NO_EXTENDED_MASTER_SECRET, tlsPair

# RFC 7677 section 3.
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")

PENCIL = ScramKeys.fromPassword("pencil", RFC_SALT, 4096)
EXPORTER = ChannelBinding("tls-exporter", bytes(range(32)))
UNIQUE = ChannelBinding("tls-unique", bytes(range(100, 112)))


def rfcExchange() -> ScramExchange:
    return ScramExchange(SCRAM, None, serverNonce=RFC_SERVER_NONCE)


def scrampClient(
    mechanisms: list[str], password: str = "pencil", binding: ChannelBinding | None = None, user: str = "user"
) -> Any:
    cb = None if binding is None else (binding.name, binding.data)
    return scramp.ScramClient(mechanisms, user, password, channel_binding=cb)


def allowExporter(case: SynchronousTestCase) -> None:
    """
    Let scramp's client bind with C{tls-exporter}.  scramp refuses the name
    only because Python's C{ssl} module cannot export keying material; the
    computation it does with the data (GS2 header plus the data, in
    C{c=}) is the same for every binding type.
    """
    case.patch(scramp.core.CbName, "SUPPORTED_TYPES", scramp.core.CbName.SUPPORTED_TYPES | {"tls-exporter"})
    case.patch(scramp.core.CbName, "UNSUPPORTED_TYPES", frozenset())


def runWithScramp(
    case: SynchronousTestCase,
    exchange: ScramExchange,
    client: Any,
    keys: ScramKeys = PENCIL,
) -> None:
    """
    Run a whole exchange between scramp's client and C{exchange}; scramp
    checks the server's signature.
    """
    user = exchange.clientFirst(client.get_client_first().encode())
    case.assertEqual(user, "user")
    client.set_server_first(exchange.serverFirst(keys).decode())
    final = exchange.clientFinal(client.get_client_final().encode())
    client.set_server_final(final.decode())


class VectorTests(SynchronousTestCase):
    def test_rfc7677(self) -> None:
        """
        With the salt, count and nonces of RFC 7677's example, the server
        sends exactly its server-first and server-final messages and
        accepts its client proof.
        """
        exchange = rfcExchange()
        self.assertEqual(exchange.clientFirst(RFC_CLIENT_FIRST), "user")
        self.assertEqual(exchange.serverFirst(PENCIL), RFC_SERVER_FIRST)
        self.assertEqual(exchange.clientFinal(RFC_CLIENT_FINAL), RFC_SERVER_FINAL)
        self.assertEqual(exchange.credentials(), ScramCredentials("user", PENCIL))

    def test_keysMatchScramp(self) -> None:
        """
        L{ScramKeys.fromPassword} derives what scramp derives for the same
        password, salt and count, also for a password SASLprep changes.
        """
        mechanism = scramp.ScramMechanism(SCRAM)
        for password in ["pencil", "I\u00adX", "\u2168"]:
            salt, stored, server, iterations = mechanism.make_auth_info(password, 4096, RFC_SALT)
            self.assertEqual(
                ScramKeys.fromPassword(password, RFC_SALT, 4096), ScramKeys(salt, iterations, stored, server)
            )


class ScrampTests(SynchronousTestCase):
    def test_withoutBinding(self) -> None:
        """
        scramp's client logs in with SCRAM-SHA-256 when the server has no
        channel binding (C{n}).
        """
        runWithScramp(self, ScramExchange(SCRAM, None), scrampClient([SCRAM]))

    def test_clientCannotBind(self) -> None:
        """
        A client without channel binding (C{n}) may use SCRAM-SHA-256 even
        where the server offered -PLUS.
        """
        runWithScramp(self, ScramExchange(SCRAM, EXPORTER), scrampClient([SCRAM]))

    def test_clientCouldBindServerCannot(self) -> None:
        """
        A client that could bind but sees no -PLUS offer says C{y}; where
        the server has no binding that is fine.
        """
        client = scrampClient([SCRAM], binding=UNIQUE)
        self.assertTrue(client.get_client_first().startswith("y,,"))
        client = scrampClient([SCRAM], binding=UNIQUE)
        runWithScramp(self, ScramExchange(SCRAM, None), client)

    def test_tlsUnique(self) -> None:
        """
        SCRAM-SHA-256-PLUS with C{tls-unique} data on both sides.
        """
        client = scrampClient([SCRAM, SCRAM_PLUS], binding=UNIQUE)
        self.assertEqual(client.mechanism_name, SCRAM_PLUS)
        runWithScramp(self, ScramExchange(SCRAM_PLUS, UNIQUE), client)

    def test_tlsExporter(self) -> None:
        """
        SCRAM-SHA-256-PLUS with C{tls-exporter} data on both sides.
        """
        allowExporter(self)
        client = scrampClient([SCRAM_PLUS], binding=EXPORTER)
        self.assertTrue(client.get_client_first().startswith("p=tls-exporter,,"))
        client = scrampClient([SCRAM_PLUS], binding=EXPORTER)
        runWithScramp(self, ScramExchange(SCRAM_PLUS, EXPORTER), client)

    def test_bindingMismatch(self) -> None:
        """
        A client bound to another TLS connection (a man in the middle) is
        refused with C{channel-bindings-dont-match}.
        """
        allowExporter(self)
        client = scrampClient([SCRAM_PLUS], binding=ChannelBinding("tls-exporter", b"\xff" * 32))
        e = self.assertRaises(ScramError, runWithScramp, self, ScramExchange(SCRAM_PLUS, EXPORTER), client)
        self.assertEqual(e.value, "channel-bindings-dont-match")
        self.assertEqual(e.serverFinal(), b"e=channel-bindings-dont-match")

    def test_downgrade(self) -> None:
        """
        RFC 5802 section 6: a client that could bind says C{y} because it
        was not shown -PLUS; where the server did offer -PLUS, someone
        removed it, and the exchange fails.
        """
        client = scrampClient([SCRAM], binding=UNIQUE)
        e = self.assertRaises(ScramError, runWithScramp, self, ScramExchange(SCRAM, UNIQUE), client)
        self.assertEqual(e.value, "server-does-support-channel-binding")

    def test_wrongPassword(self) -> None:
        """
        A wrong password fails with C{invalid-proof}.
        """
        e = self.assertRaises(
            ScramError, runWithScramp, self, ScramExchange(SCRAM, None), scrampClient([SCRAM], "pencils")
        )
        self.assertEqual(e.value, "invalid-proof")


class BadInputTests(SynchronousTestCase):
    def assertRefused(self, value: str, exchange: ScramExchange, data: bytes) -> None:
        e = self.assertRaises(ScramError, exchange.clientFirst, data)
        self.assertEqual((data, e.value), (data, value))
        # The exchange is over.
        self.assertRaises(ScramError, exchange.serverFirst, PENCIL)

    def test_malformedClientFirst(self) -> None:
        """
        Malformed client-first messages are refused with a
        C{server-error-value} naming the problem.
        """
        for value, data in [
            ("invalid-encoding", b""),
            ("invalid-encoding", b"n,"),
            ("invalid-encoding", b"n,,"),
            ("invalid-encoding", b"x,,n=user,r=abc"),
            ("invalid-encoding", b"n,,r=abc,n=user"),
            ("invalid-encoding", b"n,,n=user"),
            ("invalid-encoding", b"n,,n=user,r="),
            ("invalid-encoding", b"n,,n=user,r=a b"),
            ("invalid-encoding", b"n,,n=user,r=" + b"a" * 257),
            ("invalid-encoding", b"n,,n=user,r=abc,nonsense"),
            ("invalid-encoding", b"n,,n=\xff,r=abc"),
            ("invalid-encoding", b"n,,n=user,r=" + b"a" * 3000),
            ("invalid-encoding", b"p=tls unique,,n=user,r=abc"),
            ("extensions-not-supported", b"n,,m=x,n=user,r=abc"),
            ("invalid-username-encoding", b"n,,n=us=2Xer,r=abc"),
            ("invalid-username-encoding", b"n,,n=,r=abc"),
            ("invalid-username-encoding", b"n,,n=" + b"u" * 256 + b",r=abc"),
            ("invalid-username-encoding", "n,,n=us\u0007er,r=abc".encode()),
            ("invalid-username-encoding", "n,,n=\u0627a\u0628,r=abc".encode()),
            ("invalid-username-encoding", b"n,,n=\xc2\xad,r=abc"),
            ("other-error", b"n,a=other,n=user,r=abc"),
            ("invalid-encoding", b"n,b=user,n=user,r=abc"),
        ]:
            self.assertRefused(value, ScramExchange(SCRAM, None), data)

    def test_nameEscapesAndAuthzid(self) -> None:
        """
        C{=2C} and C{=3D} decode to C{,} and C{=}; SASLprep maps the name;
        an authorization identity equal to the user is accepted.
        """
        self.assertEqual(ScramExchange(SCRAM, None).clientFirst(b"n,,n=a=2Cb=3Dc,r=abc"), "a,b=c")
        self.assertEqual(ScramExchange(SCRAM, None).clientFirst("n,,n=\u2168x\u00ad,r=abc".encode()), "IXx")
        self.assertEqual(ScramExchange(SCRAM, None).clientFirst(b"n,a=user,n=user,r=abc"), "user")
        self.assertEqual(ScramExchange(SCRAM, None).clientFirst(b"n,,n=user,r=abc,x=ignored"), "user")

    def test_bindingFlags(self) -> None:
        """
        The GS2 flag must fit the mechanism and the server's binding.
        """
        self.assertRefused("other-error", ScramExchange(SCRAM_PLUS, UNIQUE), b"n,,n=user,r=abc")
        self.assertRefused("other-error", ScramExchange(SCRAM_PLUS, UNIQUE), b"y,,n=user,r=abc")
        self.assertRefused(
            "channel-binding-not-supported", ScramExchange(SCRAM, UNIQUE), b"p=tls-unique,,n=user,r=abc"
        )
        self.assertRefused(
            "channel-binding-not-supported", ScramExchange(SCRAM_PLUS, None), b"p=tls-unique,,n=user,r=abc"
        )
        self.assertRefused(
            "unsupported-channel-binding-type",
            ScramExchange(SCRAM_PLUS, EXPORTER),
            b"p=tls-unique,,n=user,r=abc",
        )
        self.assertRaises(ValueError, ScramExchange, "SCRAM-SHA-1", None)

    def finalRefused(self, value: str, final: bytes, exchange: ScramExchange | None = None) -> None:
        exchange = exchange or rfcExchange()
        exchange.clientFirst(RFC_CLIENT_FIRST)
        exchange.serverFirst(PENCIL)
        e = self.assertRaises(ScramError, exchange.clientFinal, final)
        self.assertEqual((final, e.value), (final, value))
        self.assertRaises(ScramError, exchange.credentials)

    def test_malformedClientFinal(self) -> None:
        """
        Malformed client-final messages are refused.
        """
        nonce = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        proof = b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        for final in [
            b"",
            b"c=biws," + nonce,
            b"c=biws," + proof,
            nonce + b",c=biws," + proof,
            b"c=biws," + nonce + b",p=not base64!",
            b"c=biws," + nonce + b",p=" + base64.b64encode(b"short"),
            b"c=b!ws," + nonce + b"," + proof,
            b"c=biws," + nonce + b",bad," + proof,
            b"c=biws," + nonce + b"," + proof + b"\xff",
            b"c=biws," + nonce + b"," + proof + b"x" * 3000,
        ]:
            self.finalRefused("invalid-encoding", final)

    def test_wrongNonce(self) -> None:
        """
        The nonce must be the client's followed by this exchange's.
        """
        final = RFC_CLIENT_FINAL.replace(b"k0,", b"k1,")
        self.finalRefused("other-error", final)
        self.finalRefused(
            "other-error", RFC_CLIENT_FINAL.replace(b"r=rOprNGfwEbeRWgbNEkqO", b"r=rOprNGfwEbeRWgbNEkq")
        )

    def test_wrongBindingInput(self) -> None:
        """
        C{c=} must repeat the GS2 header (and the binding data with C{p}).
        """
        self.finalRefused("channel-bindings-dont-match", RFC_CLIENT_FINAL.replace(b"c=biws", b"c=eSws"))
        exchange = ScramExchange(SCRAM_PLUS, UNIQUE)
        exchange.clientFirst(b"p=tls-unique,,n=user,r=abc")
        exchange.serverFirst(PENCIL)
        final = b"c=" + base64.b64encode(b"p=tls-unique,,") + b",r=abcdef,p=" + base64.b64encode(bytes(32))
        e = self.assertRaises(ScramError, exchange.clientFinal, final)
        self.assertEqual(e.value, "channel-bindings-dont-match")

    def test_wrongProof(self) -> None:
        """
        A proof that is not the password's fails with C{invalid-proof}.
        """
        final = RFC_CLIENT_FINAL[:-44] + base64.b64encode(bytes(32))
        self.finalRefused("invalid-proof", final)

    def test_replayedProof(self) -> None:
        """
        A client-final message recorded from a successful exchange does
        not log in again: a new exchange has a new server nonce, and the
        old exchange accepts nothing more.
        """
        exchange = ScramExchange(SCRAM, None)
        client = scrampClient([SCRAM])
        exchange.clientFirst(client.get_client_first().encode())
        client.set_server_first(exchange.serverFirst(PENCIL).decode())
        final = client.get_client_final().encode()
        exchange.clientFinal(final)
        self.assertEqual(self.assertRaises(ScramError, exchange.clientFinal, final).value, "other-error")
        again = ScramExchange(SCRAM, None)
        again.clientFirst(b"n,," + client.client_first_bare.encode())
        again.serverFirst(PENCIL)
        self.assertEqual(self.assertRaises(ScramError, again.clientFinal, final).value, "other-error")

    def test_outOfTurn(self) -> None:
        """
        Steps in the wrong order fail and end the exchange.
        """
        exchange = ScramExchange(SCRAM, None)
        self.assertRaises(ScramError, exchange.serverFirst, PENCIL)
        self.assertRaises(ScramError, exchange.clientFirst, RFC_CLIENT_FIRST)
        exchange = rfcExchange()
        exchange.clientFirst(RFC_CLIENT_FIRST)
        self.assertRaises(ScramError, exchange.clientFinal, RFC_CLIENT_FINAL)

    def test_decoyNeverSucceeds(self) -> None:
        """
        Decoy keys give a normal-looking server-first, the same each time
        for one user, and fail like a wrong password even with the proof
        their own stored key would accept.
        """
        decoy = ScramKeys.decoyFor("nobody", b"secret")
        self.assertEqual(decoy, ScramKeys.decoyFor("nobody", b"secret"))
        self.assertNotEqual(decoy.salt, ScramKeys.decoyFor("somebody", b"secret").salt)
        self.assertNotEqual(decoy.salt, ScramKeys.decoyFor("nobody", b"other").salt)
        exchange = rfcExchange()
        exchange.clientFirst(RFC_CLIENT_FIRST)
        first = exchange.serverFirst(decoy)
        self.assertRegex(first.decode(), r"^r=[^,]+,s=[A-Za-z0-9+/]{22}==,i=4096$")
        # A "client key" whose hash is the decoy's stored key does not
        # exist; make the proof check pass by choosing the stored key.
        clientKey = b"k" * 32
        forged = ScramKeys(decoy.salt, 4096, hashlib.sha256(clientKey).digest(), decoy.serverKey, decoy=True)
        exchange = rfcExchange()
        exchange.clientFirst(RFC_CLIENT_FIRST)
        serverFirst = exchange.serverFirst(forged)
        withoutProof = b"c=biws,r=rOprNGfwEbeRWgbNEkqO" + RFC_SERVER_NONCE.encode()
        authMessage = RFC_CLIENT_FIRST[3:] + b"," + serverFirst + b"," + withoutProof
        signature = hmac.new(forged.storedKey, authMessage, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(clientKey, signature, strict=True))
        final = withoutProof + b",p=" + base64.b64encode(proof)
        self.assertEqual(self.assertRaises(ScramError, exchange.clientFinal, final).value, "invalid-proof")
        real = ScramKeys(forged.salt, 4096, forged.storedKey, forged.serverKey)
        exchange = rfcExchange()
        exchange.clientFirst(RFC_CLIENT_FIRST)
        exchange.serverFirst(real)
        self.assertTrue(exchange.clientFinal(final).startswith(b"v="))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.binary(max_size=300))
    def test_anyBytes(self, first: bytes, final: bytes) -> None:
        """
        Whatever the client sends, the exchange answers or raises
        L{ScramError}; nothing else escapes.
        """
        for prefix in (b"", b"n,,n=user,r=", b"p=tls-unique,,n=user,r=x"):
            exchange = ScramExchange(SCRAM_PLUS if prefix.startswith(b"p") else SCRAM, UNIQUE)
            try:
                exchange.clientFirst(prefix + first)
                exchange.serverFirst(PENCIL)
                exchange.clientFinal(b"c=biws,r=" + final)
            except ScramError:
                pass


class KeysTests(SynchronousTestCase):
    def test_formatRoundTrip(self) -> None:
        """
        Keys format as C{$scram-sha-256$i=...$SALT$STORED$SERVER} and parse
        back.
        """
        text = PENCIL.format()
        self.assertRegex(
            text, r"^\$scram-sha-256\$i=4096\$W22ZaJ0SNY7soEsUEjb6gQ\$[A-Za-z0-9+/]{43}\$[A-Za-z0-9+/]{43}$"
        )
        self.assertEqual(ScramKeys.parse(text), PENCIL)

    def test_parseRefuses(self) -> None:
        """
        Malformed or out-of-range keys are refused with L{ValueError}.
        """
        text = PENCIL.format()
        for bad in [
            "",
            "$scrypt$ln=4,r=1,p=1$abc$def",
            text.replace("i=4096", "i=4095"),
            text.replace("i=4096", "i=99999999"),
            text.replace("$W22ZaJ0SNY7soEsUEjb6gQ$", "$W22Z$"),
            text[:-4],
            text + "$x",
            text.replace("$W22", "$!22"),
        ]:
            self.assertRaises(ValueError, ScramKeys.parse, bad)

    def test_sameAs(self) -> None:
        """
        Keys are the same only if every part is, and never if one is a
        decoy.
        """
        self.assertTrue(PENCIL.sameAs(ScramKeys.parse(PENCIL.format())))
        self.assertFalse(PENCIL.sameAs(ScramKeys.fromPassword("pencil", RFC_SALT, 4097)))
        self.assertFalse(PENCIL.sameAs(ScramKeys.fromPassword("pencil")))
        decoy = ScramKeys(PENCIL.salt, 4096, PENCIL.storedKey, PENCIL.serverKey, decoy=True)
        self.assertFalse(PENCIL.sameAs(decoy))
        self.assertFalse(decoy.sameAs(decoy))

    def test_saslPrep(self) -> None:
        """
        SASLprep maps soft hyphens away and spaces to U+0020, normalises
        with NFKC, and refuses control characters, unassigned code points
        in stored strings and malformed bidirectional text (RFC 4013
        section 3's examples).
        """
        self.assertEqual(saslPrep("I\u00adX"), "IX")
        self.assertEqual(saslPrep("user"), "user")
        self.assertEqual(saslPrep("USER"), "USER")
        self.assertEqual(saslPrep("\u00aa"), "a")
        self.assertEqual(saslPrep("\u2168"), "IX")
        self.assertEqual(saslPrep("a\u2003b"), "a b")
        self.assertRaises(ValueError, saslPrep, "\u0007")
        self.assertRaises(ValueError, saslPrep, "\u0627\u0031")
        self.assertEqual(saslPrep("\u0627\u0031\u0628"), "\u0627\u0031\u0628")
        self.assertRaises(ValueError, saslPrep, "a\u0221")
        self.assertEqual(saslPrep("a\u0221", allowUnassigned=True), "a\u0221")
        self.assertRaises(ValueError, ScramKeys.fromPassword, "pass\u0007word")


class ChannelBindingTests(SynchronousTestCase):
    def test_tls13(self) -> None:
        """
        On TLS 1.3 both ends export the same 32 octets as C{tls-exporter}
        (RFC 9266), different for each connection.
        """
        client, server, _ = tlsPair(TLSVersion.TLSv1_3)
        ours = channelBindingFor(server)
        assert ours is not None
        self.assertEqual(ours.name, "tls-exporter")
        self.assertEqual(len(ours.data), 32)
        self.assertEqual(channelBindingFor(client, server=False), ours)
        self.assertNotEqual(channelBindingFor(tlsPair(TLSVersion.TLSv1_3)[1]), ours)

    def test_tls12(self) -> None:
        """
        On TLS 1.2 both ends find the client's Finished message, the
        C{tls-unique} binding (RFC 5929), different for each connection.
        """
        client, server, _ = tlsPair(TLSVersion.TLSv1_2)
        ours = channelBindingFor(server)
        assert ours is not None
        self.assertEqual(ours.name, "tls-unique")
        self.assertEqual(len(ours.data), 12)
        self.assertEqual(ours.data, client.getHandle().get_finished())
        self.assertEqual(channelBindingFor(client, server=False), ours)
        self.assertNotEqual(channelBindingFor(tlsPair(TLSVersion.TLSv1_2)[1]), ours)

    def test_tls12WithoutExtendedMasterSecret(self) -> None:
        """
        TLS 1.2 without the extended master secret (RFC 7627) has no
        binding: the triple handshake attack makes C{tls-unique} unsafe.
        """
        client, server, _ = tlsPair(TLSVersion.TLSv1_2, clientOptions=NO_EXTENDED_MASTER_SECRET)
        self.assertEqual(server.getHandle().get_protocol_version_name(), "TLSv1.2")
        self.assertIsNotNone(server.getHandle().get_peer_finished())
        self.assertIsNone(channelBindingFor(server))
        self.assertIsNone(channelBindingFor(client, server=False))

    def test_scrampOverTLS(self) -> None:
        """
        scramp's client and the server, each with the binding of its own
        end of one real TLS connection, complete SCRAM-SHA-256-PLUS.
        """
        allowExporter(self)
        for version in (TLSVersion.TLSv1_2, TLSVersion.TLSv1_3):
            client, server, _ = tlsPair(version)
            ours, theirs = channelBindingFor(server), channelBindingFor(client, server=False)
            assert ours is not None and theirs is not None
            runWithScramp(self, ScramExchange(SCRAM_PLUS, ours), scrampClient([SCRAM_PLUS], binding=theirs))

    def test_noTLS(self) -> None:
        """
        No binding without TLS, or before the handshake is over.
        """
        self.assertIsNone(channelBindingFor(StringTransport()))
        self.assertIsNone(channelBindingFor(object()))
        key, cert = selfSignedCertificate("mx.example", days=1)
        factory = TLSMemoryBIOFactory(
            CertificateOptions(privateKey=key, certificate=cert), False, Factory.forProtocol(Protocol)
        )
        server = factory.buildProtocol(None)
        server.makeConnection(StringTransport())
        self.assertIsNone(channelBindingFor(server))


def synchronous(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cheap = hashPassword("pencil", logN=4, r=1, p=1)
        self.path.write_text(f"user:{cheap}:::{PENCIL.format()}\nold:{cheap}\n")
        self.checker = PasswordFileChecker(self.path, synchronous, scramSecret=b"secret")

    def login(self, user: str = "user", password: str = "pencil") -> Deferred[Any]:
        exchange = ScramExchange(SCRAM, None)
        client = scrampClient([SCRAM], password, user=user)
        name = exchange.clientFirst(client.get_client_first().encode())
        client.set_server_first(
            exchange.serverFirst(self.successResultOf(self.checker.scramKeys(name))).decode()
        )
        exchange.clientFinal(client.get_client_final().encode())
        portal = Portal(MailRealm(self.checker.rights), [self.checker])
        return portal.login(exchange.credentials(), None, IMailUser)

    def test_keys(self) -> None:
        """
        C{scramKeys} gives the file's keys; decoys (the same each time)
        for a user whose line has none and for an unknown user.
        """
        self.assertEqual(self.successResultOf(self.checker.scramKeys("user")), PENCIL)
        for name in ("old", "nobody"):
            keys = self.successResultOf(self.checker.scramKeys(name))
            self.assertEqual(keys, ScramKeys.decoyFor(name, b"secret"))
            self.assertTrue(keys.decoy)

    def test_decoysLookLikeTheFile(self) -> None:
        """
        Decoys copy the iteration count and salt length of the file's real
        keys, so a file written with other C{--scram-iterations} does not
        tell real users from unknown ones.
        """
        real = ScramKeys.fromPassword("pencil", salt=b"s" * 24, iterations=8192)
        cheap = hashPassword("pencil", logN=4, r=1, p=1)
        self.path.write_text(f"alice:{cheap}:::{real.format()}\n")
        decoy = self.successResultOf(self.checker.scramKeys("nobody"))
        self.assertTrue(decoy.decoy)
        self.assertEqual((decoy.iterations, len(decoy.salt)), (8192, 24))

    def test_unreadable(self) -> None:
        """
        A file that cannot be read fails the lookup with L{OSError} (454).
        """
        self.path.unlink()
        self.failureResultOf(self.checker.scramKeys("user"), OSError)

    def test_login(self) -> None:
        """
        After a successful exchange the portal logs the user in with
        L{IScramCredentials}.
        """
        self.assertIn(IScramCredentials, self.checker.credentialInterfaces)
        self.assertTrue(verifyObject(IScramCredentials, ScramCredentials("user", PENCIL)))
        _, avatar, logout = self.successResultOf(self.login())
        self.assertEqual(avatar.identity, "user")
        logout()
        self.successResultOf(
            Portal(MailRealm(), [self.checker]).login(UsernamePassword(b"user", b"pencil"), None, IMailUser)
        )

    def test_keysChanged(self) -> None:
        """
        Credentials from an exchange with keys that are no longer the
        user's (the password changed meanwhile), or decoys, are refused.
        """
        portal = Portal(MailRealm(), [self.checker])
        stale = ScramCredentials("user", ScramKeys.fromPassword("pencil"))
        self.failureResultOf(portal.login(stale, None, IMailUser), UnauthorizedLogin)
        decoy = ScramCredentials("nobody", ScramKeys.decoyFor("nobody", b"secret"))
        self.failureResultOf(portal.login(decoy, None, IMailUser), UnauthorizedLogin)
        old = ScramCredentials("old", ScramKeys.decoyFor("old", b"secret"))
        self.failureResultOf(portal.login(old, None, IMailUser), UnauthorizedLogin)
