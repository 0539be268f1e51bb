"""
Limits on everything an SMTP client controls, and the stress mode that
tightens some of them while a listener is nearly full.

Stress mode follows Postfix's (C{STRESS_README}): when most connection
slots are taken, the clients that hold them are more likely abusers
than senders, so new sessions get a short idle timeout and are closed at
their first error, which frees slots for the mail that matters.  The
listener factory decides it once per connection (L{SMTPLimits.stressAt});
a session keeps the limits it started with, as a Postfix smtpd process
keeps the settings it was spawned with.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields, replace

from mailfw.config import ConfigError, Section

__all__ = ["SMTPLimits"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Postfix exempts $mynetworks (smtpd_client_connection_limit_exceptions);
# mailfw exempts the loopback addresses: a local relay, a content filter
# or a benchmark opens many sessions from there.
DEFAULT_CONNECTION_LIMIT_EXCEPTIONS: tuple[_Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


@dataclass(frozen=True)
class SMTPLimits:
    """
    The server's limits, with defaults suitable for a public MX.

    @ivar maxLineLength: the longest command line, in octets including CRLF
        (RFC 5321 4.5.3.1.4: 512).
    @ivar parameterAllowance: extra octets allowed on MAIL and RCPT lines for
        ESMTP parameters and UTF-8 addresses.  RFC 1869 lets every extension
        lengthen these lines: SIZE adds 26 (RFC 1870), DSN 100 on MAIL and
        500 on RCPT (RFC 3461), AUTH= 500 (RFC 4954), and a 256-octet path
        may grow up to four times in UTF-8 (RFC 6531).  1536 covers all of
        them at once, so MAIL and RCPT lines may be 2048 octets long.
    @ivar maxTextLine: the longest line of message text, in octets
        including CRLF (RFC 5321 4.5.3.1.6: 1000).  A message holding a
        longer line is read to its end and then refused with 500 5.5.2,
        because relaying it would break the next hop's limit.  0 disables
        the check (what Postfix does).
    @ivar maxMessageSize: the largest message, in octets, advertised with
        SIZE (RFC 1870) and enforced both on the declared size (at MAIL) and
        the actual one (at the end of data).
    @ivar maxRecipients: recipients per transaction (RFC 5321 4.5.3.1.8
        asks for at least 100); further ones get 452 4.5.3.  Advertised as
        C{RCPTMAX} (RFC 9422).
    @ivar maxTransactions: mail transactions (accepted C{MAIL} commands)
        per session, advertised as C{MAILMAX} (RFC 9422); a further MAIL
        gets 452 4.5.3, and the client should start a new session.  Exim's
        C{smtp_accept_max_per_connection} is 1000 too.
    @ivar idleTimeout: seconds of client silence before 421 4.4.2 and close
        (RFC 5321 4.5.3.2.7 suggests 5 minutes).
    @ivar maxSessionTime: seconds a whole session may last before 421
        4.4.2 and close, however busy the client (0: no limit).  The idle
        timeout alone lets a client that sends a byte every few seconds
        hold a connection slot for ever; chasquid ends every connection
        after 20 minutes, Postfix under stress makes its timeout a deadline
        per command.  An hour fits a large message on a slow line, and the
        MAILMAX transactions of a busy relay.
    @ivar softErrorLimit: after this many error replies (5xx), each further
        error reply is delayed by C{errorDelay}.
    @ivar hardErrorLimit: at this many error replies the server says 421
        4.7.0 instead and hangs up.
    @ivar errorDelay: seconds, see C{softErrorLimit}.
    @ivar maxConnectionsPerClient: simultaneous connections from one IP
        address; more get 421 4.7.0.
    @ivar connectionLimitExceptions: clients in these networks are not held
        to C{maxConnectionsPerClient} (they still count towards
        C{maxConnections}); by default the loopback networks.  Configured
        as C{connection_limit_exceptions}, a list of CIDRs.
    @ivar maxConnections: simultaneous connections in total per listener
        factory; more get 421 4.7.0.
    @ivar maxReceivedHeaders: a message that would have more C{Received:}
        headers, counting the one mailfw adds, is refused with 554 5.4.6 (a
        mail loop; Postfix's C{hopcount_limit}).
    @ivar policyTimeout: seconds a policy or router call may take before the
        command gets 451 4.4.3.
    @ivar maxPendingChecks: how many pipelined RCPT checks may run at once.
    @ivar maxHeaderBytes: how much of a message's header section is held in
        memory for the policies and the loop check; a longer header section
        is passed on, and checked, only up to this size.
    @ivar stressThreshold: connections of one listener at which stress mode
        begins; C{None} (the default) for four fifths of C{maxConnections}
        (Postfix's stress begins when every slot is taken; a little earlier
        leaves room for the mail stress mode is for), 0 for never.
    @ivar stressIdleTimeout: C{idleTimeout} of a session that begins under
        stress (Postfix: 10 s instead of 300); 0 keeps C{idleTimeout}.
    @ivar stressHardErrorLimit: C{hardErrorLimit} of a session that begins
        under stress (Postfix: 1): its first error reply is 421 4.7.0 and
        the close, so a client probing for addresses gets one try per
        connection slot; 0 keeps C{hardErrorLimit}.
    """

    maxLineLength: int = 512
    parameterAllowance: int = 1536
    maxTextLine: int = 1000
    maxMessageSize: int = 35 * 1024 * 1024
    maxRecipients: int = 1000
    maxTransactions: int = 1000
    idleTimeout: float = 300.0
    maxSessionTime: float = 3600.0
    softErrorLimit: int = 10
    hardErrorLimit: int = 20
    errorDelay: float = 1.0
    maxConnectionsPerClient: int = 20
    maxConnections: int = 1000
    maxReceivedHeaders: int = 50
    policyTimeout: float = 60.0
    maxPendingChecks: int = 100
    maxHeaderBytes: int = 256 * 1024
    stressThreshold: int | None = None
    stressIdleTimeout: float = 10.0
    stressHardErrorLimit: int = 1
    connectionLimitExceptions: tuple[_Network, ...] = DEFAULT_CONNECTION_LIMIT_EXCEPTIONS

    def __post_init__(self) -> None:
        if self.maxLineLength < 512:
            raise ValueError("maxLineLength must be at least 512 (RFC 5321 4.5.3.1.4)")
        if self.maxTextLine and self.maxTextLine < 1000:
            raise ValueError("maxTextLine must be 0 or at least 1000 (RFC 5321 4.5.3.1.6)")
        if not (1 <= self.maxRecipients <= 999999 and 1 <= self.maxTransactions <= 999999):
            # Advertised as RCPTMAX and MAILMAX: 1 to 6 digits (RFC 9422).
            raise ValueError("maxRecipients and maxTransactions must be from 1 to 999999 (RFC 9422)")
        if self.hardErrorLimit < 1 or self.softErrorLimit < 0:
            raise ValueError("error limits must be positive")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value < 0:
                raise ValueError(f"{f.name} must not be negative")

    @property
    def stressAt(self) -> int:
        """
        C{stressThreshold} resolved: connections at which stress mode
        begins, 0 for never.
        """
        if self.stressThreshold is None:
            return self.maxConnections * 4 // 5
        return self.stressThreshold

    def underStress(self) -> SMTPLimits:
        """
        These limits as a session that begins under stress has them: the
        stress values where they are tighter, every other limit unchanged.
        """
        return replace(
            self,
            idleTimeout=_tighter(self.idleTimeout, self.stressIdleTimeout),
            hardErrorLimit=int(_tighter(self.hardErrorLimit, self.stressHardErrorLimit)),
        )

    @property
    def maxCommandLine(self) -> int:
        """
        The longest line read in command mode, in octets including CRLF:
        MAIL and RCPT lines with their parameter allowance.
        """
        return self.maxLineLength + self.parameterAllowance

    def exemptFromClientLimit(self, host: str) -> bool:
        """
        Whether the client at C{host} is exempt from
        C{maxConnectionsPerClient}.  An IPv4-mapped IPv6 address (a dual-stack
        listener's view of an IPv4 client) counts as its IPv4 address.

        @param host: the peer's address as text; anything that is not an IP
            address (a UNIX socket peer) is not exempt.
        """
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.connectionLimitExceptions)

    @classmethod
    def fromSection(cls, section: Section) -> SMTPLimits:
        """
        Read the C{[smtp]} section: each field under its snake_case name
        (C{max_message_size}, C{idle_timeout}, ...), all optional;
        C{connection_limit_exceptions} is a list of CIDRs (C{[]} holds every
        client to the per-client limit).

        @raise ConfigError: for an unknown key, a wrong type or a value the
            RFCs do not allow.
        """
        values: dict[str, object] = {}
        for f in fields(cls):
            key = _snake(f.name)
            if f.name == "connectionLimitExceptions":
                values[f.name] = _networks(section, key)
            elif f.type in ("float", float):
                values[f.name] = section.number(key, f.default, minimum=0)
            else:
                values[f.name] = section.integer(key, f.default, minimum=0)
        section.finish()
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as e:
            raise ConfigError(f"{section.title}: {e}") from None


def _tighter(normal: float, stressed: float) -> float:
    """
    The stress value if it is set (not 0) and tighter than the normal one.
    """
    return min(normal, stressed) if stressed else normal


def _networks(section: Section, key: str) -> tuple[_Network, ...]:
    """
    Read a list of CIDRs (or single addresses), naming the bad entry.
    """
    texts = section.strings(key, [str(network) for network in DEFAULT_CONNECTION_LIMIT_EXCEPTIONS])
    networks: list[_Network] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{section.title} {key}: bad network {text!r}") from None
    return tuple(networks)
