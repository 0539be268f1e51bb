"""
Real peers for end-to-end tests: Postfix's C{smtp-sink} on a loopback
address, and a private Dovecot (LMTP, or its authentication service).

Addresses: 127.0.0.2 runs the SMTP peers; 127.0.0.3 has nothing listening,
so connections to it are refused (a dead MX host).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.integration._server import freePort, requireTool, waitFor

PEER = "127.0.0.2"
DEAD = "127.0.0.3"


def freePortOn(host: str) -> int:
    """
    A TCP port free on C{host} and on L{DEAD}, so that the same port
    number refuses connections on the dead MX host.
    """
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind((DEAD, port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port")


# --- smtp-sink -------------------------------------------------------------


@dataclass
class Sink:
    port: int
    dumps: Path
    process: subprocess.Popen[bytes]

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dumps.iterdir())]


def startSink(tmp: Path, *extra: str) -> Sink:
    binary = requireTool("smtp-sink")
    port = freePortOn(PEER)
    dumps = tmp / f"sink-{port}"
    dumps.mkdir()
    process = subprocess.Popen(
        [binary, "-u", "root", "-h", "mx-up.test", "-d", f"{dumps}/m.", *extra, f"{PEER}:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"smtp-sink exited with {process.returncode}")
        with socket.socket() as s:
            return s.connect_ex((PEER, port)) == 0

    waitFor(listening, timeout=10, what="smtp-sink")
    return Sink(port, dumps, process)


def stopSink(sink: Sink) -> None:
    sink.process.terminate()
    try:
        sink.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        sink.process.kill()
        sink.process.wait(timeout=5)


# --- Dovecot ---------------------------------------------------------------

DOVECOT = "/usr/sbin/dovecot"

DOVECOT_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = mailfw-test-{port}
protocols = {protocols}
listen = 127.0.0.1
ssl = no
{users}
auth_username_format = %Ln
first_valid_uid = {uid}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}
{services}
"""

LMTP_SERVICES = """\
service lmtp {{
  unix_listener lmtp-mailfw {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""

AUTH_SERVICES = """\
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
  inet_listener auth-inet {{
    address = 127.0.0.1
    port = {port}
  }}
}}
"""


def _alive(pid: int) -> bool:
    """
    Whether process C{pid} still runs (a zombie does not: orphans here may
    never be reaped).
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Dovecot:
    """
    A throwaway Dovecot, its configuration, users and sockets in a
    temporary directory: by default an LMTP server, with C{protocols=""}
    and C{services=AUTH_SERVICES} only the authentication service.

    @ivar socket: the unix socket of the service (C{socketName} in
        C{run/}); the service also listens on 127.0.0.1 at C{port}.
    """

    def __init__(
        self,
        passwords: Mapping[str, str] | None = None,
        protocols: str = "lmtp",
        services: str = LMTP_SERVICES,
        socketName: str = "lmtp-mailfw",
    ) -> None:
        if passwords is None:
            passwords = {"alice": "x", "bob": "x"}
        # Short path: unix socket names are limited to about 100 octets.
        self.root = Path(tempfile.mkdtemp(prefix="mfdv"))
        self.port = freePort()
        self.socket = self.root / "run" / socketName
        uid, gid = os.getuid(), os.getgid()
        if uid == 0:
            # Dovecot will not deliver as root; mail belongs to nobody.
            mailUID, mailGID = 65534, 65534
            users = ""
        else:
            mailUID, mailGID = uid, gid
            name = pwd.getpwuid(uid).pw_name
            users = f"default_internal_user = {name}\ndefault_login_user = {name}"
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir()
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "mail", 0o777)
        (self.root / "passwd").write_text(
            "".join(
                f"{user}:{{PLAIN}}{password}:{mailUID}:{mailGID}::{self.root}/mail/{user}::\n"
                for user, password in passwords.items()
            )
        )
        (self.root / "dovecot.conf").write_text(
            DOVECOT_CONFIG.format(
                root=self.root,
                port=self.port,
                protocols=protocols,
                users=users,
                uid=min(mailUID, 500),
                services=services.format(port=self.port),
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [DOVECOT, "-c", str(self.root / "dovecot.conf"), "-F"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot exited: {self.output()}")
            if self.socket.exists() and self._listening():
                return
            time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start: {self.output()}")

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def output(self) -> str:
        log = self.root / "dovecot.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def _children(self) -> list[int]:
        """
        The processes Dovecot's master started (auth, log, config, ...).
        """
        assert self.process is not None
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                children.append(int(stat.parent.name))
        return children

    def stop(self) -> None:
        """
        Stop Dovecot as systemd does, with SIGTERM to the master and every
        child (the auth process would otherwise outlive the master while
        clients are connected), and wait until all are gone; the files
        stay until L{remove}.
        """
        if self.process is not None and self.process.poll() is None:
            children = self._children()
            self.process.send_signal(signal.SIGTERM)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
            waitFor(
                lambda: not any(_alive(pid) for pid in children),
                timeout=15,
                what="Dovecot's processes to exit",
            )
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def messages(self, user: str) -> list[bytes]:
        new = self.root / "mail" / user / "Maildir" / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


def requireDovecot() -> None:
    """
    Fail (not skip) when Dovecot is missing: CI installs it (C{.ci/run}),
    and a silently skipped real-server test would hide a broken client.
    """
    import pytest

    if not os.access(DOVECOT, os.X_OK):
        pytest.fail("Dovecot is not installed (Debian: dovecot-core, dovecot-lmtpd)")
