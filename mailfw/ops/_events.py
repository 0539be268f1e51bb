"""
The one event stream: the stable names of mailfw's operations events, the
JSON log, and the fields of an event that cross a process boundary.

Every event meant for operators carries a field C{event} holding a stable
dotted name (C{"message.received"}, C{"delivery.deferred"}, ...) beside
its C{twisted.logger} format; docs/logging.rst lists each with its
fields.  Events that would only add noise to a text log (a connection
opening, a DNS lookup) are emitted without a format: text observers
write nothing for them, the JSON log and the observers in this package
(metrics, status page) still see them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

from twisted.logger import ILogObserver, jsonFileLogObserver

__all__ = ["EVENTS", "MESSAGE_EVENTS", "eventFields", "jsonLogger", "readEvents"]

#: Every event name mailfw emits, with what it means (docs/logging.rst
#: repeats this with the fields; a test keeps the two in step).
EVENTS: dict[str, str] = {
    "connection.opened": "a client connected to a listener",
    "connection.refused": "a connect-stage policy refused the client",
    "connection.closed": "a client connection ended",
    "listener.stress": "a listener entered or left stress mode",
    "session.helo": "a client's HELO or EHLO was accepted",
    "session.tls": "a client started TLS",
    "session.auth": "a client authenticated",
    "session.authFailed": "an AUTH attempt failed",
    "policy.verdict": "a policy decided (accept, reject, defer, disconnect)",
    "transaction.refused": "MAIL, RCPT, DATA or BDAT was refused",
    "message.received": "a message is durable in the queue (the 250)",
    "delivery.attempt": "a delivery agent was given a group of recipients",
    "delivery.delivered": "a recipient was delivered",
    "delivery.deferred": "a recipient will be tried again later",
    "delivery.bounced": "a recipient failed and goes back to the sender",
    "delivery.expired": "a recipient stayed too long in the queue and bounces",
    "delivery.postponed": "a destination is in backoff: not tried now",
    "destination.backoff": "a destination could not be reached: backoff starts",
    "notice.created": "a DSN (bounce or delay notice) was made for a message",
    "client.connected": "the outbound SMTP client connected to a server",
    "client.tls": "the outbound SMTP client started TLS",
    "dns.lookup": "a DNS lookup for delivery ended (ok, nxdomain, error)",
}

#: The events that are about one message: each carries C{queueID}.
MESSAGE_EVENTS = frozenset(
    {
        "message.received",
        "delivery.attempt",
        "delivery.delivered",
        "delivery.deferred",
        "delivery.bounced",
        "delivery.expired",
        "delivery.postponed",
        "notice.created",
    }
)

_SCALARS = (str, int, float, bool, type(None))


def eventFields(event: dict[str, Any]) -> dict[str, Any]:
    """
    The fields of a named event that survive JSON: what a worker process
    forwards to the parent.  C{log_*} keys (the logger, the format, the
    failure) stay behind, and so does any field that is not a plain value
    (mailfw's events hold only plain values; STYLE.md forbids objects).
    """
    return {k: v for k, v in event.items() if not k.startswith("log_") and isinstance(v, _SCALARS)}


def jsonLogger() -> ILogObserver:
    """
    The observer of C{twistd --logger=mailfw.ops.jsonLogger}: every event as
    one JSON object a line (Twisted's own JSON form, without the record
    separator), to the file named by C{$MAILFW_JSON_LOG}, else to standard
    output (taken now, before twistd redirects C{sys.stdout} into the log).
    C{mailfw log QUEUEID} reads it back.
    """
    path = os.environ.get("MAILFW_JSON_LOG")
    out: IO[str] = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
    observer = jsonFileLogObserver(out, recordSeparator="")
    return observer


def readEvents(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """
    The events of a JSON log (one object a line, with or without Twisted's
    record separator); lines that are not JSON objects are skipped, so a
    log that also holds a worker's stray output still reads.
    """
    for line in lines:
        line = line.strip().lstrip("\x1e")
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event
