"""
Authentication for SMTP AUTH: the password file (salted scrypt hashes,
written by C{mailfw passwd}), its credentials checker, and the realm whose
L{IMailUser} avatar says which senders a user may use and which domains it
may flush with ETRN; and the brute-force defence that slows down and locks
out failing clients (L{AuthLockout}).
"""

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
