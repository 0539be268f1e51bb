"""
End to end: virtual domains from a SQLite (and a PostgreSQL) hosting table
in a real C{twistd mailfw}, edited by the C{mailfw} command in another
process while the server runs.  A user added then is accepted and delivered to its
Maildir, an unknown user of the domain is refused 550 5.1.1 at RCPT time,
an alias expands, all without a restart.
"""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfw.tls import makeSelfSigned
from tests._postgres import requirePostgres
from tests.integration._server import MailfwProcess, running, waitFor

CONFIG = """
[routing]
plugin = "static"
virtual = "sqlite:hosting.sqlite"

[delivery.local]
plugin = "maildir"
path = "mail/{domain}/{user}"

[delivery.virtual-aliases]
plugin = "virtual-aliases"
virtual = "sqlite:hosting.sqlite"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailfwProcess]:
    base = tmp_path_factory.mktemp("virtual")
    config = base / "mailfw.toml"
    config.write_text(CONFIG)
    yield from running(base / "data", config=config)


def mailfw(server: MailfwProcess, *args: str, stdin: str | None = None) -> str:
    """
    Run the C{mailfw} command in its own process, as an operator would.
    """
    assert server.config is not None
    result = subprocess.run(
        [sys.executable, "-m", "mailfw", *args, "-c", str(server.config), "-d", str(server.dataDir)],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )
    assert result.returncode == 0, f"mailfw {' '.join(args)} failed: {result.stderr}"
    return result.stdout


def send(server: MailfwProcess, recipient: str, subject: str) -> None:
    with server.smtp() as client:
        refused = client.sendmail(
            "carol@elsewhere.test", [recipient], f"Subject: {subject}\r\n\r\nHello.\r\n".encode()
        )
        assert refused == {}


def containing(server: MailfwProcess, localpart: str, text: bytes) -> list[bytes]:
    found = [p.read_bytes() for p in server.delivered(localpart, "virtual.test")]
    return [data for data in found if text in data]


def test_userAddedWhileRunning(server: MailfwProcess) -> None:
    """
    Before the domain is hosted its mail is refused as relaying; after
    C{mailfw domain add} and C{mailfw user add} in another process, RCPT to
    the new user is accepted and the message reaches its Maildir, while an
    unknown user of the same domain gets 550 5.1.1 at RCPT time.
    """
    with server.smtp() as client:
        client.ehlo()
        client.mail("carol@elsewhere.test")
        code, _ = client.rcpt("alice@virtual.test")
        assert code == 554
    mailfw(server, "domain", "add", "virtual.test")
    assert "added mailbox alice@virtual.test" in mailfw(server, "user", "add", "alice@virtual.test")

    with server.smtp() as client:
        client.ehlo()
        client.mail("carol@elsewhere.test")
        code, text = client.rcpt("nobody@virtual.test")
        assert (code, text[:5]) == (550, b"5.1.1"), text
        code, text = client.rcpt("Alice@virtual.test")
        assert code == 250, text
        code, text = client.data(b"Subject: first\r\n\r\nHello.\r\n")
        assert code == 250, text
    # {user} in the path: one Maildir whatever case the client used.
    waitFor(lambda: containing(server, "alice", b"Subject: first"), what="delivery to alice's Maildir")


def test_unknownUserRefused(server: MailfwProcess) -> None:
    """
    smtplib sees the refusal of an unknown virtual user as a refused
    recipient, before any data is sent.
    """
    mailfw(server, "domain", "add", "virtual.test")
    with server.smtp() as client, pytest.raises(smtplib.SMTPRecipientsRefused) as raised:
        client.sendmail("carol@elsewhere.test", ["ghost@virtual.test"], b"Subject: x\r\n\r\nx\r\n")
    [(code, text)] = raised.value.recipients.values()
    assert (code, text[:5]) == (550, b"5.1.1")


def test_aliasAddedWhileRunning(server: MailfwProcess) -> None:
    """
    An alias added while the server runs expands into its targets'
    Maildirs, with C{Delivered-To:} naming the alias.
    """
    mailfw(server, "domain", "add", "virtual.test")
    mailfw(server, "user", "add", "bob@virtual.test")
    mailfw(server, "alias", "add", "team@virtual.test", "bob@virtual.test")
    send(server, "team@virtual.test", "team news")
    waitFor(lambda: containing(server, "bob", b"Subject: team news"), what="the alias expansion to bob")
    [copy] = containing(server, "bob", b"Subject: team news")
    assert b"Delivered-To: team@virtual.test" in copy
    assert "team@virtual.test\tbob@virtual.test" in mailfw(server, "alias", "list", "virtual.test")


def test_tableFileInDataDir(server: MailfwProcess) -> None:
    """
    The table is the SQLite file the configuration names, in the data
    directory.
    """
    assert (Path(server.dataDir) / "hosting.sqlite").exists()


AUTH_CONFIG = (
    CONFIG.replace("{", "{{").replace("}", "}}")
    + """
