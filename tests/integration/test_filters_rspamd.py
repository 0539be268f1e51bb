"""
A real rspamd through the C{rspamd} policy: Debian's rspamd, started once
for this module as a private process on loopback (a private configuration
over Debian's, no Redis, no controller), scans what a real C{twistd mailfw}
receives, over HTTP with the message sent chunked.  The GTUBE test message
is refused with 5xx at the end of DATA; a clean message is delivered with
the result field.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration._server import MailfwProcess, freePort, requireTool, waitFor

# Debian's configuration, with one normal worker on a private port and the
# parts that need the network or Redis turned off.  local.d/options.inc sets
# url_tld to a small TLD list, because compiling the full one with
# Hyperscan takes rspamd over half a minute of CPU at each start.
RSPAMD_CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "notice";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
"""

# Modules that would wait for servers on the Internet, or score a clean
# message from 127.0.0.1 as suspicious only because DNS is unreachable.
DISABLED = ("fuzzy_check", "hfilter", "rbl", "surbl", "emails", "asn", "dcc", "neural")

MAILFW_CONFIG = """
[routing]
plugin = "static"
local_domains = ["localhost"]
[delivery.local]
plugin = "maildir"
[policy.spam]
plugin = "rspamd"
url = "http://127.0.0.1:{port}"
"""

GTUBE = (
    b"From: Spammer <spam@example.org>\r\nTo: bob@localhost\r\nSubject: test\r\n"
    b"Message-ID: <gtube@example.org>\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n\r\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
)
CLEAN = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@localhost>\r\nSubject: lunch\r\n"
    b"Message-ID: <clean@example.org>\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n\r\n"
    b"Shall we have lunch on Thursday?\r\n"
)


def _pong(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as reply:
            return bool(reply.read().startswith(b"pong"))
    except OSError:
        return False


@pytest.fixture(scope="module")
def rspamd() -> Iterator[int]:
    """
    A private rspamd for this module; yields its port.
    """
    program = requireTool("rspamd")
    directory = Path(tempfile.mkdtemp(prefix="mfrspamd"))
    for sub in ("local/override.d", "local/local.d", "db", "run"):
        (directory / sub).mkdir(parents=True)
    (directory / "tld.dat").write_text("com\nnet\norg\ntest\nexample\nlocalhost\n")
    (directory / "local" / "local.d" / "options.inc").write_text(f'url_tld = "{directory}/tld.dat";\n')
    for module in DISABLED:
        (directory / "local" / "override.d" / f"{module}.conf").write_text("enabled = false;\n")
    port = freePort()
    (directory / "rspamd.conf").write_text(RSPAMD_CONFIG.format(port=port))
    variables = {
        "CONFDIR": "/etc/rspamd",
        "LOCAL_CONFDIR": directory / "local",
        "DBDIR": directory / "db",
        "RUNDIR": directory / "run",
        "LOGDIR": directory,
    }
    args = [program, "-f", "-c", str(directory / "rspamd.conf")]
    if os.getuid() == 0:
        # rspamd refuses to run as root unless told which user to be.
        args += ["-u", "root", "-g", "root"]
    for name, value in variables.items():
        args += ["--var", f"{name}={value}"]
    log = (directory / "stderr.log").open("wb")
    child = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        waitFor(lambda: _pong(port) or child.poll() is not None, timeout=60, interval=0.2, what="rspamd")
        assert child.poll() is None, (directory / "stderr.log").read_text()
        yield port
    finally:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def start(tmp_path: Path, port: int) -> MailfwProcess:
    config = tmp_path / "mailfw.toml"
    config.write_text(MAILFW_CONFIG.format(port=port))
    return MailfwProcess(tmp_path / "data", config=config).start()


def test_gtubeRefused(tmp_path: Path, rspamd: int) -> None:
    """
    The GTUBE message is refused at the end of DATA with rspamd's reject
    (550 5.7.1 and its SMTP message), and nothing is delivered.
    """
    server = start(tmp_path, rspamd)
    try:
        with server.smtp() as client, pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("spam@example.org", ["bob@localhost"], GTUBE)
        assert refused.value.smtp_code == 550, refused.value
        error = refused.value.smtp_error
        assert isinstance(error, bytes) and error.startswith(b"5.7.1 "), refused.value
        assert server.delivered("bob") == []
    finally:
        server.stop()


def test_cleanAccepted(tmp_path: Path, rspamd: int) -> None:
    """
    A clean message, and a large one (sent chunked as it streams), are
    delivered with the result field.
    """
    server = start(tmp_path, rspamd)
    large = CLEAN.replace(b"lunch\r\n", b"minutes\r\n", 1) + b"The minutes follow, line by line.\r\n" * 40000
    try:
        with server.smtp() as client:
            assert client.sendmail("alice@example.org", ["bob@localhost"], CLEAN) == {}
            assert client.sendmail("alice@example.org", ["bob@localhost"], large) == {}
        waitFor(lambda: len(server.delivered("bob")) == 2, what="delivery")
        copies = sorted((path.read_bytes() for path in server.delivered("bob")), key=len)
    finally:
        server.stop()
    for copy in copies:
        header = copy.partition(b"\r\n\r\n")[0] if b"\r\n\r\n" in copy else copy.partition(b"\n\n")[0]
        assert b"X-Spam-Status: No, score=" in header, header
    assert len(copies[1]) > 1_000_000
