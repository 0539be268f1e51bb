"""
The policy chain: the configured L{IPolicy}s asked in order at each stage
of a session, the first deciding verdict winning.

One chain is built per listener and shared by all its sessions (it holds
no per-connection state).  The session asks it with L{PolicyChain.ask},
naming the L{Stage} and giving the call to make on each policy; the
result never fails: a policy that raises, returns something that is not a
L{Verdict}, or does not answer within the timeout yields a 451 verdict,
logged with the stage and the peer and never shown to the client.

Where later stages plug in (ARCHITECTURE.md, "One policy chain"):

  - C{Stage.AUTH} is named here so that a policy stage for AUTH needs no
    new plumbing: the session asks C{ask(Stage.AUTH, ...)} once an
    C{IPolicy.checkAuth} exists.
  - The end-of-data stage that sees the message as it streams is a second
    kind of question: C{PolicyChain.openMessage(session, envelope)} would
    return one stream object whose C{write(chunk)} the message sink calls
    where it hands text to the queue (each policy's stream hashes or
    forwards the chunk, never buffers the body) and whose C{end()} fires
    with the combined verdict, asked through the same L{_combine} rules.
  - A message edit is one more field of the end-of-data L{Verdict}; the
    chain collects edits in order as it collects C{headers} now, and the
    sink applies them to the queued copy before the 250.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from enum import Enum

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.interfaces import IPolicy
from mailfw.reply import SMTPReply
from mailfw.verdict import Verdict

__all__ = ["POLICY_FAILED", "POLICY_TIMEOUT", "PolicyChain", "Stage"]

# A policy's failure or timeout, as the client sees it: generic, transient.
POLICY_FAILED = SMTPReply(451, "4.3.0", "Local error in processing, try again later")
POLICY_TIMEOUT = SMTPReply(451, "4.4.3", "Temporary lookup failure, try again later")

# What an empty chain says at every stage.
_NO_VERDICT = Verdict()


class Stage(Enum):
    """
    The stages of a session at which the chain is asked; the value names
    the stage in log events.
    """

    CONNECT = "connect"
    HELO = "helo"
    AUTH = "auth"
    MAIL = "sender"
    RCPT = "recipient"
    HEADERS = "message"
    END_OF_DATA = "end-of-data"


PolicyCall = Callable[[IPolicy], "Verdict | Deferred[Verdict]"]


class PolicyChain:
    """
    The policies of one listener, in configuration order.

    @ivar policies: the policies.
    @ivar timeout: seconds each policy call may take.
    """

    log = Logger()

    def __init__(self, policies: Sequence[IPolicy], timeout: float, clock: IReactorTime) -> None:
        self.policies = tuple(policies)
        self.timeout = timeout
        self._clock = clock

    def __bool__(self) -> bool:
        return bool(self.policies)

    def ask(self, stage: Stage, call: PolicyCall, peer: str) -> Deferred[Verdict]:
        """
        Ask the policies in order until one decides; headers of verdicts
        that let the chain continue are collected into the result.

        @param call: makes the stage's call on one policy.
        @param peer: the client, for log events.
        @return: the deciding verdict (or a continuing one carrying the
            collected headers); never fails.
        """
        policies = self.policies
        if not policies:
            return succeed(_NO_VERDICT)
        headers: list[tuple[str, str]] = []
        timeout, clock = self.timeout, self._clock

        def step(index: int) -> Deferred[Verdict]:
            while index < len(policies):
                try:
                    result = call(policies[index])
                    if isinstance(result, Deferred):
                        if not result.called:
                            result.addTimeout(timeout, clock)
                        return result.addCallback(after, index)
                    decided = _combine(result, headers)
                except Exception:
                    return fail()
                if decided is not None:
                    return succeed(self._decided(decided, policies[index], stage, peer))
                index += 1
            return succeed(Verdict(headers=tuple(headers)))

        def after(verdict: Verdict, index: int) -> Verdict | Deferred[Verdict]:
            decided = _combine(verdict, headers)
            if decided is not None:
                return self._decided(decided, policies[index], stage, peer)
            return step(index + 1)

        return step(0).addErrback(self._failed, stage, peer)

    def _decided(self, verdict: Verdict, policy: IPolicy, stage: Stage, peer: str) -> Verdict:
        """
        Emit the C{policy.verdict} event for a deciding verdict: without a
        format, so text logs skip it, while the metrics count verdicts by
        policy and the status page names the refusing policy.
        """
        reply = verdict.reply
        self.log.info(
            event="policy.verdict",
            peer=peer,
            stage=stage.value,
            policy=str(getattr(policy, "name", type(policy).__name__)),
            verdict=_verdictName(verdict),
            code=0 if reply is None else reply.code,
            enhanced="" if reply is None else reply.enhanced,
        )
        return verdict

    def _failed(self, f: Failure, stage: Stage, peer: str) -> Verdict:
        return Verdict(self.failureReply(f, stage.value, peer))

    def failureReply(self, f: Failure, stage: str, peer: str) -> SMTPReply:
        """
        The 451 for a plugin (a policy, the router) that failed or timed
        out; logged, never shown.  A call cancelled because the client left
        is not logged.
        """
        if f.check(CancelledError):
            return POLICY_FAILED
        if f.check(TimeoutError):
            self.log.warn("{stage} check timed out for {peer}", stage=stage, peer=peer)
            return POLICY_TIMEOUT
        self.log.failure("{stage} check failed for {peer}", f, stage=stage, peer=peer)
        return POLICY_FAILED


def _combine(verdict: object, headers: list[tuple[str, str]]) -> Verdict | None:
    """
    Collect C{verdict}'s headers; return it (with every header so far) if
    it decides, C{None} to ask the next policy.
    """
    if not isinstance(verdict, Verdict):
        raise TypeError(f"policy returned {verdict!r}, not a Verdict")
    headers.extend(verdict.headers)
    if verdict.reply is not None or verdict.disconnect:
        return replace(verdict, headers=tuple(headers))
    return None


def _verdictName(verdict: Verdict) -> str:
    """
    The C{verdict} field of a C{policy.verdict} event: C{accept},
    C{reject}, C{defer} or C{disconnect}.
    """
    reply = verdict.reply
    if reply is None:
        return "disconnect"
    if reply.isPositive:
        return "accept"
    return "reject" if reply.isPermanent else "defer"
