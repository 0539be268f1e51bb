"""
A real filter through the milter policy: Debian's OpenDKIM, started by the
test as a private process on loopback, signs mail that a real C{twistd
mailfw} receives; the delivered copy carries its C{DKIM-Signature:}, and
dkimpy verifies it against the key OpenDKIM's own tool made.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from tests.integration._server import MailfwProcess, freePort, requireTool, waitFor

OPENDKIM_CONFIG = """\
Socket inet:{port}@127.0.0.1
Mode sv
Domain example.org
Selector test
KeyFile {key}
Canonicalization relaxed/simple
Background no
PidFile {directory}/opendkim.pid
Syslog no
RequireSafeKeys no
"""

MAILFW_CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
[policy.signer]
plugin = "milter"
address = "inet:127.0.0.1:{port}"
default_action = "{default}"
"""


@pytest.fixture
def opendkim(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """
    A private OpenDKIM signing for example.org; yields its port and the
    public key record to publish.
    """
    program = requireTool("opendkim")
    genkey = requireTool("opendkim-genkey")
    directory = tmp_path / "opendkim"
    directory.mkdir()
    subprocess.run([genkey, "-D", str(directory), "-d", "example.org", "-s", "test"], check=True, timeout=60)
    port = freePort()
    config = directory / "opendkim.conf"
    config.write_text(OPENDKIM_CONFIG.format(port=port, key=directory / "test.private", directory=directory))
    log = (directory / "opendkim.log").open("wb")
    child = subprocess.Popen([program, "-f", "-x", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        waitFor(lambda: _listening(port) or child.poll() is not None, what="opendkim")
        assert child.poll() is None, (directory / "opendkim.log").read_text()
        record = "".join(re.findall(r'"([^"]*)"', (directory / "test.txt").read_text()))
        yield port, record
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        log.close()


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def start(tmp_path: Path, port: int, default: str = "tempfail") -> MailfwProcess:
    config = tmp_path / "mailfw.toml"
    config.write_text(MAILFW_CONFIG.format(port=port, default=default))
    return MailfwProcess(tmp_path / "data", config=config).start()


MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@localhost\r\nSubject: sign me\r\n\r\nHello from mailfw.\r\n"
)


def test_signedByOpenDKIM(tmp_path: Path, opendkim: tuple[int, str]) -> None:
    """
    The message reaches the Maildir signed by OpenDKIM, and the signature
    verifies.
    """
    port, record = opendkim
    server = start(tmp_path, port)
    try:
        with server.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@localhost"], MESSAGE) == {}
        waitFor(lambda: server.delivered("bob"), what="delivery")
        [path] = server.delivered("bob")
        copy = path.read_bytes()
    finally:
        server.stop()
    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/simple; d=example.org; s=test;" in copy, copy

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"test._domainkey.example.org.", name
        return record.encode("ascii")

    assert dkim.verify(copy, dnsfunc=dnsfunc)


def test_filterDownDefers(tmp_path: Path) -> None:
    """
    With nothing listening at the filter's address, mail is deferred with
    451 4.7.1 (default_action = "tempfail"), never accepted unfiltered, and
    the log names the filter.
    """
    server = start(tmp_path, freePort())
    try:
        with server.smtp() as client:
            client.ehlo()
            code, text = client.mail("alice@example.org")
        assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
        assert "milter signer (inet:127.0.0.1:" in server.output()
    finally:
        server.stop()
