"""
The live status page: a L{StatusBoard} that observes the event stream
(live sessions, recent deliveries and refusals, destinations in backoff),
and the read-only web resources that show it.

The page is rendered on the server (every client-controlled string, such
as a HELO name or an address, escaped) and a small script refreshes it
from the JSON view every few seconds, writing only with C{textContent}.
The script is its own resource so that the page can forbid inline script
with a Content-Security-Policy.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from html import escape
from typing import Any

from twisted.logger import ILogObserver
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from mailfw.ops._metrics import QueueSnapshot

__all__ = ["StatusBoard", "StatusJSON", "StatusPage", "StatusScript"]

RECENT = 20
MAX_SESSIONS = 10_000
MAX_DESTINATIONS = 1_000

_HEADERS = {
    b"cache-control": b"no-store",
    b"x-content-type-options": b"nosniff",
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'"
    ),
}


@dataclass
class LiveSession:
    """
    One client connection as the status page shows it.
    """

    peer: str
    listener: str
    since: float
    state: str = "connected"
    helo: str = ""
    tls: bool = False
    user: str = ""
    accepted: int = 0
    worker: int = 0
    policy: str = ""


@implementer(ILogObserver)
class StatusBoard:
    """
    What the status page shows, kept up to date from named events.  Every
    table is bounded: sessions by L{MAX_SESSIONS} (the server's own
    connection limits are far lower), deliveries and refusals by
    L{RECENT}, destinations by L{MAX_DESTINATIONS}.

    @ivar queue: the last queue snapshot, shared with the metrics.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self.sessions: dict[str, LiveSession] = {}
        self.deliveries: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.refusals: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.backoff: dict[str, dict[str, Any]] = {}
        self.queue: QueueSnapshot | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name is None:
            return
        peer = str(event.get("peer", ""))
        if name == "connection.opened":
            if len(self.sessions) < MAX_SESSIONS:
                self.sessions[peer] = LiveSession(
                    peer,
                    str(event.get("listener", "")),
                    self._now(),
                    tls=bool(event.get("tls")),
                    worker=_int(event.get("worker")),
                )
            return
        session = self.sessions.get(peer) if peer else None
        if name == "connection.closed":
            self.sessions.pop(peer, None)
        elif name == "session.helo" and session is not None:
            session.helo, session.state = str(event.get("helo", "")), "greeted"
        elif name == "session.tls" and session is not None:
            session.tls, session.state = True, "tls"
        elif name == "session.auth" and session is not None:
            session.user, session.state = str(event.get("user", "")), "authenticated"
        elif name == "policy.verdict" and session is not None:
            session.policy = str(event.get("policy", ""))
        elif name == "message.received":
            if session is not None:
                session.accepted += 1
                session.state = "accepted"
        elif name in ("transaction.refused", "connection.refused"):
            stage = str(event.get("stage", "CONNECT"))
            if session is not None:
                session.state = f"refused {stage}"
            self.refusals.appendleft(
                {
                    "time": self._now(),
                    "peer": peer,
                    "stage": stage,
                    "code": _int(event.get("code")),
                    "enhanced": str(event.get("enhanced", "")),
                    "sender": str(event.get("sender", "")),
                    "recipient": str(event.get("recipient", "")),
                    "policy": session.policy if session is not None else "",
                }
            )
        elif name.startswith("delivery.") and name not in ("delivery.attempt", "delivery.postponed"):
            self.deliveries.appendleft(
                {
                    "time": self._now(),
                    "queueID": str(event.get("queueID", "")),
                    "recipient": str(event.get("recipient", "")),
                    "outcome": name.partition(".")[2],
                    "agent": str(event.get("agent", "")),
                    "code": _int(event.get("code")),
                    "enhanced": str(event.get("enhanced", "")),
                    "text": str(event.get("text", ""))[:200],
                }
            )
        elif name == "destination.backoff":
            key = f"{event.get('agent', '')} {event.get('nexthop', '')}"
            if key in self.backoff or len(self.backoff) < MAX_DESTINATIONS:
                self.backoff[key] = {
                    "agent": str(event.get("agent", "")),
                    "nexthop": str(event.get("nexthop", "")),
                    "until": float(event.get("until") or 0.0),
                    "code": _int(event.get("code")),
                    "enhanced": str(event.get("enhanced", "")),
                }

    def view(self) -> dict[str, Any]:
        """
        Everything the page shows, as plain values (the JSON view).
        """
        now = self._now()
        for key in [k for k, v in self.backoff.items() if v["until"] <= now]:
            del self.backoff[key]
        queue = self.queue
        return {
            "now": now,
            "sessions": [asdict(s) for s in self.sessions.values()],
            "queue": None
            if queue is None
            else {
                "messages": queue.messages,
                "byState": queue.byState,
                "byDomain": queue.byDomain,
                "oldestAge": queue.oldestAge,
            },
            "deliveries": list(self.deliveries),
            "refusals": list(self.refusals),
            "backoff": sorted(self.backoff.values(), key=lambda b: b["until"]),
        }


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _table(id: str, columns: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# Column order of each table, shared with the script (which rebuilds the
# rows from the JSON view in the same order).
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "sessions": [
        ("peer", "Client"),
        ("helo", "HELO"),
        ("listener", "Listener"),
        ("state", "State"),
        ("tls", "TLS"),
        ("user", "AUTH user"),
        ("accepted", "Accepted"),
        ("worker", "Process"),
    ],
    "queueStates": [("state", "State"), ("count", "Recipients")],
    "queueDomains": [("domain", "Domain"), ("count", "Recipients")],
    "deliveries": [
        ("queueID", "Queue ID"),
        ("recipient", "Recipient"),
        ("outcome", "Outcome"),
        ("agent", "Agent"),
        ("code", "Code"),
        ("text", "Reply"),
    ],
    "refusals": [
        ("peer", "Client"),
        ("stage", "Stage"),
        ("code", "Code"),
        ("enhanced", "Status"),
        ("sender", "Sender"),
        ("recipient", "Recipient"),
        ("policy", "Policy"),
    ],
    "backoff": [("agent", "Agent"), ("nexthop", "Next hop"), ("code", "Code"), ("enhanced", "Status")],
}


