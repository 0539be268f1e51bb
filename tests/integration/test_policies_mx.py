"""
End to end: the MX policies in a real C{twistd mailfw} with a real DNS
server on loopback (L{tests.integration._dns}).

  - C{dnsbl}: a client connecting from 127.0.0.2, which the zone lists, is
    refused with 554 instead of the greeting, and the log names the zone;
    127.0.0.1, unlisted, is served.  127.0.0.4, listed in the allow zone
    too, is served, and the delivered copy's C{Authentication-Results:}
    says C{dnswl=pass}.
  - C{greylist}: the first attempt of a triplet gets 451; a retry after the
    (short) delay is accepted and delivered, also across a restart of the
    server, since the triplet is in the SQLite queue's database.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.integration._dns import dnsServer
from tests.integration._server import MailfwProcess, running, waitFor

GREYLIST_DELAY = 2

served = contextmanager(running)

CONFIG = """
[dns]
nameservers = ["127.0.0.1:{port}"]

[routing]
plugin = "static"
local_domains = ["localhost"]

[delivery.local]
plugin = "maildir"

[policy.rbl]
plugin = "dnsbl"
zones = {{ "bl.test=127.0.0.[2..11]" = 1 }}
allow_zones = ["wl.test"]

[policy.grey]
plugin = "greylist"
delay = {delay}
retry_window = 600
"""

ZONE = {
    # 127.0.0.2 is listed (a Spamhaus-style code); 127.0.0.3 only with the
    # "query refused" code, which must not count.
    "2.0.0.127.bl.test": [["A", "127.0.0.2"]],
    "3.0.0.127.bl.test": [["A", "127.255.255.254"]],
    # 127.0.0.4 is listed, and vouched for by the allow list.
    "4.0.0.127.bl.test": [["A", "127.0.0.2"]],
    "4.0.0.127.wl.test": [["A", "127.0.10.1"]],
}


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with dnsServer(ZONE, tmp_path_factory.mktemp("dns")) as port:
        yield port


def configFor(base: Path, dns: int) -> Path:
    config = base / "mailfw.toml"
    config.write_text(CONFIG.format(port=dns, delay=GREYLIST_DELAY))
    return config


def log(server: MailfwProcess) -> str:
    assert server.logPath is not None
    return server.logPath.read_text("utf-8", "replace")


def test_listedClientRefused(tmp_path: Path, dns: int) -> None:
    """
    A client whose address the DNSBL zone lists gets 554 instead of the
    greeting, and the log names the zone and the policy; an unlisted
    client, and one only answered with a "query refused" code, are greeted.
    """
    with served(tmp_path / "data", config=configFor(tmp_path, dns)) as server:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", server.smtpPort, source_address=("127.0.0.2", 0), timeout=30)
        assert refused.value.smtp_code == 554, refused.value
        assert b"bl.test" in refused.value.smtp_error
        waitFor(lambda: "listed in bl.test" in log(server), what="the listing in the log")
        assert "policy rbl refused connect from 127.0.0.2" in log(server)
        for source in ("127.0.0.1", "127.0.0.3"):
            with smtplib.SMTP("127.0.0.1", server.smtpPort, source_address=(source, 0), timeout=30) as client:
                assert client.noop()[0] == 250, source
        waitFor(
            lambda: "refused the query (127.255.255.254)" in log(server), what="the refused-query warning"
        )


def test_allowListed(tmp_path: Path, dns: int) -> None:
    """
    A client listed in the block list but also in the allow list is served,
    and its message's C{Authentication-Results:} field says C{dnswl=pass}
    with the zone (RFC 8904).
    """
    with served(tmp_path / "data", config=configFor(tmp_path, dns)) as server:
        # Past greylisting first: the triplet is deferred once.
        with smtplib.SMTP(
            "127.0.0.1", server.smtpPort, source_address=("127.0.0.4", 0), timeout=30
        ) as client:
            client.ehlo("client.test")
            client.mail("carol@sender.test")
            assert client.rcpt("bob@localhost")[0] == 451
        time.sleep(GREYLIST_DELAY + 0.5)
        with smtplib.SMTP(
            "127.0.0.1", server.smtpPort, source_address=("127.0.0.4", 0), timeout=30
        ) as client:
            client.sendmail("carol@sender.test", ["bob@localhost"], b"Subject: vouched\r\n\r\nHello.\r\n")
        waitFor(lambda: server.delivered("bob"), what="delivery of the allow-listed message")
        copy = server.delivered("bob")[0].read_bytes()
        header = " ".join(str(message_from_bytes(copy)["Authentication-Results"]).split())
        assert header.startswith("mx.test;"), header
        assert "dnswl=pass" in header, header
        assert "dns.zone=wl.test" in header, header


def test_greylistThenAccepted(tmp_path: Path, dns: int) -> None:
    """
    The first RCPT of a new triplet gets 451 4.7.1; after the delay (and a
    restart of the server in between) the same triplet is accepted and the
    message delivered.
    """
    dataDir = tmp_path / "data"
    config = configFor(tmp_path, dns)
    message = b"Subject: greylisted\r\n\r\nHello.\r\n"
    with served(dataDir, config=config) as server:
        with server.smtp() as client:
            client.ehlo()
            assert client.mail("alice@sender.test")[0] == 250
            code, text = client.rcpt("bob@localhost")
            assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
            # Too early: still greylisted.
            client.rset()
            client.mail("alice@sender.test")
            assert client.rcpt("bob@localhost")[0] == 451
        firstAttempt = time.monotonic()
    time.sleep(max(0.0, GREYLIST_DELAY - (time.monotonic() - firstAttempt)) + 0.5)
    with served(dataDir, config=config) as server:
        with server.smtp() as client:
            client.sendmail("alice@sender.test", ["bob@localhost"], message)
        waitFor(lambda: server.delivered("bob"), what="delivery of the retried message")
        assert b"greylisted" in server.delivered("bob")[0].read_bytes()
        assert "retried after" in log(server)
