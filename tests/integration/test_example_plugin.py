"""
The example third-party plugin (C{examples/webhook}), installed the way a
user installs it, and used by name from a configuration file.

The distribution is installed with an ordinary, non-editable C{pip install}
into a fresh virtual environment, so what is tested is what its
C{setup.cfg} ships: the package and the C{twisted/plugins/} dropin.  Its
dependencies (mailfw, Twisted) are not installed again: the new
environment gets a C{.pth} file that adds the running environment's
site-packages after its own (with L{site.addsitedir}, so the running
environment's own C{.pth} files, such as mailfw's editable install, work
too).  That keeps the test offline and fast: C{venv --without-pip}, then
the running environment's pip with C{--no-index --no-build-isolation},
which still checks that the requirements C{mailfw} and C{twisted} are
satisfied.

The environment is built once per module from a copy of the example, so
the build leaves no C{build/} or C{*.egg-info} in the checkout.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import site
import smtplib
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration._server import freePort, waitFor

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "webhook"

_IGNORE = shutil.ignore_patterns(
    "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache", "dropin.cache"
)

# What the console script twistd runs; the new environment has no twistd
# script of its own because Twisted comes from the running environment.
_TWISTD = "from twisted.scripts.twistd import run; run()"


def _run(args: list[str], timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def _parentSiteDirs() -> list[str]:
    """
    The running environment's site directories, in order, without repeats.
    """
    found: list[str] = []
    paths = sysconfig.get_paths()
    for directory in [*site.getsitepackages(), paths["purelib"], paths["platlib"]]:
        if directory not in found and os.path.isdir(directory):
            found.append(directory)
    return found


@dataclass
class Environment:
    """
    A virtual environment with mailfw-webhook installed.

    @ivar work: a scratch directory holding C{venv/} and C{src/}.
    @ivar source: the copy of C{examples/webhook} that was installed.
    @ivar purelib: the new environment's own site-packages.
    """

    work: Path
    source: Path
    python: Path
    purelib: Path


@pytest.fixture(scope="module")
def webhookEnv(tmp_path_factory: pytest.TempPathFactory) -> Environment:
    """
    A fresh virtual environment with C{pip install examples/webhook} done.
    """
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=_IGNORE)
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(_run([str(python), "-c", where]).stdout.strip())
    (purelib / "_mailfw_running_env.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in _parentSiteDirs())
    )
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--quiet",
            str(source),
        ],
        timeout=300,
    )
    return Environment(work, source, python, purelib)


def test_installedAsDistribution(webhookEnv: Environment) -> None:
    """
    pip installs mailfw-webhook as a distribution of its own (not
    editable) with its package and its dropin in the new environment, and
    mailfw finds the plugin there by name beside the bundled ones.
    """
    script = """
import importlib.metadata as md, json
import mailfw_webhook
import twisted.plugins.mailfw_webhook_agent as dropin
from mailfw.interfaces import IDeliveryAgentFactory
from mailfw.plugin import findPlugin
dist = md.distribution("mailfw-webhook")
print(json.dumps({
    "requires": dist.requires,
    "directURL": json.loads(dist.read_text("direct_url.json") or "{}"),
    "package": mailfw_webhook.__file__,
    "dropin": dropin.__file__,
    "webhook": findPlugin(IDeliveryAgentFactory, "webhook").target,
    "maildir": findPlugin(IDeliveryAgentFactory, "maildir").target,
}))
"""
    facts = json.loads(_run([str(webhookEnv.python), "-c", script], cwd=webhookEnv.work).stdout)
    purelib = webhookEnv.purelib.resolve()
    assert Path(facts["package"]).resolve() == purelib / "mailfw_webhook" / "__init__.py"
    assert Path(facts["dropin"]).resolve() == purelib / "twisted" / "plugins" / "mailfw_webhook_agent.py"
    assert not (purelib / "twisted" / "__init__.py").exists()
    assert not (purelib / "twisted" / "plugins" / "__init__.py").exists()
    assert facts["directURL"].get("dir_info", {}).get("editable", False) is False
    required = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in facts["requires"]}
    assert {"mailfw", "twisted"} <= required
    assert facts["webhook"] == "mailfw_webhook._agent:fromConfig"
    assert facts["maildir"] == "mailfw.delivery._maildir:fromConfig"


def test_exampleTestsPass(webhookEnv: Environment) -> None:
    """
    The example's own tests, conformance tests included, pass against the
    installed distribution.
    """
    result = subprocess.run(
        [
            str(webhookEnv.python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(webhookEnv.source / "tests"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        # Not the source directory: the installed package must be the one
        # imported.
        cwd=webhookEnv.work,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, output


# --- end to end ------------------------------------------------------------


@dataclass
class Post:
    """
    One request the webhook endpoint received.
    """

    path: str
    contentType: str | None
    contentLength: str | None
    sender: str | None
    recipients: list[str]
    queueID: str | None
    body: bytes
    status: int


class _InboxServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answers: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _InboxHandler)
        self.answers = answers
        self.received: queue.Queue[Post] = queue.Queue()


class _InboxHandler(BaseHTTPRequestHandler):
    server: _InboxServer

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        body = self.rfile.read(int(length)) if length is not None else b""
        status = self.server.answers.pop(0) if self.server.answers else 204
        self.server.received.put(
            Post(
                path=self.path,
                contentType=self.headers.get("Content-Type"),
                contentLength=length,
                sender=self.headers.get("X-Mail-From"),
                recipients=self.headers.get_all("X-Rcpt-To") or [],
                queueID=self.headers.get("X-Mail-Queue-ID"),
                body=body,
                status=status,
            )
        )
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _inbox(answers: list[int]) -> Iterator[_InboxServer]:
    server = _InboxServer(answers)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _smtpReady(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"220")
    except OSError:
        return False


@contextmanager
def _mailfw(env: Environment, directory: Path, url: str) -> Iterator[int]:
    """
    Run C{twistd -n mailfw} in C{env}, delivering C{@hooks.test} to the
    webhook at C{url}; yield its SMTP port.
    """
    config = directory / "mailfw.toml"
    config.write_text(
        f"""
