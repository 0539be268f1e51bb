"""
The C{[auth]} section: which credentials checker, which mechanisms, the
sender rules and the brute-force limits.

Keys (all optional, but one of C{passwords}, C{checker} and C{backend =
"dovecot"} is needed for AUTH to be offered at all):

  - C{passwords}: the password file written by C{mailfw passwd}, relative
    to the data directory.
  - C{checker}: instead, a C{twisted.cred.strcred} checker description,
    e.g. C{"unix"}; it must check user names and passwords.
  - C{mechanisms}: by default C{["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256",
    "PLAIN", "LOGIN"]}, of which the SCRAM ones are offered only with a
    checker that has SCRAM keys (the password file), and C{-PLUS} only on
    a TLS connection with a channel binding.  Listing a SCRAM mechanism
    with a backend that has no keys is an error.
  - C{smtp}: also offer AUTH (after STARTTLS) on the C{smtp} listeners, so
    that users can relay through port 25; false by default.
  - C{sender_check}: C{"exact"} (default), C{"domain"} or C{"any"}; see
    L{mailfw.auth.MailUser}.
  - C{allow_null_sender}: whether an authenticated user may send with
    C{MAIL FROM:<>}; true by default.
  - C{senders}, C{etrn}: tables of user name to a list of sender patterns
    or ETRN domains, added to what the password file says.
  - C{received_identity}: name the user in the C{Received:} header; false
    by default (the log always has it).
  - C{max_failures}, C{failure_window}, C{lockout}, C{failure_delay} and
    C{max_tracked_clients}, the per-address throttle of earlier versions,
    are refused with a message naming their replacements (see
    L{_REPLACED_KEYS}): silently ignoring them would leave a server weaker
    or stricter than its operator configured.
  - C{penalty_delay}, C{max_penalty_delay}, C{penalty_window},
    C{user_failures}, C{user_failure_window}, C{user_lockout},
    C{address_failures}, C{address_failure_window}, C{address_block},
    C{network_prefix_v4}, C{network_prefix_v6}, C{exempt_networks}: the
    brute-force defence, see L{mailfw.auth._lockout.LockoutSettings}.
  - C{quotas}: the sending quotas, C{[auth.quotas]}; see
    L{mailfw.auth._quota.quotasFromSection}.
  - C{timeout}: seconds a check may take before AUTH gets 454 (30).
  - C{threads}: threads that check passwords (4).
  - C{backend}: C{"passwords"} (default: C{passwords} or C{checker}) or
    C{"dovecot"}: Dovecot's authentication service at C{socket} (a unix
    socket path, default C{/run/dovecot/auth-client}, or
    C{"inet:HOST:PORT"}); C{timeout} then also bounds each request.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService, Service
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mailfw._sockets import socketEndpoint
from mailfw.auth._checker import PasswordFileChecker, RunInThread
from mailfw.auth._dovecot import DEFAULT_SOCKET, DovecotAuthClient, DovecotChecker
from mailfw.auth._lockout import AuthLockout, LockoutSettings
from mailfw.auth._passwd import PasswordFileError, normaliseETRNDomain, normaliseSenderPattern
from mailfw.auth._quota import SendingQuotas, quotasFromSection
from mailfw.auth._realm import SENDER_CHECKS, MailRealm
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.sharedstate import sharedStateFor
from mailfw.smtp._auth import MECHANISMS, SCRAM_MECHANISMS, AuthThrottle, SMTPAuth, scramKeySource

__all__ = ["AuthSetup", "authFromConfig"]


class ThreadPoolService(Service):
    """
    Starts a thread pool with the service tree and stops it with it.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


