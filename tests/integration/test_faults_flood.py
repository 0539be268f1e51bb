"""
Clients that hold on: sessions that do not close after QUIT (with and
without TLS, on the SMTP, submission and submissions listeners), a flood of
10,000 connections, and slowloris clients that send one byte every 5 s.
Each test runs a real C{twistd mailfw} and real sockets on loopback.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfw.tls import makeSelfSigned
from tests.integration._faults import attempt, rssKiB
from tests.integration._server import MailfwProcess, freePort, waitFor

CONFIG = """
[tls]
certificate = "{cert}"
key = "{key}"

[routing]
plugin = "static"
local_domains = ["localhost"]

[delivery.local]
plugin = "discard"

[smtp]
{smtp}
"""


def serverWith(tmp: Path, smtp: str = "") -> MailfwProcess:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    makeSelfSigned("mx.test", cert, key)
    config = tmp / "mailfw.toml"
    config.write_text(CONFIG.format(cert=cert, key=key, smtp=smtp))
    submissions = freePort()
    process = MailfwProcess(
        tmp / "data",
        config=config,
        extraArgs=(f"--submissions=ssl:{submissions}:interface=127.0.0.1:privateKey={key}:certKey={cert}",),
    )
    process.submissionsPort = submissions  # type: ignore[attr-defined]
    return process.start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MailfwProcess]:
    process = serverWith(tmp_path)
    try:
        yield process
    finally:
        process.stop()


# --- a client that never closes -------------------------------------------------


class StubbornClient:
    """
    A client that says QUIT and then neither closes nor answers the
    server's TLS close_notify: TLS runs on an C{SSLObject} over memory
    buffers, so nothing is sent unless this class sends it.
    """

    def __init__(self, port: int, implicitTLS: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.buffer = b""
        if implicitTLS:
            self.startTLS()

    def startTLS(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.feed(self.sock.recv(65536))
        self.flush()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def feed(self, data: bytes) -> None:
        if not data:
            raise EOFError("server closed")
        self.incoming.write(data)

    def send(self, line: bytes) -> None:
        if self.tls is None:
            self.sock.sendall(line)
        else:
            self.tls.write(line)
            self.flush()

    def reply(self) -> bytes:
        """
        The next whole reply (its last line).
        """
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buffer = b"\r\n".join(lines[i + 1 :])
                    return line
            if self.tls is None:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("server closed")
                self.buffer += data
            else:
                try:
                    self.buffer += self.tls.read(65536)
                except ssl.SSLWantReadError:
                    self.feed(self.sock.recv(65536))

    def secondsUntilClosed(self, limit: float = 15.0) -> float:
        """
        Read (and drop) what comes until the server closes the TCP
        connection, without answering anything: how long that took.
        """
        started = time.monotonic()
        while time.monotonic() - started < limit:
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if ready:
                try:
                    if not self.sock.recv(65536):
                        return time.monotonic() - started
                except ConnectionResetError:
                    return time.monotonic() - started
        return float("inf")

    def close(self) -> None:
        self.sock.close()


def quitAndWait(port: int, startTLS: bool, implicitTLS: bool) -> float:
    client = StubbornClient(port, implicitTLS)
    try:
        assert client.reply().startswith(b"220")
        client.send(b"EHLO client.test\r\n")
        assert client.reply().startswith(b"250")
        if startTLS:
            client.send(b"STARTTLS\r\n")
            assert client.reply().startswith(b"220")
            client.startTLS()
            client.send(b"EHLO client.test\r\n")
            assert client.reply().startswith(b"250")
        client.send(b"QUIT\r\n")
        assert client.reply().startswith(b"221")
        return client.secondsUntilClosed()
    finally:
        client.close()


def test_closedAtOnceAfterQuit(server: MailfwProcess) -> None:
    """
    After QUIT's 221 the server closes the TCP connection at once, with
    and without TLS, on 25, 587 and 465, although the client answers
    nothing; and a crowd of such clients holds no slot for long.
    """
    cases = {
        "smtp plain": (server.smtpPort, False, False),
        "smtp STARTTLS": (server.smtpPort, True, False),
        "submission STARTTLS": (server.submissionPort, True, False),
        "submissions (465)": (server.submissionsPort, False, True),  # type: ignore[attr-defined]
    }
    seconds = {name: quitAndWait(*case) for name, case in cases.items()}
    print(
        "\nseconds from 221 to the server's close: " + ", ".join(f"{n} {s:.3f}" for n, s in seconds.items())
    )
    assert all(s < 1.0 for s in seconds.values()), seconds

    crowd: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        s = quitAndWait(server.submissionsPort, False, True)  # type: ignore[attr-defined]
        with lock:
            crowd.append(s)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    print(f"40 stubborn TLS clients at once: slowest close {max(crowd):.3f} s")
    assert len(crowd) == 40 and max(crowd) < 2.0, crowd


# --- a flood of connections -------------------------------------------------------------

FLOOD = 10_000
LIMIT = 500
PER_CLIENT = 400


def test_flood(tmp_path: Path) -> None:
    """
    10,000 connections from 127.0.0.2 opened as fast as they can be and
    kept open: the server answers 421 past its limits, a legitimate client
    on 127.0.0.1 sending a message every half second meanwhile has them
    accepted (half of them within 2 s, all of them in the end), the
    server's memory stays bounded, and after the flood all is as before.

    A connection that arrives while the kernel's accept queue is full
    waits for its SYN to be sent again (1 s, then 3 s): that, not mailfw,
    sets the slowest legitimate message, so the test bounds the median.
    """
    server = serverWith(
        tmp_path,
        f"max_connections = {LIMIT}\nmax_connections_per_client = {PER_CLIENT}\n"
        'connection_limit_exceptions = ["127.0.0.1/32"]',
    )
    assert server.process is not None
    flood: list[socket.socket] = []
    opened = threading.Event()
    timing: dict[str, float] = {}

    def open() -> None:
        started = time.monotonic()
        for _ in range(FLOOD):
            s = socket.socket()
            s.setblocking(False)
            s.bind(("127.0.0.2", 0))
            s.connect_ex(("127.0.0.1", server.smtpPort))
            flood.append(s)
        timing["opened"] = time.monotonic() - started
        opened.set()

    try:
        rssBefore = rssKiB(server.process.pid)
        flooder = threading.Thread(target=open, daemon=True)
        flooder.start()
        # What the flood is told: the greeting, or 421 past the limits.
        greetings = {b"220": 0, b"421": 0, b"": 0}
        seen: set[int] = set()
        latencies: list[float] = []
        codes: list[int] = []
        rssPeak = rssBefore
        started = time.monotonic()
        while time.monotonic() - started < 25 and not (opened.is_set() and len(seen) == FLOOD):
            sendStarted = time.monotonic()
            code = attempt(server.smtpPort, f"legit-{len(codes)}", timeout=10)
            codes.append(code)
            latencies.append(time.monotonic() - sendStarted)
            rssPeak = max(rssPeak, rssKiB(server.process.pid))
            for i, s in enumerate(list(flood)):
                if i in seen:
                    continue
                try:
                    data = s.recv(512)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                greetings[data[:3] if data[:3] in greetings else b""] += 1
                seen.add(i)
            time.sleep(0.5)
        latencies.sort()
        median = latencies[len(latencies) // 2]
        print(
            f"\nflood: {FLOOD} connections opened in {timing.get('opened', -1):.1f} s;"
            f" greeted 220: {greetings[b'220']}, 421: {greetings[b'421']}, closed or unanswered:"
            f" {greetings[b''] + len(flood) - len(seen)};"
            f" {len(codes)} legitimate messages: {codes.count(250)} accepted, latency median {median:.2f} s,"
            f" max {latencies[-1]:.2f} s; server RSS {rssBefore} KiB before, peak {rssPeak} KiB"
        )
        assert opened.is_set(), "the flood was not even opened"
        assert greetings[b"220"] <= PER_CLIENT, greetings
        # Every flood connection answered past the first PER_CLIENT got 421
        # (the rest still wait for their SYN to be sent again).
        assert greetings[b"421"] >= 1000 and greetings[b""] == 0, greetings
        assert median < 2.0, f"the legitimate messages took {median:.2f} s (median)"
        assert rssPeak - rssBefore < 100 * 1024, "the flood grew the server by more than 100 MiB"
        refused = [c for c in codes if c != 250]
        assert set(refused) <= {0}, f"a legitimate message was refused: {codes}"
    finally:
        for s in flood:
            s.close()
    try:
        waitFor(
            lambda: attempt(server.smtpPort, "legit-after-flood", timeout=10) == 250,
            timeout=20,
            what="the server to accept mail after the flood",
        )
        sendStarted = time.monotonic()
        assert attempt(server.smtpPort, "legit-after-flood-2") == 250
        print(
            f"after the flood: a message in {time.monotonic() - sendStarted:.2f} s, RSS {rssKiB(server.process.pid)} KiB"
        )
    finally:
        server.stop()


# --- slowloris -------------------------------------------------------------------------

SLOW = 50
IDLE = 8
SESSION = 12


def test_slowloris(tmp_path: Path) -> None:
    """
    50 clients each send one byte every 5 s, never idle for the 8 s idle
    timeout: every session ends with 421 4.4.2 at the 12 s session time
    limit, and a legitimate client is served meanwhile.
    """
    server = serverWith(tmp_path, f"idle_timeout = {IDLE}\nmax_session_time = {SESSION}")
    clients = [socket.create_connection(("127.0.0.1", server.smtpPort), timeout=5) for _ in range(SLOW)]
    try:
        started = time.monotonic()
        ended: dict[int, tuple[float, bytes]] = {}
        text = b"EHLO slow.client.test and on and on and on and on\r\n"
        n = 0
        code = 0
        while len(ended) < SLOW and time.monotonic() - started < SESSION + 10:
            for i, c in enumerate(clients):
                if i in ended:
                    continue
                try:
                    c.sendall(text[n % len(text) : n % len(text) + 1])
                except OSError:
                    ended[i] = (time.monotonic() - started, b"(reset)")
            waitUntil = time.monotonic() + 5
            while time.monotonic() < waitUntil:
                ready, _, _ = select.select([c for i, c in enumerate(clients) if i not in ended], [], [], 0.2)
                for c in ready:
                    i = clients.index(c)
                    try:
                        data = c.recv(4096)
                    except OSError:
                        data = b""
                    if not data or b"421" in data:
                        ended[i] = (time.monotonic() - started, data.strip())
            if n == 1:
                code = attempt(server.smtpPort, "legit-during-slowloris")
            n += 1
        times = sorted(t for t, _ in ended.values())
        print(
            f"\nslowloris: {len(ended)} of {SLOW} sessions ended, after {times[0]:.1f} to {times[-1]:.1f} s;"
            f" legitimate message {code}"
        )
        assert len(ended) == SLOW, f"{SLOW - len(ended)} sessions still open after {SESSION + 10} s"
        assert all(SESSION - 1 <= t <= SESSION + 6 for t in times), times
        assert all(b"421 4.4.2" in data or b"421" in data for _, data in ended.values()), ended
        assert code == 250
    finally:
        for c in clients:
            c.close()
        server.stop()
