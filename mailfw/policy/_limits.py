"""
The C{limits} policy: what one client, or one client network, may cost the
server, in the spirit of Postfix's anvil and stress mode.

  - Simultaneous connections per client address and per client network
    (IPv4 /24, IPv6 /64 by default): more get 421 4.7.0 and are closed.
    These counts are of this process's connections (as anvil's are of one
    machine's) and hold only live sessions, so they are bounded by the
    listener's C{[smtp] max_connections}.
  - Connections, messages (MAIL) and recipients (RCPT) per client per
    C{rate_window} seconds: a connection over the rate gets 421 4.7.0, a
    message or recipient 450 4.7.1 (try later; nothing is lost).  An IPv6
    client is counted by its /64.  The counters are kept in a bounded
    in-memory store (at most C{max_clients} clients, least recently seen
    forgotten first), or in the queue's shared state with
    C{shared_rates = true}, so that every node counts together.
  - Error replies (5xx) and failed AUTH exchanges per client per
    C{rate_window}, added up across its sessions as each one ends
    (C{Session.errors}, C{Session.authFailures}): at C{errors_per_client}
    errors or C{auth_failures_per_client} failures the client's next
    connection gets 421 4.7.0, until the window ends (as Postfix's anvil
    limits AUTH requests per client).  This protects the server from a
    client; the per-session C{[smtp] hard_error_limit} still ends one
    session, and the AUTH lockout still protects one account.  A client
    that never disconnects is bounded by the per-session limit.
  - Stress mode: a session that began while its listener was under stress
    (C{Session.stressed}, decided by the listener factory at C{[smtp]
    stress_threshold}) is held to the tighter
    C{stress_connections_per_client} and C{stress_connections_per_network},
    as Postfix shortens its limits under stress.

Clients in C{exempt_networks} (loopback by default) are held to no limit;
authenticated clients and clients with relay rights are not held to the
message and recipient rates (C{[auth.quotas]} limits authenticated
senders), and their errors are not counted; their AUTH failures are (a
client that guessed a password after nine tries made nine tries).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import ISharedState
from mailfw.policy import CONTINUE, Policy, Verdict
from mailfw.policy._clients import LOOPBACK, Network, inNetworks, networkOf, networks, prefixes
from mailfw.reply import SMTPReply
from mailfw.sharedstate import MemorySharedState, sharedStateFor

__all__ = [
    "AUTH_FAILURES",
    "CLIENT_BUSY",
    "CLIENT_ERRORS",
    "CONNECTION_RATE",
    "MESSAGE_RATE",
    "NETWORK_BUSY",
    "RECIPIENT_RATE",
    "LimitSettings",
    "LimitsPolicy",
    "fromConfig",
]

CLIENT_BUSY = SMTPReply(421, "4.7.0", "Too many connections from your address, try again later")
NETWORK_BUSY = SMTPReply(421, "4.7.0", "Too many connections from your network, try again later")
CONNECTION_RATE = SMTPReply(
    421, "4.7.0", "Too many connections from your address per minute, try again later"
)
MESSAGE_RATE = SMTPReply(450, "4.7.1", "Too much mail from your address, try again later")
RECIPIENT_RATE = SMTPReply(450, "4.7.1", "Too many recipients from your address, try again later")
CLIENT_ERRORS = SMTPReply(421, "4.7.0", "Too many errors from your address, try again later")
AUTH_FAILURES = SMTPReply(421, "4.7.0", "Too many failed logins from your address, try again later")


@dataclass(frozen=True)
class LimitSettings:
    """
    The limits; 0 turns one off.

    @ivar connectionsPerClient: simultaneous connections per address.
    @ivar connectionsPerNetwork: simultaneous connections per network.
    @ivar connectionRate: connections per client per C{rateWindow}.
    @ivar messageRate: MAIL commands per client per C{rateWindow}.
    @ivar recipientRate: RCPT commands per client per C{rateWindow}.
    @ivar rateWindow: seconds.
    @ivar stressConnectionsPerClient: C{connectionsPerClient} for a session
        that began under stress (C{Session.stressed}), if tighter.
    @ivar stressConnectionsPerNetwork: the same for C{connectionsPerNetwork}.
    @ivar errorsPerClient: error replies per client per C{rateWindow}, over
        its sessions, at which its next connection is refused.  The default
        is five sessions' worth at the default C{[smtp] hard_error_limit}:
        a sender with many bad addresses gets by, an address harvester
        does not.
    @ivar authFailuresPerClient: failed AUTH exchanges per client per
        C{rateWindow} at which its next connection is refused.  A user with
        a stale password in a few devices stays well below 10 a minute; a
        password guesser spreading its tries over many accounts (which the
        per-account lockout does not see) does not.
    """

    connectionsPerClient: int = 10
    connectionsPerNetwork: int = 50
    connectionRate: int = 60
    messageRate: int = 120
    recipientRate: int = 1000
    rateWindow: float = 60.0
    stressConnectionsPerClient: int = 2
    stressConnectionsPerNetwork: int = 10
    errorsPerClient: int = 100
    authFailuresPerClient: int = 10


class LimitsPolicy(Policy):
    """
    Connection counts, rates and stress mode; see the module's description.

    @ivar connections: the live connections this policy was asked about
        (all clients).
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        settings: LimitSettings = LimitSettings(),
        rates: ISharedState | None = None,
        exempt: Sequence[Network] = (),
        prefixV4: int = 24,
        prefixV6: int = 64,
    ) -> None:
        self.name = name
        self.clock = clock
        self.settings = settings
        self.rates = rates if rates is not None else MemorySharedState(50_000)
        self.exempt = tuple(exempt)
        self.prefixV4 = prefixV4
        self.prefixV6 = prefixV6
        self.connections = 0
        # What a connection is checked against, in order: the counters that
        # only refuse are read (amount 0) before the connection rate counts
        # one more.  Each: key, amount, the highest count let in, reply.
        checks: list[tuple[str, int, int, SMTPReply, str]] = []
        if settings.errorsPerClient:
            checks.append(("err", 0, settings.errorsPerClient - 1, CLIENT_ERRORS, "error count"))
        if settings.authFailuresPerClient:
            checks.append(
                ("auth", 0, settings.authFailuresPerClient - 1, AUTH_FAILURES, "AUTH failure count")
            )
        if settings.connectionRate:
            checks.append(("conn", 1, settings.connectionRate, CONNECTION_RATE, "connection rate"))
        self._clientChecks = tuple(checks)
        # Live sessions only: session id -> (client, network) or None for
        # an exempt client.
        self._sessions: dict[str, tuple[str, str] | None] = {}
        self._perClient: dict[str, int] = {}
        self._perNetwork: dict[str, int] = {}

    def _client(self, host: str) -> str:
        # An IPv4 address, or an IPv6 /64 (one host usually has a whole one).
        return networkOf(host, 32, 64)

    def checkConnection(self, session: Session) -> Verdict | Deferred[Verdict]:
        key = _sessionKey(session)
        if key in self._sessions:
            return CONTINUE
        if inNetworks(session.peerHost, self.exempt):
            self._admit(key, None)
            return CONTINUE
        settings = self.settings
        client = self._client(session.peerHost)
        network = networkOf(session.peerHost, self.prefixV4, self.prefixV6)
        perClient, perNetwork = settings.connectionsPerClient, settings.connectionsPerNetwork
        if session.stressed:
            perClient = _tighter(perClient, settings.stressConnectionsPerClient)
            perNetwork = _tighter(perNetwork, settings.stressConnectionsPerNetwork)
        if perClient and self._perClient.get(client, 0) >= perClient:
            return self._refuse(CLIENT_BUSY, session, "connections per client")
        if perNetwork and self._perNetwork.get(network, 0) >= perNetwork:
            return self._refuse(NETWORK_BUSY, session, "connections per network")
        self._admit(key, (client, network))
        return self._checkClient(0, client, key, session)

    def _checkClient(
        self, index: int, client: str, key: str, session: Session
    ) -> Verdict | Deferred[Verdict]:
        """
        The client's counters from C{index} on (see C{_clientChecks}): the
        first over its limit releases the connection and refuses it.
        """
        if index == len(self._clientChecks):
            return CONTINUE
        kind, amount, limit, reply, what = self._clientChecks[index]

        def decide(count: int) -> Verdict | Deferred[Verdict]:
            if count <= limit:
                return self._checkClient(index + 1, client, key, session)
            self._release(key)
            return self._refuse(reply, session, what)

        return self._count(f"limits:{kind}:{client}", decide, amount)

    def checkSender(
        self, session: Session, sender: Address | None, parameters: Mapping[str, str | None]
    ) -> Verdict | Deferred[Verdict]:
        return self._rate(session, "msg", self.settings.messageRate, MESSAGE_RATE, "message rate")

    def checkRecipient(
        self, session: Session, envelope: Envelope, recipient: Recipient
    ) -> Verdict | Deferred[Verdict]:
        return self._rate(session, "rcpt", self.settings.recipientRate, RECIPIENT_RATE, "recipient rate")

    def _rate(
        self, session: Session, kind: str, limit: int, reply: SMTPReply, what: str
    ) -> Verdict | Deferred[Verdict]:
        if not limit or session.relayClient or session.authenticated:
            return CONTINUE
        if inNetworks(session.peerHost, self.exempt):
            return CONTINUE
        client = self._client(session.peerHost)
        return self._count(
            f"limits:{kind}:{client}",
            lambda count: CONTINUE if count <= limit else self._refuse(reply, session, what),
        )

    def _count(
        self, key: str, decide: Callable[[int], Verdict | Deferred[Verdict]], amount: int = 1
    ) -> Verdict | Deferred[Verdict]:
        """
        Count C{amount} more (0: only read) for C{key} and C{decide} on the
        new count: at once with the in-memory store, so that a message does
        not pay for Deferreds it does not need; else when the shared store
        answers.
        """
        rates, window, now = self.rates, self.settings.rateWindow, self.clock.seconds()
        if isinstance(rates, MemorySharedState):
            return decide(rates.countNow(key, amount, window, now))
        return rates.count(key, amount, window, now).addCallback(decide)

    def sessionEnded(self, session: Session) -> None:
        self._release(_sessionKey(session))
        if session.errors or session.authFailures:
            self._addFailures(session)

    def _addFailures(self, session: Session) -> None:
        """
        Add an ended session's errors and AUTH failures to its client's
        counters, which its next connections are checked against.
        """
        settings = self.settings
        if inNetworks(session.peerHost, self.exempt):
            return
        client = self._client(session.peerHost)
        trusted = session.relayClient or session.authenticated is not None
        if settings.errorsPerClient and session.errors and not trusted:
            self._add(f"limits:err:{client}", session.errors)
        if settings.authFailuresPerClient and session.authFailures:
            self._add(f"limits:auth:{client}", session.authFailures)

    def _add(self, key: str, amount: int) -> None:
        rates, window, now = self.rates, self.settings.rateWindow, self.clock.seconds()
        if isinstance(rates, MemorySharedState):
            rates.countNow(key, amount, window, now)
            return
        # Nobody waits for this: a store that fails loses a count, and says so.
        rates.count(key, amount, window, now).addErrback(
            lambda failure: self.log.failure(
                "limits {policy}: counting {key} failed", failure, policy=self.name, key=key
            )
        )

    # --- bookkeeping --------------------------------------------------------

    def _admit(self, key: str, where: tuple[str, str] | None) -> None:
        self._sessions[key] = where
        if where is not None:
            client, network = where
            self._perClient[client] = self._perClient.get(client, 0) + 1
            self._perNetwork[network] = self._perNetwork.get(network, 0) + 1
        self.connections += 1

    def _release(self, key: str) -> None:
        if key not in self._sessions:
            return
        where = self._sessions.pop(key)
        if where is not None:
            client, network = where
            _decrement(self._perClient, client)
            _decrement(self._perNetwork, network)
        self.connections -= 1

    def _refuse(self, reply: SMTPReply, session: Session, what: str) -> Verdict:
        self.log.info(
            "limits {policy}: {peer} over its {what}{stress}",
            policy=self.name,
            peer=session.peerHost,
            what=what,
            stress=" (stress mode)" if session.stressed else "",
        )
        return Verdict(reply, disconnect=reply.code == 421)


