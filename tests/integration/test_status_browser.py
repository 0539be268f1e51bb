"""
The status page of a real C{twistd mailfw} in a real headless browser
(Debian's chromium and chromium-driver, through selenium): a live session
and the queue appear and update as the page polls, and client-controlled
strings stay text.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._server import MailfwProcess, requireTool, waitFor
from tests.integration.test_ops import get, writeConfig

# A sender whose quoted local part is HTML: a page that does not escape it
# would show a bold element.
HOSTILE = '"<b>x</b>"@client.test'


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = requireTool("chromium")
    driverPath = requireTool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driverPath), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(condition: Callable[[], bool], what: str) -> None:
    # The page polls every 0.3 s; give a loaded machine ample time.
    waitFor(condition, timeout=30, interval=0.2, what=what)


def test_statusPageUpdates(tmp_path: Path, browser: Any) -> None:
    """
    The page shows no session, then the open session with its HELO name,
    the refusal of a hostile sender as text, the queued message by state
    and domain, and no session again once the client quits, all without
    reloading.
    """
    config, port = writeConfig(tmp_path)
    process = MailfwProcess(tmp_path / "data", config=config).start()
    try:
        waitFor(lambda: get(port, "/healthz")[0] == 200, what="the metrics endpoint")
        browser.get(f"http://127.0.0.1:{port}/status")

        # Read in one script call: the page replaces its rows as it polls,
        # so element handles go stale.
        def text(id: str) -> str:
            return str(browser.execute_script("return document.getElementById(arguments[0]).textContent", id))

        def cells(table: str) -> list[str]:
            found = browser.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map((td) => td.textContent)",
                f"#{table} tbody td",
            )
            return [str(t) for t in found]

        until(lambda: text("sessionsCount") == "0", "no session")
        with process.smtp() as client:
            client.ehlo("client.test")
            until(lambda: text("sessionsCount") == "1", "the session to appear")
            until(lambda: "client.test" in cells("sessions"), "the session's HELO name")
            assert "smtp" in cells("sessions")
            code, _ = client.docmd(f"MAIL FROM:<{HOSTILE}>")
            assert code == 250
            code, _ = client.docmd("RCPT TO:<someone@elsewhere.example>")
            assert 500 <= code < 600
            client.rset()
            until(lambda: HOSTILE in cells("refusals"), "the refusal with the sender as text")
            assert browser.execute_script("return document.querySelectorAll('#refusals b').length") == 0
            client.sendmail("sender@client.test", ["carol@down.test"], "Subject: waits\r\n\r\nwaits\r\n")
            until(lambda: cells("queueDomains") == ["down.test", "1"], "the queued message's domain")
            until(lambda: "ready" in cells("queueStates"), "the queued message's state")
            assert text("summary").startswith("queue: 1 messages")
        until(lambda: text("sessionsCount") == "0", "the session to go")
        until(lambda: "deferred" in cells("deliveries"), "the deferral in recent deliveries")
        # down.test's transport entry names the next hop: [127.0.0.1]:port.
        until(lambda: cells("backoff")[:1] == ["outbound"], "the destination in backoff")
        assert cells("backoff")[1].startswith("[127.0.0.1]:") and cells("backoff")[3] == "4.4.1"
        # The page as the server renders it escapes the sender too.
        status, page = get(port, "/status")
        assert status == 200
        assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    finally:
        process.stop()