@dataclass
class AuthSetup:
    """
    AUTH as configured.

    @ivar auth: for the factories of the listeners that offer AUTH.
    @ivar offerOnSMTP: whether the C{smtp} listeners offer it too.
    @ivar service: runs the password-checking threads; a child of the
        server's service tree.
    @ivar lockout: the brute-force defence, one for all listeners, its
        counters in the queue's shared state when the queue keeps one.
    @ivar quotas: the sending quotas of C{[auth.quotas]}, counted in the
        queue's shared state, or C{None} when no limit is set.
    """

    auth: SMTPAuth
    offerOnSMTP: bool
    service: IService
    lockout: AuthLockout
    quotas: SendingQuotas | None = None


#: The per-address throttle's keys of earlier versions, and what replaced
#: each in the brute-force defence (L{mailfw.auth._lockout}).
_REPLACED_KEYS = {
    "max_failures": "user_failures (per network and user) and address_failures (per address)",
    "failure_window": "user_failure_window and address_failure_window",
    "lockout": "user_lockout and address_block",
    "failure_delay": "penalty_delay and max_penalty_delay",
    "max_tracked_clients": "the shared state's bound (the queue's database, or 100,000 keys in memory)",
}


def _table(section: Section, key: str, normalise: Any) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for user, value in section.table(key, {}).items():
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{section.title} {key}.{user}: expected a list of strings")
        try:
            out[user] = tuple(normalise(v) for v in values)
        except PasswordFileError as e:
            raise ConfigError(f"{section.title} {key}.{user}: {e}") from None
    return out


def _lockoutSettings(section: Section) -> LockoutSettings:
    default = LockoutSettings()
    prefixes = {}
    for key, bits, fallback in (
        ("network_prefix_v4", 32, default.networkPrefixV4),
        ("network_prefix_v6", 128, default.networkPrefixV6),
    ):
        prefixes[key] = section.integer(key, fallback, minimum=0)
        if prefixes[key] > bits:
            raise ConfigError(f"{section.title} {key}: must be at most {bits}")
    exempt = tuple(section.strings("exempt_networks", list(default.exemptNetworks)))
    for text in exempt:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"{section.title} exempt_networks: not a network: {text!r}") from None
    return LockoutSettings(
        penaltyDelay=section.number("penalty_delay", default.penaltyDelay, minimum=0),
        maxPenaltyDelay=section.number("max_penalty_delay", default.maxPenaltyDelay, minimum=0),
        penaltyWindow=section.number("penalty_window", default.penaltyWindow, minimum=0),
        userFailures=section.integer("user_failures", default.userFailures, minimum=1),
        userWindow=section.number("user_failure_window", default.userWindow, minimum=0),
        userLockout=section.number("user_lockout", default.userLockout, minimum=0),
        addressFailures=section.integer("address_failures", default.addressFailures, minimum=1),
        addressWindow=section.number("address_failure_window", default.addressWindow, minimum=0),
        addressBlock=section.number("address_block", default.addressBlock, minimum=0),
        networkPrefixV4=prefixes["network_prefix_v4"],
        networkPrefixV6=prefixes["network_prefix_v6"],
        exemptNetworks=exempt,
    )