[tls]
certificate = "{cert}"
key = "{key}"

[auth]
passwords = "passwd"
"""
)


@pytest.fixture(scope="module")
def submissionServer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailfwProcess]:
    base = tmp_path_factory.mktemp("virtual-auth")
    cert, key = base / "cert.pem", base / "key.pem"
    makeSelfSigned("mx.test", cert, key)
    config = base / "mailfw.toml"
    config.write_text(AUTH_CONFIG.format(cert=cert, key=key))
    yield from running(base / "data", config=config)


def loggedIn(server: MailfwProcess, user: str, password: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.submissionPort, local_hostname="client.test", timeout=30)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo()
    assert client.login(user, password)[0] == 235
    return client


def test_senderRights(submissionServer: MailfwProcess) -> None:
    """
    A user made with C{mailfw user add --password} logs in on submission
    and may send as its own mailbox, not as another address until
    C{mailfw sender allow} grants it (from its next login).
    """
    server = submissionServer
    mailfw(server, "domain", "add", "virtual.test")
    mailfw(server, "user", "add", "dana@virtual.test", "--password", stdin="s3cret pw\n")
    with loggedIn(server, "dana@virtual.test", "s3cret pw") as client:
        assert client.mail("dana@virtual.test")[0] == 250
        client.rset()
        code, text = client.mail("sales@virtual.test")
        assert (code, text[:5]) == (553, b"5.7.1"), text
    mailfw(server, "sender", "allow", "dana@virtual.test", "sales@virtual.test")
    with loggedIn(server, "dana@virtual.test", "s3cret pw") as client:
        assert client.mail("sales@virtual.test")[0] == 250


@pytest.fixture(scope="module")
def postgresServer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MailfwProcess]:
    cluster = requirePostgres()
    dsn = cluster.createDatabase()
    try:
        base = tmp_path_factory.mktemp("virtual-pg")
        config = base / "mailfw.toml"
        config.write_text(CONFIG.replace("sqlite:hosting.sqlite", f"postgresql:{dsn}"))
        yield from running(base / "data", config=config)
    finally:
        cluster.dropDatabase(dsn)


def test_postgresUserAddedWhileRunning(postgresServer: MailfwProcess) -> None:
    """
    The same with the table in PostgreSQL: a user added by another process
    is accepted and delivered, an unknown one refused 550 5.1.1.
    """
    server = postgresServer
    mailfw(server, "domain", "add", "virtual.test")
    mailfw(server, "user", "add", "erin@virtual.test")
    with server.smtp() as client:
        client.ehlo()
        client.mail("carol@elsewhere.test")
        code, text = client.rcpt("nobody@virtual.test")
        assert (code, text[:5]) == (550, b"5.1.1"), text
    send(server, "erin@virtual.test", "via postgres")
    waitFor(lambda: containing(server, "erin", b"Subject: via postgres"), what="delivery to erin's Maildir")
