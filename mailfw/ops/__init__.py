"""
Operations: the named event stream and its observers (Prometheus metrics,
the live status page, C{/healthz}) and the JSON log that C{mailfw log}
reads.  See docs/operations.rst and docs/logging.rst.
"""

from mailfw.ops._events import EVENTS, MESSAGE_EVENTS, eventFields, jsonLogger, readEvents
from mailfw.ops._metrics import Metrics, QueueSnapshot, summarise
from mailfw.ops._service import HealthCheck, OpsService, OpsSettings, QueueWatch
from mailfw.ops._status import StatusBoard

__all__ = [
    "EVENTS",
    "MESSAGE_EVENTS",
    "HealthCheck",
    "Metrics",
    "OpsService",
    "OpsSettings",
    "QueueSnapshot",
    "QueueWatch",
    "StatusBoard",
    "eventFields",
    "jsonLogger",
    "readEvents",
    "summarise",
]
