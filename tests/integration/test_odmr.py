"""
End to end: ODMR (RFC 2645) against a real C{twistd mailfw}.  Mail for
C{customer.test} arrives over SMTP and waits; a customer written here with
C{socket} and C{ssl} connects to the odmr port, does STARTTLS, AUTH and
ATRN, then answers as an SMTP server on the same connection and collects
every message once; the queue is empty after.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailfw.tls import makeSelfSigned
from tests.integration._server import MailfwProcess, freePort, waitFor

MAILFW = str(Path(sys.executable).parent / "mailfw")
USER = "customer@customer.test"
PASSWORD = "correct horse battery"
TIMEOUT = 30

CONFIG = """
[tls]
certificate = "{cert}"
key = "{key}"
[auth]
passwords = "passwd"
penalty_delay = 0.1
[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]
transport = {{ "customer.test" = "outbound:[127.0.0.1]:9", "elsewhere.test" = "outbound:[127.0.0.1]:9" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
[odmr]
domains = ["customer.test", "elsewhere.test"]
"""


def startServer(tmp_path: Path, extra: str = "", workers: int = 1) -> MailfwProcess:
    data = tmp_path / "data"
    data.mkdir()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    makeSelfSigned("mx.test", cert, key)
    made = subprocess.run(
        [MAILFW, "passwd", "add", USER, "--file", str(data / "passwd"), "--etrn", "customer.test"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert made.returncode == 0, made.stderr
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(cert=cert, key=key) + extra)
    odmr = freePort()
    process = MailfwProcess(
        data,
        config=config,
        extraArgs=(f"--odmr=tcp:{odmr}:interface=127.0.0.1", "--workers", str(workers)),
    )
    process.odmrPort = odmr  # type: ignore[attr-defined]
    return process.start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MailfwProcess]:
    process = startServer(tmp_path)
    try:
        yield process
    finally:
        process.stop()


def listed(server: MailfwProcess) -> list[dict[str, Any]]:
    result = subprocess.run(
        [MAILFW, "queue", "list", "--json", "--data-dir", str(server.dataDir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def states(server: MailfwProcess) -> list[tuple[str, str]]:
    return sorted((r["address"], r["state"]) for m in listed(server) for r in m["recipients"])


class Customer:
    """
    The customer's side of one ODMR connection: an SMTP client until ATRN
    is accepted, an SMTP server after.
    """

    def __init__(self, port: int) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=TIMEOUT
        )
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed; unread {self.buffer!r}")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return int(lines[0][:3]), [line[4:] for line in lines]

    def ask(self, command: bytes) -> tuple[int, list[bytes]]:
        self.sock.sendall(command + b"\r\n")
        return self.reply()

    def secure(self) -> None:
        """
        Greeting, EHLO, STARTTLS, EHLO again.
        """
        assert self.reply()[0] == 220
        code, keywords = self.ask(b"EHLO customer.test")
        assert code == 250 and b"STARTTLS" in keywords and b"ATRN" in keywords, keywords
        assert self.ask(b"STARTTLS")[0] == 220
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.test")
        code, keywords = self.ask(b"EHLO customer.test")
        assert code == 250 and any(k.startswith(b"AUTH ") for k in keywords), keywords

    def login(self) -> None:
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        assert self.ask(b"AUTH PLAIN " + token)[0] == 235

    def collect(self) -> list[tuple[bytes, list[bytes], bytes]]:
        """
        Answer as the SMTP server until QUIT; return each message taken.
        """
        self.sock.sendall(b"220 customer.test ODMR client ready\r\n")
        messages: list[tuple[bytes, list[bytes], bytes]] = []
        mail = b""
        rcpts: list[bytes] = []
        while True:
            command = self.line()
            verb = command[:4].upper()
            if verb == b"EHLO":
                self.sock.sendall(b"250-customer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                mail, rcpts = command, []
                self.sock.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(command[command.index(b"<") + 1 : command.index(b">")])
                self.sock.sendall(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                self.sock.sendall(b"354 go on\r\n")
                lines = []
                while (data := self.line()) != b".":
                    lines.append(data)
                messages.append((mail, rcpts, b"\r\n".join(lines)))
                self.sock.sendall(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                self.sock.sendall(b"221 2.0.0 bye\r\n")
                return messages
            else:
                self.sock.sendall(b"502 5.5.1 not here\r\n")


def test_collect(server: MailfwProcess) -> None:
    """
    Held mail for customer.test waits in state etrn; ATRN before AUTH gets
    530 and for a domain that is not the user's 450; after AUTH, ATRN
    customer.test reverses the connection and every message arrives once,
    the other domain's mail stays, and a second ATRN finds no mail.
    """
    subjects = [f"odmr message {n}" for n in range(5)]
    with server.smtp() as client:
        for n, subject in enumerate(subjects):
            recipients = ["a@customer.test"] if n % 2 else ["a@customer.test", "b@customer.test"]
            client.sendmail("alice@localhost", recipients, f"Subject: {subject}\r\n\r\nbody {n}\r\n".encode())
        client.sendmail("alice@localhost", ["x@elsewhere.test"], b"Subject: not yours\r\n\r\nx\r\n")
    waitFor(
        lambda: [state for _, state in states(server)] == ["etrn"] * 9,
        what="the recipients held for ATRN",
    )

    port = server.odmrPort  # type: ignore[attr-defined]
    customer = Customer(port)
    try:
        customer.secure()
        assert customer.ask(b"ATRN customer.test")[0] == 530
        assert customer.ask(b"MAIL FROM:<a@customer.test>")[0] == 502
        customer.login()
        code, text = customer.ask(b"ATRN elsewhere.test")
        assert code == 450, text
        code, text = customer.ask(b"ATRN customer.test")
        assert (code, text) == (250, [b"2.0.0 OK now reversing the connection"])
        messages = customer.collect()
    finally:
        customer.close()

    taken = sorted(data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for _, _, data in messages)
    assert [s for s in taken if s.startswith("odmr")] == subjects
    assert len(messages) == len(subjects)
    assert sum(len(rcpts) for _, rcpts, _ in messages) == 8
    waitFor(
        lambda: states(server) == [("x@elsewhere.test", "etrn")], what="the collected mail to leave the queue"
    )

    again = Customer(port)
    try:
        again.secure()
        again.login()
        assert again.ask(b"ATRN customer.test")[0] == 453
        assert again.ask(b"QUIT")[0] == 221
    finally:
        again.close()


def atrn(port: int) -> list[tuple[bytes, list[bytes], bytes]]:
    """
    One customer session: ATRN customer.test, and what it collected
    (nothing after a 453).
    """
    customer = Customer(port)
    try:
        customer.secure()
        customer.login()
        code, text = customer.ask(b"ATRN customer.test")
        if code == 453:
            customer.ask(b"QUIT")
            return []
        assert code == 250, text
        return customer.collect()
    finally:
        customer.close()


def test_workersShareNothing(tmp_path: Path) -> None:
    """
    With two worker processes and a batch of 3, four customers that ATRN
    at once each collect different mail (the process that received the
    ATRN leases it; the other leaves it alone), and ATRN again until 453
    collects the rest: every message arrives exactly once.
    """
    server = startServer(tmp_path, extra="batch = 3\n", workers=2)
    try:
        subjects = [f"worker message {n}" for n in range(20)]
        with server.smtp() as client:
            for n, subject in enumerate(subjects):
                client.sendmail(
                    "alice@localhost", ["a@customer.test"], f"Subject: {subject}\r\n\r\n{n}\r\n".encode()
                )
        waitFor(lambda: [state for _, state in states(server)] == ["etrn"] * 20, what="20 held recipients")
        port = server.odmrPort  # type: ignore[attr-defined]
        with ThreadPoolExecutor(4) as pool:
            batches = list(pool.map(lambda _: atrn(port), range(4)))
        for _ in range(10):
            collected = atrn(port)
            if not collected:
                break
            batches.append(collected)
        taken = [
            data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for b in batches for _, _, data in b
        ]
        assert sorted(taken) == sorted(subjects)
        assert all(len(b) <= 3 for b in batches)
        waitFor(lambda: states(server) == [], what="the queue to empty")
    finally:
        server.stop()
