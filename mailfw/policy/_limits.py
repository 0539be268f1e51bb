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
  - Stress mode: while this process holds at least C{stress_threshold}
    connections, the tighter C{stress_connections_per_client} and
    C{stress_connections_per_network} apply, as Postfix shortens its limits
    under stress; entering and leaving it is logged.

Clients in C{exempt_networks} (loopback by default) are held to no limit
but count towards the total that decides stress; authenticated clients
and clients with relay rights are not held to the message and recipient
rates (C{[auth.quotas]} limits authenticated senders).  Per-session error
limits and AUTH failures are not counted here: C{[smtp]
soft_error_limit}/C{hard_error_limit} and the AUTH lockout handle those.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
    "CLIENT_BUSY",
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
    @ivar stressThreshold: connections of this process at which stress
        mode starts.
    """

    connectionsPerClient: int = 10
    connectionsPerNetwork: int = 50
    connectionRate: int = 60
    messageRate: int = 120
    recipientRate: int = 1000
    rateWindow: float = 60.0
    stressThreshold: int = 500
    stressConnectionsPerClient: int = 2
    stressConnectionsPerNetwork: int = 10


class LimitsPolicy(Policy):
    """
    Connection counts, rates and stress mode; see the module's description.

    @ivar connections: this process's live connections (all clients).
    @ivar stressed: whether stress mode is on.
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
        self.stressed = False
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
        if self.stressed:
            perClient = _tighter(perClient, settings.stressConnectionsPerClient)
            perNetwork = _tighter(perNetwork, settings.stressConnectionsPerNetwork)
        if perClient and self._perClient.get(client, 0) >= perClient:
            return self._refuse(CLIENT_BUSY, session, "connections per client")
        if perNetwork and self._perNetwork.get(network, 0) >= perNetwork:
            return self._refuse(NETWORK_BUSY, session, "connections per network")
        self._admit(key, (client, network))
        if not settings.connectionRate:
            return CONTINUE
        return self._count(f"limits:conn:{client}", lambda count: self._connectionRate(count, key, session))

    def _connectionRate(self, count: int, key: str, session: Session) -> Verdict:
        if count <= self.settings.connectionRate:
            return CONTINUE
        self._release(key)
        return self._refuse(CONNECTION_RATE, session, "connection rate")

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

    def _count(self, key: str, decide: Callable[[int], Verdict]) -> Verdict | Deferred[Verdict]:
        """
        Count one more for C{key} and C{decide} on the new count: at once
        with the in-memory store, so that a message does not pay for
        Deferreds it does not need; else when the shared store answers.
        """
        rates, window, now = self.rates, self.settings.rateWindow, self.clock.seconds()
        if isinstance(rates, MemorySharedState):
            return decide(rates.countNow(key, 1, window, now))
        return rates.count(key, 1, window, now).addCallback(decide)

    def sessionEnded(self, session: Session) -> None:
        self._release(_sessionKey(session))

    # --- bookkeeping --------------------------------------------------------

    def _admit(self, key: str, where: tuple[str, str] | None) -> None:
        self._sessions[key] = where
        if where is not None:
            client, network = where
            self._perClient[client] = self._perClient.get(client, 0) + 1
            self._perNetwork[network] = self._perNetwork.get(network, 0) + 1
        self.connections += 1
        threshold = self.settings.stressThreshold
        if threshold and not self.stressed and self.connections >= threshold:
            self.stressed = True
            self.log.warn(
                "limits {policy}: stress mode on at {connections} connections",
                policy=self.name,
                connections=self.connections,
            )

    def _release(self, key: str) -> None:
        if key not in self._sessions:
            return
        where = self._sessions.pop(key)
        if where is not None:
            client, network = where
            _decrement(self._perClient, client)
            _decrement(self._perNetwork, network)
        self.connections -= 1
        # Hysteresis: leave stress mode well below the threshold, so that
        # the mode does not flap with every connection.
        if self.stressed and self.connections < self.settings.stressThreshold * 3 // 4:
            self.stressed = False
            self.log.info(
                "limits {policy}: stress mode off at {connections} connections",
                policy=self.name,
                connections=self.connections,
            )

    def _refuse(self, reply: SMTPReply, session: Session, what: str) -> Verdict:
        self.log.info(
            "limits {policy}: {peer} over its {what}{stress}",
            policy=self.name,
            peer=session.peerHost,
            what=what,
            stress=" (stress mode)" if self.stressed else "",
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
        stressThreshold=section.integer("stress_threshold", defaults.stressThreshold, minimum=0),
        stressConnectionsPerClient=section.integer(
            "stress_connections_per_client", defaults.stressConnectionsPerClient, minimum=0
        ),
        stressConnectionsPerNetwork=section.integer(
            "stress_connections_per_network", defaults.stressConnectionsPerNetwork, minimum=0
        ),
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
