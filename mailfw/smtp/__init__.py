"""
The SMTP server: one protocol behind three listener kinds (smtp,
submission, submissions), with its limits.
"""

from mailfw.smtp._factories import SMTPFactory
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._server import SMTPServerProtocol

__all__ = ["SMTPFactory", "SMTPLimits", "SMTPServerProtocol"]
