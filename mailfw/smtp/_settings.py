"""
What every session of one listener shares: built once by the factory and
handed, as one immutable object, to each connection (which copies none of
it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from mailfw.auth._quota import SendingQuotas
from mailfw.config import LISTENER_KINDS
from mailfw.etrn import ETRNHandler
from mailfw.interfaces import IMessageQueue, IPolicy, IRouter
from mailfw.policy._chain import ChainLink, PolicyChain
from mailfw.smtp._auth import SMTPAuth
from mailfw.smtp._limits import SMTPLimits

__all__ = ["LISTENER_KINDS", "SUBMISSION_KINDS", "SessionSettings"]

SUBMISSION_KINDS = ("submission", "submissions")


@dataclass(frozen=True, eq=False)
class SessionSettings:
    """
    One listener's configuration, as its sessions see it.

    @ivar kind: C{"smtp"}, C{"submission"} or C{"submissions"}.
    @ivar hostname: the name in the greeting, EHLO and trace headers.
    @ivar queue: where accepted messages go.
    @ivar router: asked at RCPT time.
    @ivar clock: timers (idle timeout, error delay, policy timeouts).
    @ivar policies: asked at each stage, through C{chain} (a bare policy
        is a L{ChainLink} with the defaults).
    @ivar limits: the L{SMTPLimits} in force.
    @ivar tlsOptions: the context factory for STARTTLS, or C{None}.
    @ivar auth: the L{SMTPAuth} settings when AUTH is offered.
    @ivar etrn: the L{ETRNHandler} when ETRN is offered.
    @ivar quotas: the L{SendingQuotas} that authenticated sessions are held
        to, if any (C{[auth.quotas]}).
    @ivar chain: the L{PolicyChain} over C{policies}.
    @ivar submission: whether C{kind} is a submission kind (AUTH before
        MAIL, C{Date:} and C{Message-ID:} fixups).
    """

    kind: str
    hostname: str
    queue: IMessageQueue
    router: IRouter
    clock: IReactorTime
    policies: Sequence[IPolicy | ChainLink] = ()
    limits: SMTPLimits = SMTPLimits()
    tlsOptions: object | None = None
    auth: SMTPAuth | None = None
    etrn: ETRNHandler | None = None
    quotas: SendingQuotas | None = None
    chain: PolicyChain = field(init=False, repr=False)
    submission: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in LISTENER_KINDS:
            raise ValueError(f"unknown listener kind {self.kind!r}; use one of {', '.join(LISTENER_KINDS)}")
        policies = tuple(self.policies)
        object.__setattr__(self, "policies", policies)
        object.__setattr__(self, "chain", PolicyChain(policies, self.limits.policyTimeout, self.clock))
        object.__setattr__(self, "submission", self.kind in SUBMISSION_KINDS)
