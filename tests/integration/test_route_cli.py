"""
C{mailfw route DOMAIN} against the loopback DNS server (a child process,
since the command blocks): MX hosts, addresses, the TLS policy and why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration._peers import PEER
from tests.integration.test_requiretls import REPO, startDNS

CONFIG = """
[dns]
nameservers = ["127.0.0.1:{dnsPort}"]
dnssec = "trust-ad"
[routing]
plugin = "static"
local_domains = ["localhost"]
transport = {{ "fixed.test" = "outbound:[{peer}]:2526" }}
[delivery.local]
plugin = "maildir"
[delivery.outbound]
plugin = "smtp-relay"
port = 2525
address_families = ["ipv4"]
tls_policy = {{ "plain.test" = "encrypt" }}
"""

ZONE: dict[str, list[list[object]]] = {
    "dane.test": [["MX", 10, "mx1.dane.test"], ["MX", 20, "mx2.dane.test"]],
    "mx1.dane.test": [["A", PEER]],
    "mx2.dane.test": [["A", "127.0.0.4"]],
    "_2525._tcp.mx1.dane.test": [["TLSA", 3, 1, 1, "ab" * 32]],
    "plain.test": [["MX", 10, "mx.plain.test"]],
    "mx.plain.test": [["A", PEER]],
}


def route(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailfw", "route", *args, "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_route(tmp_path: Path) -> None:
    dns, dnsPort = startDNS(tmp_path, ZONE)
    try:
        config = tmp_path / "mailfw.toml"
        config.write_text(CONFIG.format(dnsPort=dnsPort, peer=PEER))
        done = route(config, "dane.test")
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert "next hop dane.test via smtp-relay instance 'outbound', port 2525" in text, text
        assert "TLS policy: DANE" in text, text
        assert f"10 mx1.dane.test [{PEER}]  tls: dane" in text, text
        assert "TLSA 3 1 1 " + "ab" * 32 in text, text
        assert "20 mx2.dane.test [127.0.0.4]  tls: may" in text, text

        plain = json.loads(route(config, "plain.test", "--json").stdout)
        assert plain["tls"]["source"] == "table"
        assert "encrypt" in plain["tls"]["why"] and "tls_policy entry 'plain.test'" in plain["tls"]["why"]
        assert [h["tls"] for h in plain["hosts"]] == ["encrypt"]

        fixed = json.loads(route(config, "fixed.test", "--json").stdout)
        assert (fixed["nexthop"], fixed["port"]) == (f"[{PEER}]:2526", 2526)

        missing = route(config, "gone.test")
        assert missing.returncode == 0 and "no hosts: 550 5.1.2" in missing.stdout, missing
    finally:
        dns.terminate()
        dns.wait(10)
