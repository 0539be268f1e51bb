"""
The CI version of the soak (C{benchmarks/soak.py}): 60 s at half the
measured maximum rate, a fault every 12 s on average (SIGKILL and restart,
the peer refusing, the resolver gone), then the queue drains.  The
hour-long run is the same script with C{--duration 3600}
(docs/reliability.rst).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration._server import requireTool

SOAK = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "soak.py"


def test_soak(tmp_path: Path) -> None:
    """
    Nothing acknowledged is lost, nothing is delivered more than twice,
    clients see only 250, a 4xx or a refused connection (while mailfw
    restarts), and the server's memory does not grow along the run.
    """
    requireTool("smtp-sink")
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            *("--duration", "60", "--probe", "5", "--fault-every", "12", "--drain", "120"),
            *("--seed", "20", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(result.stdout[-3000:])
    assert out.exists(), f"the soak did not finish:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    numbers = json.loads(out.read_text())
    assert numbers["acknowledged"] > 100, numbers
    assert numbers["lost"] == 0, numbers
    assert numbers["duplicated"] <= numbers["acknowledged"] // 10, numbers
    assert set(numbers["replies"]) <= {"250", "0", "421", "451", "452"}, numbers["replies"]
    rss = numbers["rssKiB"]
    assert rss and max(rss[len(rss) // 2 :]) - min(rss) < 64 * 1024, f"RSS grew: {rss}"