[queue]
plugin = "sqlite"

[scheduler]
first_retry = 1
jitter = 0

[routing]
plugin = "static"
local_domains = ["hooks.test"]
local_agent = "hook"

[delivery.hook]
plugin = "webhook"
url = "{url}"
timeout = 10
"""
    )
    port = freePort()
    log = directory / "twistd.log"
    process = subprocess.Popen(
        [
            str(env.python),
            "-c",
            _TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "mailfw",
            f"--config={config}",
            f"--data-dir={directory / 'data'}",
            "--hostname=mx.test",
            f"--smtp=tcp:{port}:interface=127.0.0.1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=env.work,
    )

    def output() -> str:
        text = ""
        if process.poll() is not None and process.stdout is not None:
            text += process.stdout.read().decode("utf-8", "replace")
        if log.exists():
            text += log.read_text("utf-8", "replace")
        return text[-6000:]

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"mailfw exited with {process.returncode}:\n{output()}")
        return _smtpReady(port)

    try:
        try:
            waitFor(ready, timeout=30, what="twistd mailfw to accept SMTP")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{output()}") from None
        try:
            yield port
        except BaseException as e:
            # Say what the server logged, then let the failure through.
            e.add_note(f"twistd log:\n{output()}")
            raise
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _send(port: int, recipients: list[str]) -> None:
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = ", ".join(recipients)
    message["Subject"] = "webhook test"
    message.set_content("Hello from smtplib.\n.a line with a leading dot\n")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        assert client.send_message(message, "alice@example.org", recipients) == {}


def _posts(inbox: _InboxServer, until: int, timeout: float = 30) -> list[Post]:
    """
    The requests the endpoint receives, waiting (at most C{timeout}
    seconds) until there are C{until} of them.
    """
    posts: list[Post] = []
    deadline = time.monotonic() + timeout
    while len(posts) < until:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout}s: {len(posts)} of {until} requests")
        with suppress(queue.Empty):
            posts.append(inbox.received.get(timeout=remaining))
    return posts


def _checkPost(post: Post) -> None:
    assert post.path == "/inbox?token=t0ken"
    assert post.contentType == "message/rfc822"
    assert post.contentLength is not None and int(post.contentLength) == len(post.body)
    assert post.sender == "alice@example.org"
    assert post.queueID
    assert b"Subject: webhook test\r\n" in post.body
    assert b"\r\nHello from smtplib.\r\n.a line with a leading dot\r\n" in post.body


def test_deliversThroughTwistd(webhookEnv: Environment, tmp_path: Path) -> None:
    """
    twistd mailfw, configured with C{plugin = "webhook"}, POSTs a message
    sent with smtplib to the endpoint with its envelope, once per
    recipient group, and stops once the endpoint answers 204.
    """
    recipients = ["bob@hooks.test", "carol@hooks.test"]
    with _inbox([]) as inbox:
        url = f"http://127.0.0.1:{inbox.server_address[1]}/inbox?token=t0ken"
        with _mailfw(webhookEnv, tmp_path, url) as port:
            _send(port, recipients)
            posts: list[Post] = []
            while sorted(r for p in posts for r in p.recipients) != recipients:
                posts += _posts(inbox, 1)
                assert len(posts) <= len(recipients), posts
            for post in posts:
                _checkPost(post)
            assert len({p.queueID for p in posts}) == 1


def test_retriedAfterServerError(webhookEnv: Environment, tmp_path: Path) -> None:
    """
    An endpoint's 503 defers the message (a 4xx for the queue), and the
    queue tries again: the same message arrives a second time and the 204
    then delivers it.
    """
    with _inbox([503]) as inbox:
        url = f"http://127.0.0.1:{inbox.server_address[1]}/inbox?token=t0ken"
        with _mailfw(webhookEnv, tmp_path, url) as port:
            _send(port, ["bob@hooks.test"])
            first, second = _posts(inbox, 2)
            assert (first.status, second.status) == (503, 204)
            for post in (first, second):
                _checkPost(post)
                assert post.recipients == ["bob@hooks.test"]
            assert first.body == second.body
            assert first.queueID == second.queueID
