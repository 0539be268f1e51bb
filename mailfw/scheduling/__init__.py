"""
The scheduler: it claims due recipients from a queue, routes them, hands
each group to a delivery agent, records the outcomes and writes bounces
(RFC 3464 DSNs) and delay notices.
"""

from mailfw.scheduling._retry import RetrySchedule
from mailfw.scheduling._scheduler import Scheduler

__all__ = ["RetrySchedule", "Scheduler"]
