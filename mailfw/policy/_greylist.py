"""
The C{greylist} policy: defer the first attempt of an unknown (client
network, sender, recipient) triplet, and accept it when the client comes
back after C{delay} seconds, as a real MTA's queue does and most spam
software does not (RFC 6647).

State lives in L{mailfw.interfaces.ISharedState}, the queue's database when
it keeps it (SQLite, PostgreSQL), so greylisting survives restarts and
every node of a cluster agrees; a queue without it gets a bounded
in-memory store.  Keys (C{greylist:...}) hold a hash of the triplet, so
neither odd bytes nor long addresses reach the database.

For each recipient, in this order (postgrey's model):

  1. A client network that has retried correctly C{auto_allow} times (for
     any triplets) within C{max_age} is let through without a triplet
     check.
  2. A triplet that passed before, within C{max_age} of its first pass,
     is let through.
  3. Otherwise the triplet is marked as first seen now (unless a mark
     younger than C{retry_window} exists).  Earlier than C{delay} after
     that mark the recipient gets 451 4.7.1; later, it passes: the
     triplet and the client's retry count are recorded.

Clients with relay rights (permitted networks, authenticated users) and
C{exempt_networks} are never greylisted.  When the shared state cannot be
read the call fails, and the link's C{on_error} decides (451 by default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import ISharedState
from mailfw.policy import CONTINUE, Policy, Verdict
from mailfw.policy._clients import Network, inNetworks, networkOf, networks, prefixes
from mailfw.reply import SMTPReply
from mailfw.sharedstate import sharedStateFor

__all__ = ["GreylistPolicy", "fromConfig", "tripletKey"]


def tripletKey(network: str, sender: str, recipient: str) -> str:
    """
    The shared-state key of a triplet: addresses case-folded and hashed,
    so that keys are short and plain whatever the client sent.
    """
    digest = hashlib.sha256(f"{network}\0{sender.lower()}\0{recipient.lower()}".encode()).hexdigest()
    return digest[:32]


class GreylistPolicy(Policy):
    """
    Defers unknown triplets at RCPT; see the module's description.

    @ivar delay: seconds before a retry is accepted.
    @ivar retryWindow: how long a first attempt is remembered; a retry later
        than this starts again.
    @ivar maxAge: how long a passed triplet, and a client's retry count,
        are remembered.
    @ivar autoAllow: correct retries after which a client network is no
        longer greylisted (0: never).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        state: ISharedState,
        clock: IReactorTime,
        delay: float = 300.0,
        retryWindow: float = 2 * 86400.0,
        maxAge: float = 35 * 86400.0,
        autoAllow: int = 5,
        prefixV4: int = 24,
        prefixV6: int = 64,
        exempt: Sequence[Network] = (),
    ) -> None:
        if retryWindow <= delay:
            raise ValueError("retryWindow must be longer than delay")
        self.name = name
        self.state = state
        self.clock = clock
        self.delay = delay
        self.retryWindow = retryWindow
        self.maxAge = maxAge
        self.autoAllow = autoAllow
        self.prefixV4 = prefixV4
        self.prefixV6 = prefixV6
        self.exempt = tuple(exempt)

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        if session.relayClient or session.authenticated or inNetworks(session.peerHost, self.exempt):
            return CONTINUE
        return Deferred.fromCoroutine(self._check(session, envelope, recipient))

    async def _check(self, session: Session, envelope: Envelope, recipient: Recipient) -> Verdict:
        network = networkOf(session.peerHost, self.prefixV4, self.prefixV6)
        clientKey = f"greylist:client:{network}"
        now = self.clock.seconds()
        state = self.state
        if self.autoAllow and await state.count(clientKey, 0, self.maxAge, now) >= self.autoAllow:
            return CONTINUE
        sender = "" if envelope.sender is None else str(envelope.sender)
        triplet = tripletKey(network, sender, str(recipient.address))
        passedKey = f"greylist:pass:{triplet}"
        if await state.count(passedKey, 0, self.maxAge, now):
            return CONTINUE
        firstSeen = await state.mark(f"greylist:seen:{triplet}", self.retryWindow, now)
        waited = now - firstSeen
        if waited < self.delay:
            self.log.info(
                "greylist {policy}: deferred {sender} -> {recipient} from {peer} ({wait:.0f} s to go)",
                policy=self.name,
                sender=sender or "<>",
                recipient=str(recipient.address),
                peer=session.peerHost,
                wait=self.delay - waited,
            )
            return Verdict(SMTPReply(451, "4.7.1", "Greylisted, please try again later"))
        await state.count(passedKey, 1, self.maxAge, now)
        await state.forget(f"greylist:seen:{triplet}")
        if self.autoAllow:
            await state.count(clientKey, 1, self.maxAge, now)
        self.log.info(
            "greylist {policy}: {peer} retried after {waited:.0f} s; {sender} -> {recipient} passes",
            policy=self.name,
            peer=session.peerHost,
            waited=waited,
            sender=sender or "<>",
            recipient=str(recipient.address),
        )
        return CONTINUE


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> GreylistPolicy:
    """
    Build a C{greylist} policy from C{[policy.NAME]}; see
    C{docs/configuration.rst} for the options.
    """
    section = Section(f"[policy.{instanceName}]", options)
    delay = section.number("delay", 300.0, minimum=0)
    retryWindow = section.number("retry_window", 2 * 86400.0, minimum=1)
    maxAge = section.number("max_age", 35 * 86400.0, minimum=1)
    autoAllow = section.integer("auto_allow", 5, minimum=0)
    prefixV4, prefixV6 = prefixes(section)
    exempt = networks(section, "exempt_networks", ())
    section.finish()
    if retryWindow <= delay:
        raise ConfigError(f"{section.title} retry_window: must be longer than delay")
    if context.queue is None:
        raise ConfigError(
            f"{section.title}: greylisting keeps its triplets with the queue, but none was given"
        )
    return GreylistPolicy(
        instanceName,
        sharedStateFor(context.queue),
        context.reactor,
        delay,
        retryWindow,
        maxAge,
        autoAllow,
        prefixV4,
        prefixV6,
        exempt,
    )
