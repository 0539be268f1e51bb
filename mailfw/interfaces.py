"""
Every public interface of mailfw, and nothing else.

Each component kind has two interfaces: the component itself (for example
L{IDeliveryAgent}) and a plugin that builds it from a configuration section
(L{IDeliveryAgentFactory}).  Factories are found with L{twisted.plugin} and
chosen by their C{name}: C{plugin = "maildir"} in C{[delivery.local]}.

Components never block the reactor: anything that may wait returns a
L{Deferred}.  Expected refusals are values (L{SMTPReply},
L{RecipientOutcome}), not exceptions; a L{Deferred} that fails means a bug
or an unexpected fault, which the caller logs and answers with a 4xx.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, BinaryIO

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IConsumer

    from mailfw.address import Address
    from mailfw.config import ComponentContext
    from mailfw.envelope import Envelope, Recipient, RecipientOutcome, Route, Session
    from mailfw.hosting._values import AliasEntry, Mailbox, SenderRight
    from mailfw.queued import (
        Disposition,
        Lease,
        Notice,
        QueuedMessage,
        Selector,
    )
    from mailfw.verdict import AuthResult, Verdict


class INamedPlugin(IPlugin):
    """
    A plugin that configuration refers to by name.
    """

    name = Attribute(
        "C{str}: what users write after C{plugin =}, e.g. C{'maildir'}. "
        "Unique among installed providers of the same interface."
    )


# --- message bodies --------------------------------------------------------


class IMessageBody(Interface):
    """
    The stored bytes of one message: headers and body, lines ending in CRLF,
    dot-stuffing undone.
    """

    size = Attribute("C{int}: the length of the message in octets.")

    def open() -> BinaryIO:
        """
        Open the message for reading from the start.  Each call returns a
        new reader; the caller closes it.

        Opening and reading block (they touch the disk or the database), so
        only code that already runs in a thread calls this, such as the
        Maildir agent's writes in its thread pool.  Code on the reactor
        thread calls L{produce} instead.
        """

    def produce(consumer: IConsumer) -> Deferred[None]:
        """
        Write the whole message, from the start, to C{consumer}.

        The body registers a streaming producer on C{consumer} and honours
        its C{pauseProducing}, C{resumeProducing} and C{stopProducing}: a
        paused producer writes nothing until resumed.  Reads happen off the
        reactor thread (a body held in memory may write from it), a bounded
        piece at a time, so neither a slow consumer nor a large message
        grows the process.  Writes happen on the reactor thread.  The
        producer is unregistered before the result fires, unless the
        consumer stopped it.

        @return: fires with L{None} once every octet was written; fails
            with L{mailfw.queue._produce.ProducerStopped} if the consumer
            stopped the producer first, and with the reader's exception
            (usually L{OSError}) if the message cannot be read.  A caller
            must treat the latter as a local, transient fault.
        """


class IIncomingMessage(Interface):
    """
    A message being received into the queue, written as it arrives.
    """

    queueID = Attribute(
        "C{str}: the queue ID chosen before the body arrives, so that the "
        "C{Received:} header and the logs can name it."
    )

    def write(data: bytes) -> None:
        """
        Append C{data} to the message.  Never blocks: large messages are
        spooled off the reactor thread.
        """

    def rewind() -> None:
        """
        Forget everything written so far, to write a replacement body (a
        filter replaced it).
        """

    def commit(header: bytes = b"", envelope: Envelope | None = None, hold: bool = False) -> Deferred[str]:
        """
        Make the message and the state of each of its recipients durable.

        @param header: stored above everything written: the session keeps
            the header section until the end of data, so that the
            end-of-data policies can still edit it.
        @param envelope: replaces the envelope given to C{receive} (a
            filter changed the sender or the recipients).
        @param hold: store the recipients held for an operator
            (quarantine) instead of ready.

        @return: fires with the queue ID only when the message would survive
            a crash; only then may the server answer 250.  Fails with
            L{mailfw.queued.QueueFull} when the disk is full (the server
            answers 452) and with any other exception for other faults
            (451).
        """

    def abort() -> None:
        """
        Forget the message (the client refused, the session ended, or the
        body was invalid).  Safe to call at any time, also after a failed
        commit.
        """


# --- the queue -------------------------------------------------------------


class IMessageIntake(Interface):
    """
    The part of a queue that the SMTP server (and anything else that
    accepts mail) uses: storing new messages durably.
    """

    def receive(envelope: Envelope) -> IIncomingMessage:
        """
        Start receiving a message for C{envelope}.
        """


class ILeaseStore(Interface):
    """
    The part of a queue that the scheduler uses: leasing due recipients,
    recording what became of them, and reading their messages.

    Several schedulers (on one node or on several) may claim from one queue:
    claims are exclusive leases, and records are fenced by the lease token.
    """

    leaseSeconds = Attribute(
        "C{float} or C{None}: how long a claim lasts before another scheduler "
        "may take the recipients over; start-up refuses a scheduler delivery "
        "timeout that is not shorter.  C{None} when claims never expire."
    )

    def claim(now: float, limit: int) -> Deferred[Sequence[Lease]]:
        """
        Lease up to C{limit} due recipients (state ready or etrn, with
        C{nextAttempt <= now}), grouped by message.  An etrn recipient is
        due only for housekeeping (a delay notice, expiry) unless a flush
        released it.  A leased recipient is claimed by no one
        else until its lease expires or is recorded.
        """

    def record(
        lease: Lease, dispositions: Sequence[Disposition], notices: Sequence[Notice] = ()
    ) -> Deferred[None]:
        """
        Record the outcome of a delivery attempt for some or all leased
        recipients, and enqueue C{notices} (bounces and delay warnings) in
        the same transaction.  Delivered and failed recipients leave the
        queue; deferred ones become ready at their C{nextAttempt}.  A message
        with no recipients left is removed.  Leased recipients without a
        disposition return to ready.

        @raise mailfw.queued.LeaseLost: (as a failure) if the lease expired
            and was taken over; nothing is written.
        """

    def openBody(queueID: str) -> Deferred[IMessageBody]:
        """
        The stored message.  Fails with L{KeyError} if it is not queued.
        """

    def nextDue() -> Deferred[float | None]:
        """
        The earliest C{nextAttempt} of a ready recipient, or of a lease
        expiry, or C{None} if nothing waits; the scheduler sleeps until then.
        """

    def notifyDue(callback: Callable[[], None]) -> None:
        """
        Call C{callback} whenever recipients may have become due earlier than
        L{nextDue} said: a new message, a flush, a release.
        """

    def recover(now: float) -> Deferred[int]:
        """
        Return recipients whose lease has expired to ready; at start-up this
        recovers what a crashed process was delivering.

        @return: how many recipients were recovered.
        """


class IQueueAdmin(Interface):
    """
    The part of a queue that operators use (C{mailfw queue ...}, ETRN):
    listing recipients and acting on those a selector matches.
    """

    def list(selector: Selector) -> Deferred[Sequence[QueuedMessage]]:
        """
        Messages having a recipient that matches C{selector}, oldest first,
        with their matching recipients.
        """

    def hold(selector: Selector) -> Deferred[int]:
        """
        Hold matching ready recipients until released.  Returns how many.
        """

    def release(selector: Selector) -> Deferred[int]:
        """
        Make held matching recipients ready and due now.  Returns how many.
        """

    def flush(selector: Selector) -> Deferred[int]:
        """
        Make matching ready and held-for-ETRN recipients due now and mark
        them released, so that a hold-for-ETRN destination is attempted
        (ETRN and C{mailfw queue flush}).  Operator holds stay.  Returns how
        many.
        """

    def bounce(selector: Selector) -> Deferred[int]:
        """
        Return matching recipients to their senders now (C{mailfw queue
        bounce}): mark those not in delivery (ready, hold, etrn) as
        L{bounceRequested<mailfw.queued.QueuedRecipient.bounceRequested>},
        make them ready and due now, and wake the scheduler, which fails
        them with a DSN instead of delivering them.  Leased recipients are
        left alone.  Returns how many were marked.
        """

    def delete(selector: Selector) -> Deferred[int]:
        """
        Remove matching recipients without notice (an operator's drop).
        Returns how many.
        """


class IMessageQueue(IMessageIntake, ILeaseStore, IQueueAdmin):
    """
    The durable store of accepted messages and the state of each recipient:
    what a queue plugin provides.  Its parts are separate interfaces so that
    each caller names only the part it uses (the server
    L{IMessageIntake}, the scheduler L{ILeaseStore}, the operator's tools
    L{IQueueAdmin}).
    """

    def close() -> Deferred[None]:
        """
        Finish pending commits and release resources (service stop).
        """


class IDestinationSlots(Interface):
    """
    Optional for a queue shared by several nodes: per-destination
    connection limits that hold for the whole cluster, so ten nodes do not
    open ten times the connections to one mail exchanger.  The scheduler
    uses it when its queue provides it.
    """

    def acquireDestination(destination: str, limit: int) -> Deferred[bool]:
        """
        Take one of the C{limit} cluster-wide slots of C{destination}
        (C{"agent:nexthop"}).

        @return: C{True} when this node now holds a slot (give it back with
            L{releaseDestination}), C{False} when all are taken.
        """

    def releaseDestination(destination: str) -> Deferred[None]:
        """
        Give back one slot that L{acquireDestination} gave this node.
        """


class ILeaseOffers(Interface):
    """
    Optional for a queue: a new message can be stored already leased to
    this process's scheduler, in the transaction that stores it, and handed
    to the scheduler after the commit, instead of being stored ready and
    claimed in a second transaction.  The scheduler uses it when its queue
    provides it; like Postfix's active queue, new mail then goes straight
    to delivery while the scheduler has room.
    """

    def offerNew(room: Callable[[], int], take: Callable[[Lease], None]) -> None:
        """
        From now on, a new message is stored leased to this process when
        its recipients fit in C{room()} less the recipients of the leased
        messages still being committed; once its commit is done,
        C{take(lease)} is called on the reactor thread, in commit order
        (and L{ILeaseStore.notifyDue}'s callback is not).  Messages that
        do not fit are stored ready as usual.  A lease C{take} does not act
        on is recovered like any lost lease: by L{ILeaseStore.recover}
        after the process ends, or when it expires.
        """


class ISelectiveClaim(Interface):
    """
    Optional for a queue: lease the waiting recipients that match a
    selector now, whatever their due time (ODMR, RFC 2645: the customer
    is connected and asks for its domains' mail).  The lease fences them
    as L{ILeaseStore.claim}'s does, so no scheduler of any process takes
    them while they are delivered over the customer's connection.
    """

    def claimMatching(selector: Selector, now: float, limit: int) -> Deferred[Sequence[Lease]]:
        """
        Lease up to C{limit} recipients in state ready or etrn that match
        C{selector}, grouped by message, oldest due first.  Held (operator)
        and leased recipients are left alone.
        """


class ISharedState(Interface):
    """
    Optional for a queue: small counters and marks that every process and
    every node of one server must agree on (AUTH failures, sending quotas,
    greylisting triplets), kept in the queue's database so that SQLite
    serves one machine and PostgreSQL serves many (both SQL queues provide
    it).  Components use it when the queue provides it, and a bounded
    in-memory store per process otherwise
    (L{mailfw.sharedstate.MemorySharedState}); get the right one with
    L{mailfw.sharedstate.sharedStateFor}.  Stores commit these writes
    without waiting for the disk: a crash may lose the last few counts,
    never mail.

    Keys are short strings chosen by the caller, prefixed with the
    component's name (C{"auth-fail:203.0.113.0/24:alice"}); times are
    seconds since the epoch, passed in so that tests can use a clock.
    """

    def count(key: str, amount: int, window: float, now: float) -> Deferred[int]:
        """
        Add C{amount} to the counter C{key} and return its new value.

        A counter lives for C{window} seconds from its first count; after
        that the next count starts it again from zero (a fixed window).
        C{amount} may be 0 to read the counter without changing it.
        """

    def mark(key: str, lifetime: float, now: float) -> Deferred[float]:
        """
        Remember C{key} until C{now + lifetime}, unless a live mark exists.

        @return: when the live mark was first set: C{now} for a new mark,
            an earlier time for one that was already there (greylisting asks
            "since when have I seen this triplet?").
        """

    def forget(key: str) -> Deferred[None]:
        """
        Remove the counter or mark C{key} (a successful login clears its
        failures).
        """


class IDescribed(Interface):
    """
    Optional for any component: how start-up names it in its log, and which
    files it writes, so that C{twistd --uid/--gid} can hand them to the
    user the server runs as.  Start-up knows nothing about a plugin's
    internals; a third-party component says this about itself.
    """

    def describe() -> str:
        """
        One line for the start-up log, e.g. C{"sqlite /var/lib/mailfw/q.db"}.
        """

    def ownedPaths() -> Sequence[str]:
        """
        Files and directories this component creates and writes, whether or
        not they exist yet; start-up gives each to the run-as user
        (directories are not descended into).
        """


class IMessageQueueFactory(INamedPlugin):
    """
    A plugin that builds the queue from C{[queue]}.
    """

    def fromConfig(
        context: ComponentContext, instanceName: str, options: Mapping[str, object]
    ) -> IMessageQueue:
        """
        Validate C{options} and build a queue.

        @raise mailfw.config.ConfigError: naming the bad option.
        """


# --- routing ---------------------------------------------------------------


class IRouter(Interface):
    """
    Decides where each recipient goes: at RCPT time (may this client send
    to it?) and again at delivery time (which agent, which next hop?).
    """

    def route(recipient: Address, session: Session | None) -> Deferred[Route]:
        """
        Route one recipient.

        @param session: the client at RCPT time, used for relay rights; at
            delivery time C{None}, and the answer must not refuse a
            recipient that was accepted.
        @return: a L{Route}.  Refusals are routes of kind
            L{mailfw.envelope.RouteKind.REFUSE} carrying the reply (554 5.7.1
            for relaying denied, 550 5.1.1 for an unknown local user).
        """


class IRouterFactory(INamedPlugin):
    """
    A plugin that builds the router from C{[routing]}.
    """

    def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> IRouter:
        """
        Validate C{options} (including the delivery instance names they
        mention, from C{context.agentNames}) and build a router.

        @raise mailfw.config.ConfigError: naming the bad option.
        """


# --- delivery --------------------------------------------------------------


class IDeliveryAgent(Interface):
    """
    The last hop of a message inside mailfw: write it to a mailbox, hand it
    to a program, or relay it to another server.
    """

    name = Attribute(
        "C{str}: the instance name from the configuration, used in log events; never sent to SMTP peers."
    )

    def deliver(
        envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        """
        Deliver C{body} to every recipient in C{envelope}, all of which share
        the next hop C{nexthop} (see L{mailfw.envelope.Route}).

        Must not block the reactor: do file or socket I/O through Twisted
        APIs or a thread pool.

        @return: One outcome per recipient, in envelope order.  A 4xx
            outcome asks the queue to retry that recipient later; a 5xx
            outcome produces a bounce.  The L{Deferred} fails only for
            bugs, and the scheduler then defers every recipient.
        """


class IConnectionGate(Interface):
    """
    The connection limits of traffic shaping (C{[scheduler.destinations]}):
    how often a delivery agent may open a connection for a destination,
    and how many messages each connection may carry.
    """

    def connect(domain: str, host: str) -> Deferred[int | None]:
        """
        Wait for the turn to open a new connection to the mail host C{host}
        for mail to C{domain}.

        @return: fires when the connection may be opened, with the most
            transactions it may carry (C{None}: no limit); never fails.
        """


class IConnectionShaping(Interface):
    """
    Optional for a delivery agent that opens connections itself (the SMTP
    relay): the scheduler hands it the destinations' connection limits.
    """

    def shapeConnections(gate: IConnectionGate) -> None:
        """
        From now on ask C{gate} before each new connection, and send no
        more transactions over one connection than it allows.
        """


class IDeliveryAgentFactory(INamedPlugin):
    """
    A plugin that builds L{IDeliveryAgent}s from C{[delivery.NAME]}.

    Providers live in a module under C{twisted/plugins/}, which Twisted
    imports during any plugin lookup, so it must import nothing heavy;
    defer those imports into L{fromConfig}.
    """

    def fromConfig(
        context: ComponentContext, instanceName: str, options: Mapping[str, object]
    ) -> IDeliveryAgent:
        """
        Validate C{options} and build an agent.

        @raise mailfw.config.ConfigError: raised at start-up, never on the
            first message.
        """


# --- policy ----------------------------------------------------------------


class IPolicy(Interface):
    """
    Checks at each stage of an SMTP session.  Policies are chained in
    configuration order; the first verdict that is not
    L{mailfw.policy.CONTINUE} decides.  Each method may return a
    L{mailfw.policy.Verdict} or a L{Deferred} firing with one; the server
    gives each call a timeout and answers 451 4.4.3 when it expires.
    Subclass L{mailfw.policy.Policy} to implement only the stages you need.

    Each C{[policy.NAME]} section also takes C{listeners} (default
    C{["smtp"]}), C{timeout} and C{on_error} (C{"defer"} or C{"accept"}):
    the chain applies them, so a policy never parses them itself.
    """

    name = Attribute("C{str}: the instance name, for logs.")

    def checkConnection(session: Session) -> Verdict | Deferred[Verdict]:
        """
        A client connected.  A refusal is sent instead of the greeting
        (554) and the server then answers only QUIT.
        """

    def checkHelo(session: Session, name: str) -> Verdict | Deferred[Verdict]:
        """
        The client sent EHLO or HELO with C{name}.
        """

    def checkSender(
        session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        """
        MAIL FROM; C{sender} is C{None} for C{<>}.
        """

    def checkRecipient(
        session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        """
        RCPT TO, after the router accepted C{recipient}; C{envelope} holds
        the sender and the recipients accepted so far.
        """

    def checkMessage(session: Session, envelope: Envelope, headers: bytes) -> Verdict | Deferred[Verdict]:
        """
        The message's header section is complete (C{headers}, as received).
        Asked then rather than at the end of data because the body streams
        into the queue: headers in the verdict can still go above it.  A
        refusal is answered after the real end of data, and the message is
        not queued.
        """

    def openMessage(session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        """
        The end-of-data stage: the message's header section is complete and
        accepted by every C{checkMessage}.  Return C{None} to skip this
        message, or an L{IMessageCheck} that is fed the body as it streams
        into the queue and answers at the end of data, before the 250.

        @param envelope: the envelope, with its C{queueID}.
        @param header: the header section as it will be queued (the
            server's C{Received:} field and the fields policies added on
            top), ending with the empty line.  Indexes in L{AddHeader
            <mailfw.verdict.AddHeader>} edits count its fields.
        """

    def sessionEnded(session: Session) -> None:
        """
        The connection C{session} (by L{Session.id}) is closed: forget what
        was kept for it.
        """


class IMessageCheck(Interface):
    """
    One policy's look at one message at the end-of-data stage.  It sees the
    body in the chunks it arrives in (decoded, dot-unstuffed, CRLF lines;
    chunk boundaries fall anywhere) and must not keep it all: hash it or
    forward it.
    """

    def write(data: bytes) -> Deferred[None] | None:
        """
        More of the body.  A L{Deferred} asks the session to stop reading
        from the client until it fires (a filter that cannot keep up); it
        must not fail.
        """

    def end(results: tuple[AuthResult, ...]) -> Verdict | Deferred[Verdict]:
        """
        The body is complete.  C{results} are the authentication results of
        the transaction so far (from earlier stages and from the checks
        before this one in the chain), so that DMARC can combine SPF's and
        DKIM's.  The verdict's C{edits} are applied to the queued copy.
        """

    def abort() -> None:
        """
        The message will not be queued (refused, or the client left):
        release what the check holds.  Not called after L{end}.
        """


# --- authentication ----------------------------------------------------------


class IMailUser(Interface):
    """
    An authenticated SMTP client: who it is and what it may do.
    """

    identity = Attribute(
        "C{str}: the authenticated name, recorded in C{Session.authenticated}, the envelope and the log."
    )
    senders = Attribute(
        "C{tuple[str, ...]}: normalised sender patterns: C{local@domain}, C{@domain} or C{*}."
    )
    etrnDomains = Attribute(
        "C{tuple[str, ...]}: domains the user may flush with ETRN: C{domain}, "
        "C{.domain} (its subdomains) or C{*}."
    )

    def maySend(sender: Address | None) -> bool:
        """
        Whether the user may use C{sender} (C{None} for C{<>}) as the
        reverse-path in MAIL FROM.  A refusal is answered 553 5.7.1.
        """

    def mayFlush(domain: str) -> bool:
        """
        Whether the user may ask with ETRN for C{domain}'s queued mail.
        """


class ISessionCredentials(Interface):
    """
    Credentials that also say which SMTP session presents them.

    A checker that asks another service (Dovecot) passes the client's
    address and the session's encryption on, for that service's logs,
    brute-force penalties and plaintext rules.  Checkers must also accept
    credentials without it.
    """

    session = Attribute("L{mailfw.envelope.Session}: the session at the time of AUTH.")


class IPolicyFactory(INamedPlugin):
    """
    A plugin that builds L{IPolicy}s from C{[policy.NAME]}.
    """

    def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> IPolicy:
        """
        Validate C{options} and build a policy.

        @raise mailfw.config.ConfigError: naming the bad option.
        """


# --- hosting ---------------------------------------------------------------


class IHostingTable(Interface):
    """
    The hosting data of virtual domains: which domains are hosted, their
    mailboxes, aliases (with a catch-all per domain) and which
    authenticated user may send as which address.  The router reads it at
    RCPT time, the AUTH realm at login, the C{mailfw} command edits it.

    Keys are normalised by L{mailfw.hosting.addressKey}, L{aliasKey
    <mailfw.hosting.aliasKey>} and L{domainKey <mailfw.hosting.domainKey>}.
    Every answer reflects the stored data at the time of the call (a change
    made by another process is seen by the next call).  Every method may
    fail with the store's error when the store cannot be reached; the
    admin operations fail with L{mailfw.hosting.HostingError} when the
    request itself is wrong.
    """

    def domain(name: str) -> Deferred[bool]:
        """
        Whether the normalised domain C{name} is hosted.
        """

    def mailbox(address: Address) -> Deferred[Mailbox | None]:
        """
        The mailbox of C{address}, or C{None}.
        """

    def aliases(address: Address) -> Deferred[tuple[str, ...]]:
        """
        The targets of C{address}: its own alias entries if it has any,
        else the catch-all C{@domain} entries of its domain, else none.
        """

    def maySendAs(user: str, address: Address) -> Deferred[bool]:
        """
        Whether C{user} may send as C{address}: its own mailbox (the user
        name is the address), or a right for the address or its C{@domain}.
        """

    def sendersFor(user: str) -> Deferred[tuple[str, ...]]:
        """
        Every sender pattern of C{user} (C{local@domain} or C{@domain}), as
        L{IMailUser.senders} spells them: its own mailbox, if it is one,
        and its rights.
        """

    def addDomain(name: str) -> Deferred[bool]:
        """
        Host C{name}; C{False} if it already was.
        """

    def deleteDomain(name: str) -> Deferred[bool]:
        """
        Stop hosting C{name}; C{False} if it was not hosted.  Fails with
        L{mailfw.hosting.HostingError} while it still has mailboxes or
        aliases.
        """

    def listDomains() -> Deferred[tuple[str, ...]]:
        """
        The hosted domains, sorted.
        """

    def addMailbox(mailbox: Mailbox) -> Deferred[bool]:
        """
        Add C{mailbox}, or replace the row of that address; C{False} if it
        replaced one.  Its domain must be hosted.
        """

    def deleteMailbox(address: str) -> Deferred[bool]:
        """
        Remove a mailbox; C{False} if there was none.
        """

    def listMailboxes(domain: str | None) -> Deferred[tuple[Mailbox, ...]]:
        """
        The mailboxes (of C{domain}, or all), sorted by address.
        """

    def addAlias(address: str, targets: Sequence[str]) -> Deferred[int]:
        """
        Add targets to the alias C{address} (C{local@domain} or
        C{@domain}); returns how many were new.  Its domain must be hosted.
        """

    def deleteAlias(address: str, target: str | None) -> Deferred[int]:
        """
        Remove one target of an alias, or all of them; returns how many.
        """

    def listAliases(domain: str | None) -> Deferred[tuple[AliasEntry, ...]]:
        """
        The alias entries (of C{domain}, or all), sorted.
        """

    def allowSender(user: str, address: str) -> Deferred[bool]:
        """
        Let C{user} send as C{address} (C{local@domain} or C{@domain});
        C{False} if it already could.
        """

    def denySender(user: str, address: str) -> Deferred[bool]:
        """
        Withdraw a right given by L{allowSender}; C{False} if there was none.
        """

    def listSenders(user: str | None) -> Deferred[tuple[SenderRight, ...]]:
        """
        The sender rights (of C{user}, or all), sorted.
        """

    def close() -> Deferred[None]:
        """
        Release the connections.
        """