def authFromConfig(
    section: Section, context: ComponentContext, runInThread: RunInThread | None = None
) -> AuthSetup | None:
    """
    Build AUTH from the C{[auth]} section; C{None} when neither
    C{passwords} nor C{checker} is given (no AUTH anywhere).

    @param runInThread: how password checks leave the reactor thread; by
        default a thread pool of C{threads} threads (tests pass a
        synchronous one).
    @raise ConfigError: naming the key that is wrong.
    """
    passwords = section.text("passwords", None)
    checkerText = section.text("checker", None)
    explicitMechanisms = section.has("mechanisms")
    mechanisms = tuple(m.upper() for m in section.strings("mechanisms", list(MECHANISMS)))
    offerOnSMTP = section.flag("smtp", False)
    senderCheck = section.choice("sender_check", SENDER_CHECKS, "exact")
    allowNull = section.flag("allow_null_sender", True)
    receivedIdentity = section.flag("received_identity", False)
    senders = _table(section, "senders", normaliseSenderPattern)
    etrn = _table(section, "etrn", normaliseETRNDomain)
    for old, new in _REPLACED_KEYS.items():
        if section.has(old):
            raise ConfigError(f"{section.title} {old}: no longer used; the brute-force defence uses {new}")
    timeout = section.number("timeout", 30.0, minimum=1)
    threads = section.integer("threads", 4, minimum=1)
    backend = section.choice("backend", ("passwords", "dovecot"), "passwords")
    dovecotSocket = section.text("socket", None)
    lockoutSettings = _lockoutSettings(section)
    quotas = quotasFromSection(section.table("quotas", {}), sharedStateFor(context.queue), context.reactor)
    section.finish()
    if not mechanisms or any(m not in MECHANISMS for m in mechanisms):
        raise ConfigError(f"{section.title} mechanisms: choose from {', '.join(MECHANISMS)}")
    if passwords is not None and checkerText is not None:
        raise ConfigError(f"{section.title}: give 'passwords' or 'checker', not both")
    if backend == "dovecot" and (passwords is not None or checkerText is not None):
        raise ConfigError(f"{section.title}: backend 'dovecot' takes 'socket', not 'passwords' or 'checker'")
    if backend != "dovecot" and dovecotSocket is not None:
        raise ConfigError(f"{section.title} socket: only for backend = 'dovecot'")
    if passwords is None and checkerText is None and backend != "dovecot":
        if section.has("smtp") and offerOnSMTP:
            raise ConfigError(f"{section.title} smtp: needs 'passwords' or 'checker'")
        return None

    pool = ThreadPool(minthreads=0, maxthreads=threads, name="mailfw-auth")
    service: IService = ThreadPoolService(pool)
    if runInThread is None:

        def runInThread(f: Any, *args: Any) -> Any:
            return deferToThreadPool(context.reactor, pool, f, *args)

    checker: Any
    if backend == "dovecot":
        try:
            endpoint = socketEndpoint(context.reactor, dovecotSocket or DEFAULT_SOCKET, context.path)
        except ValueError as e:
            raise ConfigError(f"{section.title} socket: {e}") from None
        client = DovecotAuthClient(
            endpoint, context.reactor, timeout=timeout, description=dovecotSocket or DEFAULT_SOCKET
        )
        checker, lookup, service = DovecotChecker(client), None, client
    elif passwords is not None:
        fileChecker = PasswordFileChecker(context.path(passwords), runInThread)
        checker, lookup = fileChecker, fileChecker.rights
    else:
        from twisted.cred import strcred

        try:
            checker = strcred.makeChecker(checkerText)
        except Exception as e:
            raise ConfigError(f"{section.title} checker: {e}") from None
        probe = UsernamePassword(b"", b"")
        if not any(i.providedBy(probe) for i in checker.credentialInterfaces):
            raise ConfigError(
                f"{section.title} checker: {checkerText.split(':', 1)[0]!r} "
                "does not check user names and passwords"
            )
        lookup = None
    realm = MailRealm(lookup, senders, etrn, senderCheck, allowNull)
    throttle = AuthThrottle(context.reactor)
    authLockout = AuthLockout(sharedStateFor(context.queue), context.reactor, lockoutSettings)
    portal = Portal(realm, [checker])
    scram = [m for m in mechanisms if m in SCRAM_MECHANISMS]
    if explicitMechanisms and scram and scramKeySource(portal) is None:
        raise ConfigError(
            f"{section.title} mechanisms: {scram[0]} needs SCRAM keys, which only "
            "'passwords' (the password file) has"
        )
    auth = SMTPAuth(
        portal,
        throttle,
        mechanisms=mechanisms,
        receivedIdentity=receivedIdentity,
        timeout=timeout,
        lockout=authLockout,
    )
    return AuthSetup(auth, offerOnSMTP, service, authLockout, quotas)
