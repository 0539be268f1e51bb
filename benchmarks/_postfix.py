"""
A private, throw-away Postfix instance for the accept benchmark.

The instance lives entirely in one temporary directory (its own
C{config_directory}, C{queue_directory} and C{data_directory}), listens on
one loopback port, accepts mail for one test domain and hands every message
to the C{discard} transport.  Everything else is Postfix's default, in
particular its queue: C{cleanup} writes each message to a queue file and
fsyncs it before C{smtpd} answers 250, which is the durability mailfw is
compared against.

The system's own Postfix configuration (C{/etc/postfix}) is never read for
settings or changed: C{postfix -c DIR} reads only C{DIR/main.cf}, and
C{meta_directory} (which holds C{postfix-files}, read-only) stays at its
default.  Running the instance needs root, because the master daemon does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostfixError", "PostfixInstance", "findProgram", "waitForBanner"]

POSTFIX = "/usr/sbin/postfix"


class PostfixError(Exception):
    """
    The private instance could not be set up, started or stopped.
    """


def findProgram(name: str) -> str:
    """
    Find a Postfix tool that Debian installs in one of two places.
    """
    for directory in ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise PostfixError(f"{name} not found (install the Debian 'postfix' package)")
    return found


# Every service the default Debian master.cf defines that a discard-only
# instance can reach, with chroot off (a chroot needs copies of /etc files
# in the queue directory and changes nothing about the speed).
_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
local      unix  - n n -     - local
virtual    unix  - n n -     - virtual
lmtp       unix  - - n -     - lmtp
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


class PostfixInstance:
    """
    One private Postfix instance in a temporary directory.

    With C{relayTo}, the domain is not local but relayed with Postfix's
    C{smtp} client to that loopback port (the relay benchmark's sink).

    Use L{start}, then L{stop} (which also removes the directory) in a
    C{finally:} block; L{stop} is safe to call more than once and after a
    failed L{start}.

    @ivar port: the loopback port C{smtpd} listens on.
    @ivar domain: the domain it accepts (and discards) mail for.
    @ivar root: the instance's directory.
    """

    def __init__(
        self, port: int, domain: str = "bench.test", parent: str | None = None, relayTo: int | None = None
    ) -> None:
        self.port = port
        self.domain = domain
        self.relayTo = relayTo
        self.root = Path(tempfile.mkdtemp(prefix="mailfw-bench-postfix-", dir=parent))
        # Postfix wants the queue directory owned by root and not
        # world-writable along the way; mkdtemp gives 0700 root.
        os.chmod(self.root, 0o755)
        self.configDir = self.root / "etc"
        self.queueDir = self.root / "spool"
        self.dataDir = self.root / "lib"
        self.logFile = self.root / "maillog"
        self._started = False
        self._removed = False

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.configDir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "MAIL_CONFIG": str(self.configDir)},
        )

    def writeConfig(self) -> None:
        """
        Write C{main.cf} and C{master.cf}.
        """
        self.configDir.mkdir(mode=0o755)
        main = {
            "compatibility_level": "3.6",
            "config_directory": str(self.configDir),
            "queue_directory": str(self.queueDir),
            "data_directory": str(self.dataDir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"postfix.{self.domain}",
            "mydomain": self.domain,
            "myorigin": self.domain,
            "mydestination": self.domain,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "relay_domains": "",
            # Every way out is the discard transport: a message is durably
            # queued by cleanup, then the queue manager discards it.
            "local_transport": "discard:",
            "virtual_transport": "discard:",
            "relay_transport": "discard:",
            "default_transport": "discard:",
            # Accept any local part (no passwd/alias lookups).
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # Log to a file so that the benchmark can count deliveries; the
            # Debian default logs the same lines to syslog.
            "maillog_file": str(self.logFile),
            "maillog_file_prefixes": str(self.root),
            "smtputf8_enable": "no",
        }
        if self.relayTo is not None:
            # Relay the domain to 127.0.0.1:relayTo with the smtp client
            # (connection cache, destination concurrency: the defaults).
            main.update(
                {
                    "mydestination": "",
                    "relay_domains": self.domain,
                    "relayhost": f"[127.0.0.1]:{self.relayTo}",
                    "relay_transport": "smtp:",
                    "default_transport": "smtp:",
                    "smtp_dns_support_level": "disabled",
                }
            )
        text = "".join(f"{key} = {value}\n" for key, value in main.items())
        (self.configDir / "main.cf").write_text(text)
        (self.configDir / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def start(self, timeout: float = 30) -> None:
        """
        Create the queue directories (C{postfix check}), start the master
        and wait until C{smtpd} answers on the port.

        @raise PostfixError: with Postfix's own words when it refuses.
        """
        if os.geteuid() != 0:
            raise PostfixError("running a private Postfix instance needs root")
        self.writeConfig()
        self.queueDir.mkdir(mode=0o755)
        self.dataDir.mkdir(mode=0o700)
        shutil.chown(self.dataDir, "postfix", "postfix")
        check = self._postfix("check")
        if check.returncode != 0:
            raise PostfixError(f"postfix check failed: {check.stderr.strip()}")
        started = self._postfix("start")
        self._started = True
        if started.returncode != 0:
            raise PostfixError(f"postfix start failed: {started.stderr.strip()}")
        waitForBanner(self.port, timeout)

    def masterPID(self) -> int:
        """
        The master daemon's process id, from its pid file.
        """
        return int((self.queueDir / "pid" / "master.pid").read_text().split()[0])

    def stop(self, timeout: float = 20) -> None:
        """
        Stop the instance (C{postfix stop}, then C{postfix abort}, then
        SIGKILL to the master) and remove its directory.
        """
        if self._removed:
            return
        try:
            if self._started:
                self._stopMaster(timeout)
        finally:
            self._removed = True
            shutil.rmtree(self.root, ignore_errors=True)

    def _stopMaster(self, timeout: float) -> None:
        try:
            pid: int | None = self.masterPID()
        except (OSError, ValueError, IndexError):
            pid = None
        for command in ("stop", "abort"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix(command, timeout=timeout)
            if pid is None or _waitGone(pid, timeout / 2):
                break
        else:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                _waitGone(pid, timeout / 2)
        self._started = False


def _waitGone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def waitForBanner(port: int, timeout: float) -> None:
    """
    Wait until something on 127.0.0.1:C{port} sends a 220 greeting.
    """
    import socket

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(max(0.1, min(5, deadline - time.monotonic())))
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = PostfixError(f"unexpected greeting {greeting[:80]!r}")
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise PostfixError(f"nothing greets on 127.0.0.1:{port} after {timeout}s: {last}")
