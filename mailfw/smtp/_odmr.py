"""
On-Demand Mail Relay (RFC 2645): the C{odmr} listener (port 366) and its
C{ATRN} command, the authenticated successor of C{TURN}.

A customer whose mail waits here connects, does STARTTLS and AUTH, and
sends C{ATRN domain[,domain]}; if it may collect every domain named and
mail is waiting, the server answers C{250}, the roles reverse, and the
same connection carries an SMTP session in which mailfw is the client
(L{mailfw.smtp._client.SMTPClient}, taking the connection over) and
delivers the waiting mail, then says QUIT.

Configuration
=============

The C{[odmr]} section (see L{settingsFromConfig})::

    [odmr]
    domains = ["customer.example", ".customer.example"]
    batch = 1000

C{domains} are the domains collected by ATRN (patterns as in C{[etrn]}):
their mail is held in the queue, as hold-for-ETRN mail is (it ages,
sends delay notices and expires the same way), and only ATRN, ETRN or an
operator flush releases it.  A user may collect a domain that is one of
these and one of its ETRN domains (the password file's third field, or
the hosting tables): one right, "domains this user may pull", for both
commands.

Replies to ATRN: C{530 5.7.0} before AUTH, C{501} for a malformed list,
C{450 4.7.1} when a domain is not the user's, C{453} when nothing waits,
C{451 4.3.0} when the queue cannot be asked, else C{250} and the reversal.

Exactly once
============

Before the C{250} the waiting recipients of the domains (at most
C{batch}) are leased from the queue with
L{mailfw.interfaces.ISelectiveClaim.claimMatching}, so that no scheduler
of any process or node takes them while the customer receives them; the
lease lasts longer than the session may (the session is cut after the
scheduler's delivery timeout, which start-up keeps below the queue's
lease).  Each message's outcomes are recorded through the scheduler's
L{settle<mailfw.scheduling._scheduler.Scheduler.settle>}, as a delivery's
are: 2xx delivered, 5xx bounced, 4xx held again.  Messages not attempted
(the customer hung up, or its greeting or EHLO failed) are returned to the
queue untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.address import Address, AddressError, normaliseDomain
from mailfw.config import ConfigError, Section
from mailfw.envelope import RecipientOutcome
from mailfw.etrn import domainCovered, normaliseDomainPattern
from mailfw.interfaces import IMessageQueue, ISelectiveClaim
from mailfw.queued import Lease, Selector
from mailfw.reply import SMTPReply
from mailfw.smtp import _replies as R
from mailfw.smtp._client import ClientOptions, HostFailure, SMTPClient
from mailfw.smtp._replies import Answer
from mailfw.smtp._server import SMTPServerProtocol

__all__ = [
    "ODMRHandler",
    "ODMRServerProtocol",
    "ODMRSettings",
    "parseATRNArgument",
    "settingsFromConfig",
]

MAX_DOMAINS = 32
"""Domains one ATRN may name."""

SYNTAX = SMTPReply(501, "5.5.4", "Syntax: ATRN domain[,domain]")
REVERSING = SMTPReply(250, "2.0.0", "OK now reversing the connection")
NO_MAIL = SMTPReply(453, "4.2.4", "You have no mail")
TRY_LATER = SMTPReply(451, "4.3.0", "Unable to process ATRN request now")
ODMR_ONLY = SMTPReply(502, "5.5.1", "Command not available on the ODMR service; use ATRN")


def refused(domain: str) -> SMTPReply:
    """
    C{450} (RFC 2645 5): the user may not collect C{domain}; the same
    reply whether or not mail waits for it.
    """
    return SMTPReply(450, "4.7.1", f"ATRN request refused for {domain}")


def parseATRNArgument(argument: str) -> tuple[str, ...] | None:
    """
    Parse C{domain[,domain]}: normalised (A-labels, lower case), without
    duplicates, at most L{MAX_DOMAINS}.

    @return: the domains, or C{None} if the argument is malformed.
    """
    text = argument.strip(" ")
    if not text or " " in text or "\t" in text:
        return None
    parts = text.split(",")
    if len(parts) > MAX_DOMAINS:
        return None
    domains: list[str] = []
    for part in parts:
        if part.endswith(".") and not part.endswith(".."):
            part = part[:-1]
        if not part or part.startswith(("[", "@", "#")):
            return None
        try:
            domain = normaliseDomain(part)
        except AddressError:
            return None
        if domain not in domains:
            domains.append(domain)
    return tuple(domains)


@dataclass(frozen=True)
class ODMRSettings:
    """
    The C{[odmr]} section, checked; see the module docstring.

    @ivar domains: normalised patterns (C{domain}, C{.domain}) of the
        domains held for and collected by ATRN.
    @ivar batch: recipients one ATRN delivers at most; the rest waits for
        the next.
    """

    domains: tuple[str, ...] = ()
    batch: int = 1000

    @property
    def enabled(self) -> bool:
        return bool(self.domains)

    def holds(self, address: Address) -> bool:
        """
        Whether mail for C{address} waits for ATRN (with the ETRN holds, the
        scheduler's C{holdForETRN}).
        """
        return domainCovered(self.domains, address.domain)

    def mayCollect(self, avatar: Any, domain: str) -> bool:
        """
        Whether the user C{avatar} (an L{mailfw.interfaces.IMailUser}) may
        collect C{domain}: an ODMR domain that one of its ETRN domains names.

        The wildcard C{*} does not count here: it lets a user ask for
        delivery of any domain to that domain's own servers (ETRN), which
        is harmless, but collecting hands the mail to the user itself, so
        it needs the domain (or a C{.parent} of it) by name.
        """
        named = tuple(pattern for pattern in avatar.etrnDomains if pattern != "*")
        return domainCovered(self.domains, domain) and domainCovered(named, domain)


def settingsFromConfig(options: Mapping[str, object], title: str = "[odmr]") -> ODMRSettings:
    """
    Read C{[odmr]}: C{domains} (patterns, as in C{[etrn] hold}) and C{batch}
    (default 1000).

    @raise ConfigError: naming the bad key.
    """
    section = Section(title, options)
    domains = tuple(
        normaliseDomainPattern(text, f"{title} domains") for text in section.strings("domains", [])
    )
    batch = section.integer("batch", 1000, minimum=1)
    section.finish()
    return ODMRSettings(domains, batch)


class ODMRHandler:
    """
    Leases a customer's mail and delivers it over the customer's
    connection; shared by every session of the C{odmr} listeners.

    @ivar settle: records one lease's outcomes as a delivery's
        (L{mailfw.scheduling._scheduler.Scheduler.settle}).
    @ivar deadline: seconds a reversed session may last before it is cut,
        shorter than the queue's lease.
    """

    log = Logger()

    def __init__(
        self,
        settings: ODMRSettings,
        queue: IMessageQueue,
        settle: Callable[[Lease, Sequence[RecipientOutcome]], Deferred[None]],
        clock: IReactorTime,
        hostname: str,
        deadline: float,
    ) -> None:
        if not ISelectiveClaim.providedBy(queue):
            raise ConfigError("[odmr] needs a queue that can lease by domain (memory, sqlite, postgresql)")
        self.settings = settings
        self._queue = queue
        self._claimer = ISelectiveClaim(queue)
        self.settle = settle
        self.clock = clock
        self.hostname = hostname
        self.deadline = deadline

    async def claim(self, domains: Sequence[str]) -> list[Lease]:
        """
        Lease the waiting recipients of C{domains}, at most the batch.
        """
        leases: list[Lease] = []
        room = self.settings.batch
        for domain in domains:
            if room <= 0:
                break
            now = self.clock.seconds()
            found = await self._claimer.claimMatching(Selector(domain=domain), now, room)
            leases.extend(found)
            room -= sum(len(lease.recipients) for lease in found)
        return leases

    def giveBack(self, leases: Sequence[Lease]) -> None:
        """
        Return leases not attempted to the queue as they were.
        """

        def failed(failure: Failure, queueID: str) -> None:
            self.log.failure("returning {queueID} to the queue failed", failure, queueID=queueID)

        for lease in leases:
            self._queue.record(lease, ()).addErrback(failed, lease.queueID)

    async def deliver(self, client: SMTPClient, leases: Sequence[Lease], peer: str) -> None:
        """
        The reversed session: wait for the customer's greeting, EHLO, one
        transaction per message, QUIT.  Never fails.
        """
        transport: Any = client.transport
        cut = self.clock.callLater(self.deadline, transport.abortConnection)
        pending = list(leases)
        delivered = 0
        try:
            try:
                await client.handshake()
            except HostFailure as e:
                self.log.info(
                    "ODMR session with {peer} failed at {stage}: {reply}",
                    peer=peer,
                    stage=e.stage,
                    reply=str(e.reply),
                )
            else:
                while pending and client.connected:
                    lease = pending.pop(0)
                    outcomes = await self._transaction(client, lease, peer)
                    if outcomes is None:
                        continue
                    delivered += sum(1 for o in outcomes if o.delivered)
                    try:
                        await self.settle(lease, outcomes)
                    except Exception:
                        self.log.failure("recording ODMR outcomes of {queueID} failed", queueID=lease.queueID)
            await client.quit()
        finally:
            if cut.active():
                cut.cancel()
            self.giveBack(pending)
            self.log.info(
                "ODMR session with {peer}: {delivered} recipients delivered, {left} returned",
                peer=peer,
                delivered=delivered,
                left=sum(len(lease.recipients) for lease in pending),
            )

    async def _transaction(
        self, client: SMTPClient, lease: Lease, peer: str
    ) -> list[RecipientOutcome] | None:
        try:
            body = await self._queue.openBody(lease.queueID)
        except KeyError:
            self.log.info("{queueID} left the queue before ODMR delivery", queueID=lease.queueID)
            return None
        except Exception:
            self.log.failure("opening {queueID} for ODMR delivery failed", queueID=lease.queueID)
            self.giveBack([lease])
            return None
        recipients = [qr.recipient for qr in lease.recipients]
        envelope = replace(lease.envelope, recipients=tuple(recipients))
        try:
            replies: Sequence[SMTPReply] = await client.transaction(envelope, body)
        except HostFailure as e:
            reply = e.reply
            if reply.isPermanent and not e.permanent:
                # About this connection, not the message: try it again later.
                reply = SMTPReply(451, "4.4.0", f"ODMR session failed: {reply.code} {reply.text}")
            replies = [reply] * len(recipients)
        return [
            RecipientOutcome(recipient, reply, remoteMTA=peer)
            for recipient, reply in zip(recipients, replies, strict=True)
        ]


class ODMRServerProtocol(SMTPServerProtocol):
    """
    A session of the C{odmr} listener: EHLO, STARTTLS, AUTH, ATRN, and
    the session commands; nothing that submits mail.

    @ivar odmr: the listener's L{ODMRHandler} (set by the factory).
    """

    odmr: ODMRHandler | None = None
    allowed: ClassVar[frozenset[str]] = frozenset(
        {"EHLO", "AUTH", "STARTTLS", "QUIT", "RSET", "NOOP", "HELP"}
    )

    def extensions(self) -> list[str]:
        keep = ("PIPELINING", "ENHANCEDSTATUSCODES", "STARTTLS", "AUTH")
        return [k for k in super().extensions() if k.split(" ")[0] in keep] + ["ATRN"]

    def notOffered(self, argument: str) -> None:
        self.replies.respond(ODMR_ONLY)

    def smtp_ATRN(self, argument: str) -> None:
        """
        RFC 2645 5: collect the mail of the domains named (see the module
        docstring).
        """
        odmr = self.odmr
        session = self.session
        if odmr is None:
            self.replies.respond(R.NOT_IMPLEMENTED)
            return
        if session.helo is None:
            self.replies.respond(R.NEED_HELO)
            return
        if session.authenticated is None:
            self.replies.respond(R.NEED_AUTH)
            return
        domains = parseATRNArgument(argument)
        if domains is None:
            self.replies.respond(SYNTAX)
            return
        for domain in domains:
            if not odmr.settings.mayCollect(self.avatar, domain):
                self.log.warn(
                    "ATRN {domain} from {peer} ({user}) refused",
                    domain=domain,
                    peer=self.peer,
                    user=session.authenticated,
                )
                self.replies.respond(refused(domain))
                return
        leased: list[Lease] = []

        def claimed(leases: list[Lease]) -> Answer:
            if self.state.closed:
                odmr.giveBack(leases)
                return Answer(TRY_LATER)
            leased.extend(leases)
            return Answer(REVERSING if leases else NO_MAIL)

        def failed(failure: Failure) -> Answer:
            self.log.failure("ATRN from {peer}: leasing failed", failure, peer=self.peer)
            return Answer(TRY_LATER)

        def then(answer: Answer) -> None:
            if leased:
                self._reverse(odmr, leased)

        d = Deferred.fromCoroutine(odmr.claim(domains)).addCallbacks(claimed, failed)
        self.replies.respondLater(d, then, cancellable=False)

    def _reverse(self, odmr: ODMRHandler, leases: list[Lease]) -> None:
        count = sum(len(lease.recipients) for lease in leases)
        self.log.info("ATRN from {peer}: reversing for {count} recipients", peer=self.peer, count=count)
        client = SMTPClient(
            ClientOptions(helo=odmr.hostname, tls="none"),
            odmr.clock,
            self.session.helo or self.peer,
            self.session.peerHost,
            useTLS=False,
            encrypted=self.session.tls,
        )
        self.handOver(client)
        Deferred.fromCoroutine(odmr.deliver(client, leases, self.peer)).addErrback(
            lambda f: self.log.failure("ODMR session with {peer} failed", f, peer=self.peer)
        )


_commands: dict[str, Any] = {
    **{verb: ODMRServerProtocol.notOffered for verb in SMTPServerProtocol.commands},
    **{verb: h for verb, h in SMTPServerProtocol.commands.items() if verb in ODMRServerProtocol.allowed},
    "ATRN": ODMRServerProtocol.smtp_ATRN,
}
ODMRServerProtocol.commands = _commands
