"""
The SMTP server: one protocol behind three listener kinds (smtp,
submission, submissions), with its limits and AUTH settings.
"""

from mailfw.smtp._auth import AuthThrottle, SMTPAuth
from mailfw.smtp._factories import SMTPFactory
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._server import SMTPServerProtocol

__all__ = ["AuthThrottle", "SMTPAuth", "SMTPFactory", "SMTPLimits", "SMTPServerProtocol"]