def _sessionKey(session: Session) -> str:
    return session.id or f"{session.peerHost}:{session.peerPort}"


def _tighter(normal: int, stressed: int) -> int:
    if not stressed:
        return normal
    if not normal:
        return stressed
    return min(normal, stressed)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> LimitsPolicy:
    """
    Build a C{limits} policy from C{[policy.NAME]}; see
    C{docs/configuration.rst} for the options.
    """
    section = Section(f"[policy.{instanceName}]", options)
    defaults = LimitSettings()
    settings = LimitSettings(
        connectionsPerClient=section.integer(
            "connections_per_client", defaults.connectionsPerClient, minimum=0
        ),
        connectionsPerNetwork=section.integer(
            "connections_per_network", defaults.connectionsPerNetwork, minimum=0
        ),
        connectionRate=section.integer("connection_rate", defaults.connectionRate, minimum=0),
        messageRate=section.integer("message_rate", defaults.messageRate, minimum=0),
        recipientRate=section.integer("recipient_rate", defaults.recipientRate, minimum=0),
        rateWindow=section.number("rate_window", defaults.rateWindow, minimum=1),
        stressConnectionsPerClient=section.integer(
            "stress_connections_per_client", defaults.stressConnectionsPerClient, minimum=0
        ),
        stressConnectionsPerNetwork=section.integer(
            "stress_connections_per_network", defaults.stressConnectionsPerNetwork, minimum=0
        ),
        errorsPerClient=section.integer("errors_per_client", defaults.errorsPerClient, minimum=0),
        authFailuresPerClient=section.integer(
            "auth_failures_per_client", defaults.authFailuresPerClient, minimum=0
        ),
    )
    # Stress mode is the listener's now ([smtp] stress_threshold).  The old
    # "0: never" keeps its meaning here; a threshold cannot, so it is an
    # error rather than a setting that silently does nothing.
    oldThreshold = section.integer("stress_threshold", None, minimum=0)
    if oldThreshold == 0:
        settings = replace(settings, stressConnectionsPerClient=0, stressConnectionsPerNetwork=0)
    elif oldThreshold is not None:
        raise ConfigError(
            f"{section.title} stress_threshold: stress mode is decided by each listener now;"
            " set [smtp] stress_threshold instead (0 here still means: no tighter limits"
            " under stress)"
        )
    prefixV4, prefixV6 = prefixes(section)
    exempt = networks(section, "exempt_networks", LOOPBACK)
    maxClients = section.integer("max_clients", 50_000, minimum=1)
    shared = section.flag("shared_rates", False)
    section.finish()
    rates: ISharedState
    if shared:
        if context.queue is None:
            raise ConfigError(f"{section.title} shared_rates: no queue was given to keep them")
        rates = sharedStateFor(context.queue, maxClients)
    else:
        rates = MemorySharedState(maxClients)
    return LimitsPolicy(instanceName, context.reactor, settings, rates, exempt, prefixV4, prefixV6)
