"""
The credentials checker for the password file (L{mailfw.auth._passwd}),
and what every checker may raise or receive.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailfw.auth._passwd import PasswordEntry, PasswordFileError, burnTime, readPasswordFile, verifyPassword
from mailfw.auth._scram import IScramCredentials, IScramKeySource, ScramKeys
from mailfw.envelope import Session
from mailfw.interfaces import ISessionCredentials

__all__ = ["PasswordFileChecker", "RunInThread", "SessionCredentials", "TemporaryAuthFailure"]

RunInThread = Callable[..., "Deferred[Any]"]
"""Runs C{f(*args)} off the reactor thread and fires with its result."""


class TemporaryAuthFailure(Exception):
    """
    A checker could not decide (its backend is down or too slow): AUTH
    should get C{454 4.7.0}, and the failure should not count against the
    client as a wrong password would.  The message says why, for the log.
    """


@implementer(IUsernamePassword, ISessionCredentials)
class SessionCredentials(UsernamePassword):
    """
    A user name and password together with the session that sent them
    (L{ISessionCredentials}).
    """

    def __init__(self, username: bytes, password: bytes, session: Session) -> None:
        super().__init__(username, password)
        self.session = session


@implementer(ICredentialsChecker, IScramKeySource)
class PasswordFileChecker:
    """
    Checks user names and passwords against the password file.

    The file is read again whenever its modification time, size or inode
    changes, so C{mailfw passwd} takes effect without a restart.  Reading
    and hashing happen in C{runInThread}: scrypt is slow on purpose.  An
    unknown user costs as much time as a wrong password.

    A file that cannot be read fails the check with the L{OSError} (a
    temporary failure, 454), not with L{UnauthorizedLogin}.

    SCRAM (L{mailfw.auth._scram}) needs the user's keys in the middle of
    the exchange, from L{scramKeys}; once the exchange has succeeded the
    session logs in with its L{IScramCredentials}, which this checker
    accepts if the keys are still the user's.
    """

    credentialInterfaces = (IUsernamePassword, IScramCredentials)
    log = Logger()

    def __init__(self, path: Path, runInThread: RunInThread, scramSecret: bytes | None = None) -> None:
        """
        @param scramSecret: makes the decoy SCRAM salts of unknown users;
            a random one per process by default (so a client that compares
            salts across a restart could tell unknown users apart).
        """
        self.path = path
        self._runInThread = runInThread
        self._scramSecret = secrets.token_bytes(32) if scramSecret is None else scramSecret
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, PasswordEntry] = {}

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        if IScramCredentials.providedBy(credentials):
            return self._scramLogin(credentials)
        username, password = credentials.username, credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")

        def checked(user: str | None) -> str:
            if user is None:
                raise UnauthorizedLogin()
            return user

        d = self._runInThread(self._check, bytes(username), bytes(password))
        return d.addCallback(checked)

    def scramKeys(self, user: str) -> Deferred[ScramKeys]:
        """
        C{user}'s SCRAM-SHA-256 keys, read off the reactor thread; decoy
        keys (L{ScramKeys.decoyFor}) when the user is unknown or has none,
        so that the exchange goes on and fails like a wrong password.

        @return: fails with L{OSError} if the file cannot be read (454).
        """
        return self._runInThread(self._scramKeys, user)

    def _scramKeys(self, user: str) -> ScramKeys:
        entries = self._load()
        entry = entries.get(user)
        if entry is None or entry.scram is None:
            # Shaped like the file's real keys, so that the count and the
            # salt length do not tell which users exist.
            like = next((e.scram for e in entries.values() if e.scram is not None), None)
            return ScramKeys.decoyFor(user, self._scramSecret, like)
        return entry.scram

    def _scramLogin(self, credentials: Any) -> Deferred[Any]:
        def checked(keys: ScramKeys) -> str:
            if not credentials.checkKeys(keys):
                raise UnauthorizedLogin()
            return str(credentials.username)

        return self.scramKeys(credentials.username).addCallback(checked)

    def entry(self, user: str) -> PasswordEntry | None:
        """
        The entry last read for C{user} (no disk access: the realm calls
        this on the reactor thread, after a successful check).
        """
        return self._entries.get(user)

    def rights(self, user: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """
        C{user}'s sender patterns and ETRN domains, for L{MailRealm}.
        """
        entry = self.entry(user)
        return None if entry is None else (entry.senders, entry.etrn)

    def _load(self) -> dict[str, PasswordEntry]:
        """
        The file's entries, read again if it changed.  Runs in a thread.
        """
        with self._lock:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                entries, problems = readPasswordFile(self.path)
                for problem in problems:
                    self.log.warn("password file {path}: {problem}", path=str(self.path), problem=problem)
                self._entries = entries
                self._stamp = stamp
            return self._entries

    def _check(self, username: bytes, password: bytes) -> str | None:
        """
        The user name if the password is right, else C{None}.  Runs in a
        thread.
        """
        entries = self._load()
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        entry = entries.get(name)
        if entry is None:
            burnTime(password)
            return None
        try:
            good = verifyPassword(entry.hash, password)
        except PasswordFileError:
            return None
        return entry.user if good else None
