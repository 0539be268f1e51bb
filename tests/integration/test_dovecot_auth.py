"""
AUTH through a real Dovecot (Debian's C{dovecot-core}): a private Dovecot
started by the test with only its authentication service, a passwd-file
user database and an C{auth-client} listener on a unix socket and on
127.0.0.1.  First the checker on the test's reactor, then a real
C{twistd mailfw} with C{[auth] backend = "dovecot"} and smtplib over
STARTTLS.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.task import deferLater

from mailfw.auth import IMailUser, MailRealm
from mailfw.auth._checker import SessionCredentials
from mailfw.auth._dovecot import DovecotAuthClient, DovecotChecker, DovecotUnavailable
from mailfw.envelope import Session
from mailfw.tls import makeSelfSigned
from tests.integration._peers import AUTH_SERVICES, Dovecot, requireDovecot
from tests.integration._server import MailfwProcess, waitFor

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
TIMEOUT = 30


def startDovecot() -> Dovecot:
    requireDovecot()
    server = Dovecot({"alice": PASSWORD}, protocols="", services=AUTH_SERVICES, socketName="auth-client")
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    server = startDovecot()
    try:
        yield server
    finally:
        server.remove()


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def client(dovecot: Dovecot) -> Iterator[DovecotAuthClient]:
    made = DovecotAuthClient(UNIXClientEndpoint(reactor(), str(dovecot.socket)), reactor(), timeout=TIMEOUT)
    try:
        yield made
    finally:
        made.stopService()


async def login(client: DovecotAuthClient, user: bytes, password: bytes) -> Any:
    portal = Portal(MailRealm(), [DovecotChecker(client)])
    _, avatar, _ = await portal.login(UsernamePassword(user, password), None, IMailUser)
    return avatar


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_rightWrongUnknown(dovecot: Dovecot, client: DovecotAuthClient) -> None:
    """
    The right password gives an avatar named as Dovecot names the user
    (C{auth_username_format = %Ln}); a wrong password and an unknown user
    are L{UnauthorizedLogin}; all on one connection.
    """
    avatar = await login(client, b"Alice@example.org", PASSWORD.encode())
    assert avatar.identity == "alice", dovecot.output()
    with pytest.raises(UnauthorizedLogin):
        await login(client, b"alice", b"wrong")
    with pytest.raises(UnauthorizedLogin):
        await login(client, b"nobody", PASSWORD.encode())


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_sessionCredentials(dovecot: Dovecot, client: DovecotAuthClient) -> None:
    """
    Credentials that carry their session pass the client's address to
    Dovecot, which names it in its log of a failure.
    """
    checker = DovecotChecker(client)
    session = Session("submission", "192.0.2.9", 4321, tls=True)
    assert await checker.requestAvatarId(SessionCredentials(b"alice", PASSWORD.encode(), session)) == "alice"
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(SessionCredentials(b"alice", b"wrong", session))
    for _ in range(100):
        if "alice,192.0.2.9" in dovecot.output():
            break
        await deferLater(reactor(), 0.1)
    assert "alice,192.0.2.9" in dovecot.output(), dovecot.output()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_overTCP(dovecot: Dovecot) -> None:
    """
    Dovecot's C{inet_listener} of the auth service works the same.
    """
    client = DovecotAuthClient(
        HostnameEndpoint(reactor(), "127.0.0.1", dovecot.port), reactor(), timeout=TIMEOUT
    )
    try:
        assert (await login(client, b"alice", PASSWORD.encode())).identity == "alice"
        with pytest.raises(UnauthorizedLogin):
            await login(client, b"alice", b"wrong")
    finally:
        client.stopService()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_dovecotStopped(dovecot: Dovecot, client: DovecotAuthClient) -> None:
    """
    Once Dovecot is stopped, a check fails with L{DovecotUnavailable}
    (454 in the session), whether the connection was up before or not.
    """
    assert (await login(client, b"alice", PASSWORD.encode())).identity == "alice"
    dovecot.stop()
    with pytest.raises(DovecotUnavailable):
        await login(client, b"alice", PASSWORD.encode())
    fresh = DovecotAuthClient(UNIXClientEndpoint(reactor(), str(dovecot.socket)), reactor(), timeout=TIMEOUT)
    try:
        with pytest.raises(DovecotUnavailable):
            await login(fresh, b"alice", PASSWORD.encode())
    finally:
        fresh.stopService()


# --- end to end ----------------------------------------------------------------

CONFIG = """
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
backend = "dovecot"
socket = "{socket}"
timeout = 10
failure_delay = 0.1
senders = {{ alice = ["alice@localhost"] }}
"""


@pytest.fixture
def mailfw(tmp_path: Path, dovecot: Dovecot) -> Iterator[MailfwProcess]:
    data = tmp_path / "data"
    data.mkdir()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    makeSelfSigned("mx.test", cert, key)
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(cert=cert, key=key, socket=dovecot.socket))
    process = MailfwProcess(data, config=config)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def submission(server: MailfwProcess) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.submissionPort, local_hostname="client.test", timeout=TIMEOUT)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo()
    return client


def authenticate(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> tuple[int, bytes]:
    client.user, client.password = user, password
    method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login}[mechanism]
    text: bytes | str
    try:
        code, text = client.auth(mechanism, method)
    except smtplib.SMTPAuthenticationError as e:
        code, text = e.smtp_code, e.smtp_error
    return code, text if isinstance(text, bytes) else text.encode()


def test_submissionEndToEnd(mailfw: MailfwProcess, dovecot: Dovecot) -> None:
    """
    On the submission port, after STARTTLS, AUTH PLAIN and AUTH LOGIN
    succeed for the Dovecot user and fail (535) for a wrong password; the
    authenticated user's message is delivered; with Dovecot stopped, AUTH
    gets 454 4.7.0 and the session goes on.
    """
    with submission(mailfw) as client:
        assert client.has_extn("auth")
        code, text = authenticate(client, "PLAIN", "alice", "wrong")
        assert (code, text[:5]) == (535, b"5.7.8"), mailfw.output()
    with submission(mailfw) as client:
        assert authenticate(client, "LOGIN", "alice", "wrong")[0] == 535
    with submission(mailfw) as client:
        code, _ = authenticate(client, "PLAIN", "alice", PASSWORD)
        assert code == 235, mailfw.output() + dovecot.output()
        msg = EmailMessage()
        msg["From"] = "alice@localhost"
        msg["To"] = "alice@localhost"
        msg["Subject"] = "through Dovecot"
        msg.set_content("hello\n")
        client.send_message(msg)
    with submission(mailfw) as client:
        assert authenticate(client, "LOGIN", "alice", PASSWORD)[0] == 235, mailfw.output()
    waitFor(lambda: len(mailfw.delivered("alice")) == 1, timeout=TIMEOUT, what="delivery to alice")
    assert b"ESMTPSA" in mailfw.delivered("alice")[0].read_bytes()

    dovecot.stop()
    with submission(mailfw) as client:
        code, text = authenticate(client, "PLAIN", "alice", PASSWORD)
        assert (code, text[:5]) == (454, b"4.7.0"), mailfw.output()
        assert client.noop()[0] == 250
    waitFor(
        lambda: "Dovecot auth check for alice failed" in mailfw.output(),
        timeout=10,
        what="mailfw's log line for the unreachable Dovecot",
    )
