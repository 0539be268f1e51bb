"""
Operations: the named event stream and its observers (Prometheus metrics,
the live status page, C{/healthz}) and the JSON log that C{mailfw log}
reads.  See docs/operations.rst and docs/logging.rst.
"""

from typing import TYPE_CHECKING

from mailfw._lazy import lazyExports

if TYPE_CHECKING:
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

# Imported when first used, not with the package: every server process
# imports mailfw.ops._events, and only a [metrics] listener needs
# prometheus_client and twisted.web (mailfw._lazy).
__getattr__ = lazyExports(
    globals(),
    {
        "EVENTS": "mailfw.ops._events",
        "MESSAGE_EVENTS": "mailfw.ops._events",
        "eventFields": "mailfw.ops._events",
        "jsonLogger": "mailfw.ops._events",
        "readEvents": "mailfw.ops._events",
        "Metrics": "mailfw.ops._metrics",
        "QueueSnapshot": "mailfw.ops._metrics",
        "summarise": "mailfw.ops._metrics",
        "HealthCheck": "mailfw.ops._service",
        "OpsService": "mailfw.ops._service",
        "OpsSettings": "mailfw.ops._service",
        "QueueWatch": "mailfw.ops._service",
        "StatusBoard": "mailfw.ops._status",
    },
)