def tableRows(view: dict[str, Any]) -> dict[str, list[list[object]]]:
    """
    The rows of each table of the page, from L{StatusBoard.view}.
    """
    queue = view["queue"] or {"byState": {}, "byDomain": {}}
    sources: dict[str, list[dict[str, Any]]] = {
        "sessions": view["sessions"],
        "queueStates": [{"state": k, "count": v} for k, v in sorted(queue["byState"].items())],
        "queueDomains": [{"domain": k, "count": v} for k, v in queue["byDomain"].items()],
        "deliveries": view["deliveries"],
        "refusals": view["refusals"],
        "backoff": view["backoff"],
    }
    return {
        name: [[row.get(key, "") for key, _ in COLUMNS[name]] for row in rows]
        for name, rows in sources.items()
    }


def renderPage(view: dict[str, Any]) -> bytes:
    """
    The status page's HTML, complete without script.
    """
    rows = tableRows(view)
    queue = view["queue"]
    summary = (
        "queue: unknown"
        if queue is None
        else f"queue: {queue['messages']} messages, oldest {queue['oldestAge']:.0f}s"
    )
    sections = [
        ("Live sessions", "sessions"),
        ("Queue by state", "queueStates"),
        ("Queue by domain", "queueDomains"),
        ("Recent deliveries", "deliveries"),
        ("Recent refusals", "refusals"),
        ("Destinations in backoff", "backoff"),
    ]
    body = "".join(
        f'<h2>{escape(title)} (<span id="{name}Count">{len(rows[name])}</span>)</h2>'
        + _table(name, [c for _, c in COLUMNS[name]], rows[name])
        for title, name in sections
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>mailfw status</title>'
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style></head>"
        f'<body><h1>mailfw status</h1><p id="summary">{escape(summary)}</p>{body}'
        '<script src="status.js"></script></body></html>'
    ).encode()


_SCRIPT = """\
"use strict";
const COLUMNS = %s;
function fill(name, rows) {
  const body = document.querySelector("#" + name + " tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    for (const value of row) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.appendChild(td);
    }
    return tr;
  }));
  document.getElementById(name + "Count").textContent = String(rows.length);
}
function rows(name, items) {
  return items.map((item) => COLUMNS[name].map((key) => (key in item ? item[key] : "")));
}
async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    const view = await response.json();
    const queue = view.queue || {byState: {}, byDomain: {}, messages: null, oldestAge: 0};
    document.getElementById("summary").textContent = queue.messages === null
      ? "queue: unknown"
      : "queue: " + queue.messages + " messages, oldest " + Math.round(queue.oldestAge) + "s";
    fill("sessions", rows("sessions", view.sessions));
    fill("queueStates", Object.keys(queue.byState).sort().map((k) => [k, queue.byState[k]]));
    fill("queueDomains", Object.keys(queue.byDomain).map((k) => [k, queue.byDomain[k]]));
    fill("deliveries", rows("deliveries", view.deliveries));
    fill("refusals", rows("refusals", view.refusals));
    fill("backoff", rows("backoff", view.backoff));
  } catch (e) {
    document.getElementById("summary").textContent = "status unavailable: " + e;
  }
}
setInterval(refresh, %d);
"""


def renderScript(intervalMilliseconds: int) -> bytes:
    """
    The page's script: poll the JSON view every C{intervalMilliseconds}.
    """
    columns = {name: [key for key, _ in cols] for name, cols in COLUMNS.items()}
    return (_SCRIPT % (json.dumps(columns), intervalMilliseconds)).encode("utf-8")


class _BoardResource(Resource):
    isLeaf = True

    def __init__(self, board: StatusBoard, refreshQueue: Callable[[], object]) -> None:
        super().__init__()
        self.board = board
        self._refreshQueue = refreshQueue

    def _headers(self, request: Request, contentType: bytes) -> None:
        request.setHeader(b"content-type", contentType)
        for name, value in _HEADERS.items():
            request.setHeader(name, value)


class StatusPage(_BoardResource):
    """
    C{/status}: the page, complete as served.
    """

    def render_GET(self, request: Request) -> bytes:
        self._refreshQueue()
        self._headers(request, b"text/html; charset=utf-8")
        return renderPage(self.board.view())


class StatusJSON(_BoardResource):
    """
    C{/status.json}: what the page's script polls.
    """

    def render_GET(self, request: Request) -> bytes:
        self._refreshQueue()
        self._headers(request, b"application/json")
        return json.dumps(self.board.view()).encode("utf-8")


class StatusScript(Resource):
    """
    C{/status.js}: the page's script.
    """

    isLeaf = True

    def __init__(self, intervalMilliseconds: int = 2000) -> None:
        super().__init__()
        self._script = renderScript(intervalMilliseconds)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        return self._script
