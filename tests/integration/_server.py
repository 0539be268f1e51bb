"""
Running a real C{twistd mailfw} on 127.0.0.1 for end-to-end tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The twistd script installed beside this interpreter (the venv's).
TWISTD = str(Path(sys.executable).parent / "twistd")


def requireTool(name: str) -> str:
    """
    The path of a Debian tool a test needs.  Missing, it skips the test on a
    developer's machine but fails under CI (C{CI=true}), where C{.ci/run}
    must have installed it.
    """
    import pytest

    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/lib/postfix/sbin/{name}") if os.path.exists(p)),
        None,
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed (Debian package)")
    return path


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitFor(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """
    Poll C{predicate} until it is true, failing after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


@dataclass
class MailfwProcess:
    """
    One C{twistd -n mailfw} child with its ports and data directory.
    """

    dataDir: Path
    config: Path | None = None
    smtpPort: int = field(default_factory=freePort)
    submissionPort: int = field(default_factory=freePort)
    extraArgs: tuple[str, ...] = ()
    # False: no --logfile; twistd logs to its standard output, which is
    # then logPath.
    logfile: bool = True
    # twistd's own options (before "mailfw") and extra environment.
    twistdArgs: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    logPath: Path | None = None

    def start(self) -> MailfwProcess:
        self.dataDir.mkdir(parents=True, exist_ok=True)
        self.logPath = self.dataDir.parent / f"twistd-{self.smtpPort}.log"
        args = [
            TWISTD,
            "-n",
            "--pidfile=",
            *([f"--logfile={self.logPath}"] if self.logfile else []),
            *self.twistdArgs,
            "mailfw",
            f"--data-dir={self.dataDir}",
            "--hostname=mx.test",
            f"--smtp=tcp:{self.smtpPort}:interface=127.0.0.1",
            f"--submission=tcp:{self.submissionPort}:interface=127.0.0.1",
            # One process unless a test asks for workers: with a
            # configuration file the default is a process per core, which
            # would make every test's start-up and logs depend on the
            # machine (the workers tests ask for theirs).
            *(() if "--workers" in self.extraArgs else ("--workers", "1")),
            *self.extraArgs,
        ]
        if self.config is not None:
            args.append(f"--config={self.config}")
        env = None if self.env is None else {**os.environ, **self.env}
        if self.logfile:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
        else:
            with open(self.logPath, "wb") as out:
                self.process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
                )
        try:
            waitFor(self.ready, what=f"mailfw on port {self.smtpPort}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"mailfw did not start:\n{self.output()}") from None
        return self

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"mailfw exited with {self.process.returncode}:\n{self.output()}")
        return _accepting(self.smtpPort)

    def output(self) -> str:
        text = ""
        if self.process is not None and self.process.stdout is not None and self.process.poll() is not None:
            text += self.process.stdout.read().decode("utf-8", "replace")
        if self.logPath is not None and self.logPath.exists():
            text += self.logPath.read_text("utf-8", "replace")
        return text[-6000:]

    def kill(self) -> None:
        """
        SIGKILL: the crash test's way to stop.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtpPort, local_hostname="client.test", timeout=30)

    def maildir(self, localpart: str, domain: str = "localhost") -> Path:
        from mailfw.delivery import safeName

        return self.dataDir / "mail" / safeName(domain) / safeName(localpart)

    def delivered(self, localpart: str, domain: str = "localhost") -> list[Path]:
        new = self.maildir(localpart, domain) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


def running(dataDir: Path, **kwargs) -> Iterator[MailfwProcess]:  # type: ignore[no-untyped-def]
    server = MailfwProcess(dataDir, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
