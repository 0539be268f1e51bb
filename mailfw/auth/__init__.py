"""
Authentication for SMTP AUTH: the password file (salted scrypt hashes,
written by C{mailfw passwd}), its credentials checker, and the realm whose
L{IMailUser} avatar says which senders a user may use and which domains it
may flush with ETRN; and the brute-force defence that slows down and locks
out failing clients (L{AuthLockout}).
"""

from typing import TYPE_CHECKING

from mailfw._lazy import lazyExports

if TYPE_CHECKING:
    from mailfw.auth._checker import PasswordFileChecker
    from mailfw.auth._lockout import AuthLockout, LockoutSettings
    from mailfw.auth._passwd import (
        PasswordEntry,
        PasswordFileError,
        hashPassword,
        parsePasswordFile,
        updatePasswordFile,
        verifyPassword,
    )
    from mailfw.auth._realm import IMailUser, MailRealm, MailUser

__all__ = [
    "AuthLockout",
    "IMailUser",
    "LockoutSettings",
    "MailRealm",
    "MailUser",
    "PasswordEntry",
    "PasswordFileChecker",
    "PasswordFileError",
    "hashPassword",
    "parsePasswordFile",
    "updatePasswordFile",
    "verifyPassword",
]

# Imported when first used, not with the package: the SMTP factory and
# the control socket import mailfw.auth._quota, and a server without
# [auth] needs none of the password file code (mailfw._lazy).
__getattr__ = lazyExports(
    globals(),
    {
        "PasswordFileChecker": "mailfw.auth._checker",
        "AuthLockout": "mailfw.auth._lockout",
        "LockoutSettings": "mailfw.auth._lockout",
        "PasswordEntry": "mailfw.auth._passwd",
        "PasswordFileError": "mailfw.auth._passwd",
        "hashPassword": "mailfw.auth._passwd",
        "parsePasswordFile": "mailfw.auth._passwd",
        "updatePasswordFile": "mailfw.auth._passwd",
        "verifyPassword": "mailfw.auth._passwd",
        "IMailUser": "mailfw.auth._realm",
        "MailRealm": "mailfw.auth._realm",
        "MailUser": "mailfw.auth._realm",
    },
)
