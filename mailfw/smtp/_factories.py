"""
The protocol factories for the three kinds of listener: C{smtp} (an MX on
port 25), C{submission} (587: STARTTLS, then authentication before MAIL)
and C{submissions} (465: implicit TLS from an C{ssl:} endpoint).

Each factory counts its connections, in total and per client address, and
turns away those over the limits with a 421 before any SMTP is spoken.
Clients in L{SMTPLimits.connectionLimitExceptions} (loopback by default,
like Postfix's C{smtpd_client_connection_limit_exceptions}) are held only
to the total limit.

The factory also decides stress mode (L{SMTPLimits.stressAt}): a session
that begins while it is on gets L{SMTPLimits.underStress} and a
C{Session.stressed} that policies read (the C{limits} policy tightens its
connection limits), so there is one notion of stress per listener.  It
ends below three quarters of the threshold, so that it does not flap
with every connection; entering and leaving are logged, once each.

With an L{SMTPAuth} the factory's sessions offer AUTH once they are
encrypted; the submission kinds need it before MAIL, so without one they
accept no mail at all.

The C{odmr} kind (RFC 2645, port 366) builds L{ODMRServerProtocol}
sessions with the factory's L{ODMRHandler}: STARTTLS, AUTH and ATRN only.

With an L{ETRNHandler} the C{smtp} factory's sessions offer ETRN; the
submission kinds offer it only when the C{[etrn] submission} setting says
so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel

from mailfw.auth._quota import SendingQuotas
from mailfw.etrn import ETRNHandler
from mailfw.interfaces import IMessageQueue, IPolicy, IRouter
from mailfw.policy._chain import ChainLink
from mailfw.reply import SMTPReply
from mailfw.smtp import _replies as R
from mailfw.smtp._auth import SMTPAuth
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._odmr import ODMRHandler, ODMRServerProtocol
from mailfw.smtp._server import SMTPServerProtocol
from mailfw.smtp._settings import SessionSettings

__all__ = ["SMTPFactory"]


class _TurnAway(Protocol):
    """
    Says 421 and hangs up: the client is over a connection limit.
    """

    def __init__(self, hostname: str, reply: SMTPReply) -> None:
        self._line = f"{reply.code} {hostname} {reply.text}\r\n".encode()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._line)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """
        Whatever the client says, it is already being disconnected.
        """


def _clientKey(address: IAddress | None) -> str:
    """
    The text that identifies a client for the per-client limit: its IP
    address, an IPv4-mapped IPv6 address (a dual-stack listener's view of
    an IPv4 client) as the IPv4 address it maps.
    """
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    text = str(host)
    if text[:7].lower() == "::ffff:":
        try:
            mapped = ipaddress.IPv6Address(text).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            return str(mapped)
    return text


class SMTPFactory(Factory):
    """
    Builds an L{SMTPServerProtocol} for each connection of one listener kind.

    @ivar settings: the L{SessionSettings} every connection shares.
    @ivar kind: C{"smtp"}, C{"submission"}, C{"submissions"} or C{"odmr"}.
    @ivar odmr: the L{ODMRHandler} of an C{odmr} listener.
    @ivar connections: how many connections are open now.
    @ivar stressed: whether stress mode is on.
    @ivar sessions: the sessions open now (a stopping server asks each to
        finish, L{SMTPServerProtocol.stopWhenIdle}).
    """

    log = Logger()

    def __init__(
        self,
        kind: str,
        hostname: str,
        queue: IMessageQueue,
        router: IRouter,
        clock: IReactorTime,
        policies: Sequence[IPolicy | ChainLink] = (),
        limits: SMTPLimits = SMTPLimits(),
        tlsOptions: object | None = None,
        auth: SMTPAuth | None = None,
        etrn: ETRNHandler | None = None,
        quotas: SendingQuotas | None = None,
        odmr: ODMRHandler | None = None,
    ) -> None:
        # Implicit TLS has no STARTTLS to offer.
        if kind == "submissions":
            tlsOptions = None
        if etrn is not None and kind != "smtp" and not etrn.settings.submission:
            etrn = None
        self.settings = SessionSettings(
            kind, hostname, queue, router, clock, policies, limits, tlsOptions, auth, etrn, quotas
        )
        if auth is None and kind != "smtp":
            self.log.warn("no [auth] configured: {kind} listeners accept no mail", kind=kind)
        self.odmr = odmr if kind == "odmr" else None
        if kind == "odmr" and odmr is None:
            self.log.warn("no [odmr] domains configured: odmr listeners refuse ATRN")
        self.connections = 0
        self.stressed = False
        self._stressedLimits = limits.underStress()
        self.sessions: set[SMTPServerProtocol] = set()
        self._perClient: dict[str, int] = {}

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def hostname(self) -> str:
        return self.settings.hostname

    @property
    def limits(self) -> SMTPLimits:
        return self.settings.limits

    @property
    def auth(self) -> SMTPAuth | None:
        """
        AUTH settings, or C{None} where AUTH is not offered.
        """
        return self.settings.auth

    @property
    def etrn(self) -> ETRNHandler | None:
        """
        The ETRN handler, or C{None} where ETRN is not offered.
        """
        return self.settings.etrn

    def connectionsFrom(self, address: IAddress) -> int:
        """
        How many connections from C{address}'s host are open now.
        """
        return self._perClient.get(_clientKey(address), 0)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        key = _clientKey(addr)
        if self.connections >= self.limits.maxConnections:
            self.log.warn("too many connections, turning away {peer}", peer=key)
            return _TurnAway(self.hostname, R.TOO_MANY_CONNECTIONS)
        overLimit = self._perClient.get(key, 0) >= self.limits.maxConnectionsPerClient
        if overLimit and not self.limits.exemptFromClientLimit(key):
            self.log.warn("too many connections from {peer}", peer=key)
            return _TurnAway(self.hostname, R.TOO_MANY_CONNECTIONS_FROM_CLIENT)

        stressAt = self.limits.stressAt
        if stressAt and not self.stressed and self.connections + 1 >= stressAt:
            self._stress(True, self.connections + 1)
        limits = self._stressedLimits if self.stressed else None

        protocol: SMTPServerProtocol
        if self.kind == "odmr":
            odmrProtocol = ODMRServerProtocol(self.settings, tracker=self, limits=limits)
            odmrProtocol.odmr = self.odmr
            protocol = odmrProtocol
        else:
            protocol = SMTPServerProtocol(self.settings, tracker=self, limits=limits)
        protocol.factory = self
        protocol.clientKey = key
        return protocol

    # Called by each session, instead of a pair of closures per connection
    # (about 400 octets of each idle connection's memory).

    def sessionOpened(self, protocol: SMTPServerProtocol) -> None:
        """
        Count C{protocol}'s connection, open now.
        """
        self.connections += 1
        self.sessions.add(protocol)
        key = protocol.clientKey
        self._perClient[key] = self._perClient.get(key, 0) + 1

    def sessionClosed(self, protocol: SMTPServerProtocol) -> None:
        """
        Forget C{protocol}'s connection, closed now.
        """
        self.connections -= 1
        self.sessions.discard(protocol)
        key = protocol.clientKey
        left = self._perClient.get(key, 1) - 1
        if left > 0:
            self._perClient[key] = left
        else:
            self._perClient.pop(key, None)
        if self.stressed and self.connections < self.limits.stressAt * 3 // 4:
            self._stress(False, self.connections)

    def _stress(self, on: bool, connections: int) -> None:
        """
        Enter or leave stress mode, with one C{listener.stress} event.
        """
        self.stressed = on
        self.log.emit(
            LogLevel.warn if on else LogLevel.info,
            "{kind} listener: stress mode {state} at {connections} connections",
            event="listener.stress",
            listener=self.kind,
            stressed=on,
            state="on" if on else "off",
            kind=self.kind,
            connections=connections,
        )
