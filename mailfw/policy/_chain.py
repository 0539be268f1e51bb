"""
The policy chain: the configured L{IPolicy}s asked in order at each stage
of a session, the first deciding verdict winning.

One chain is built per listener and shared by all its sessions (it holds
no per-connection state).  The session asks it with L{PolicyChain.ask},
naming the L{Stage} and giving the call to make on each policy; the
result never fails.  A policy that raises, returns something that is not
a L{Verdict}, or does not answer within its timeout is handled by its
link's C{on_error}: C{"defer"} answers 451 (logged with the stage, the
policy and the peer, never shown to the client), C{"accept"} logs and
asks the next policy.

The end-of-data stage is a second kind of question: L{PolicyChain.openMessage}
asks each policy's C{openMessage} once the header section is accepted and
returns one L{MessageChecks} that the message sink feeds the body as it
streams into the queue, and whose C{end} asks the checks in order for the
verdict before the 250.

Verdicts that let the chain continue pass on their C{headers},
C{results} and C{edits}: the deciding (or final) verdict carries all of
them, in chain order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.config import LISTENER_KINDS, ConfigError, Section
from mailfw.envelope import Envelope, Session
from mailfw.interfaces import IMessageCheck, IPolicy
from mailfw.reply import SMTPReply
from mailfw.verdict import AuthResult, MessageEdit, Verdict

__all__ = [
    "LINK_OPTIONS",
    "POLICY_FAILED",
    "POLICY_TIMEOUT",
    "ChainLink",
    "MessageChecks",
    "PolicyChain",
    "Stage",
    "linkFromSection",
]

# A policy's failure or timeout, as the client sees it: generic, transient.
POLICY_FAILED = SMTPReply(451, "4.3.0", "Local error in processing, try again later")
POLICY_TIMEOUT = SMTPReply(451, "4.4.3", "Temporary lookup failure, try again later")

# What an empty chain says at every stage.
_NO_VERDICT = Verdict()

ON_ERROR = ("defer", "accept")


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


@dataclass(frozen=True)
class ChainLink:
    """
    One policy in a chain and how the chain treats it.

    @ivar listeners: the listener kinds whose chains include it; C{None}
        for all (a policy handed to a factory directly).
    @ivar timeout: seconds each call may take; C{None} for the listener's
        C{[smtp] policy_timeout}.
    @ivar onError: C{"defer"} (451) or C{"accept"} (go on without it) when
        the policy fails or times out.
    """

    policy: IPolicy
    listeners: frozenset[str] | None = None
    timeout: float | None = None
    onError: str = "defer"

    @property
    def name(self) -> str:
        return str(getattr(self.policy, "name", "policy"))


def linkFromSection(
    title: str, options: Mapping[str, object], build: Callable[[Mapping[str, object]], IPolicy]
) -> ChainLink:
    """
    Read the options every C{[policy.NAME]} section has (C{listeners},
    C{timeout}, C{on_error}) and build the policy with C{build} from the
    others.

    @raise ConfigError: naming the bad option.
    """
    section = Section(title, {key: value for key, value in options.items() if key in LINK_OPTIONS})
    listeners = section.strings("listeners", ["smtp"])
    unknown = sorted(set(listeners) - set(LISTENER_KINDS))
    if unknown:
        raise ConfigError(
            f"{title} listeners: unknown listener {unknown[0]!r}; use {', '.join(LISTENER_KINDS)}"
        )
    timeout = section.number("timeout", None, minimum=0.001)
    onError = section.choice("on_error", ON_ERROR, "defer")
    policy = build({key: value for key, value in options.items() if key not in LINK_OPTIONS})
    return ChainLink(policy, frozenset(listeners), timeout, onError)


LINK_OPTIONS = frozenset({"listeners", "timeout", "on_error"})


class PolicyChain:
    """
    The policies of one listener, in configuration order.

    @ivar links: the policies and their error handling.
    @ivar timeout: seconds each policy call may take, unless its link says.
    """

    log = Logger()

    def __init__(self, links: Sequence[ChainLink | IPolicy], timeout: float, clock: IReactorTime) -> None:
        self.links = tuple(link if isinstance(link, ChainLink) else ChainLink(link) for link in links)
        self.timeout = timeout
        self._clock = clock
        self.checksMessages = bool(self.links)

    @property
    def policies(self) -> tuple[IPolicy, ...]:
        return tuple(link.policy for link in self.links)

    def __bool__(self) -> bool:
        return bool(self.links)

    def ask(self, stage: Stage, call: PolicyCall, peer: str) -> Deferred[Verdict]:
        """
        Ask the policies in order until one decides; what continuing
        verdicts carry (headers, results, edits) is collected into the
        result.

        @param call: makes the stage's call on one policy.
        @param peer: the client, for log events.
        @return: the deciding verdict (or a continuing one carrying what
            was collected); never fails.
        """
        if not self.links:
            return succeed(_NO_VERDICT)
        calls = [(link, _bind(call, link.policy)) for link in self.links]
        return self._run(calls, _Collected(), stage, peer)

    def _run(
        self,
        calls: Sequence[tuple[ChainLink, Callable[[], object]]],
        collected: _Collected,
        stage: Stage,
        peer: str,
        decidedAt: Callable[[int], None] | None = None,
    ) -> Deferred[Verdict]:
        """
        Make C{calls} in order until a verdict decides (then C{decidedAt}
        is told the index); collect what the others carry.  Never fails.
        """

        def step(index: int) -> Deferred[Verdict]:
            while index < len(calls):
                link, call = calls[index]
                try:
                    result = call()
                except Exception:
                    result = Failure()
                if isinstance(result, Deferred):
                    if not result.called:
                        result.addTimeout(self._timeoutOf(link), self._clock)
                    judged = result.addBoth(self._judge, collected, link, stage, peer)
                    return judged.addCallback(resume, index)
                decided = self._judge(result, collected, link, stage, peer)
                if decided is not None:
                    return succeed(finish(decided, index))
                index += 1
            return succeed(collected.verdict())

        def resume(decided: Verdict | None, index: int) -> Verdict | Deferred[Verdict]:
            if decided is not None:
                return finish(decided, index)
            return step(index + 1)

        def finish(decided: Verdict, index: int) -> Verdict:
            if decidedAt is not None:
                decidedAt(index)
            return decided

        return step(0)

    def _judge(
        self, result: object, collected: _Collected, link: ChainLink, stage: Stage, peer: str
    ) -> Verdict | None:
        """
        Collect what C{result} carries; return the deciding verdict (with
        everything collected) or C{None} to ask the next policy.  A
        failure, or anything but a verdict, goes to the link's C{on_error}.
        """
        if not isinstance(result, Verdict):
            if not isinstance(result, Failure):
                try:
                    raise TypeError(f"policy {link.name} returned {result!r}, not a Verdict")
                except TypeError:
                    result = Failure()
            assert isinstance(result, Failure)
            replacement = self._failedLink(result, link, stage.value, peer)
            # Logged already: the failure is the story, not the 451.
            return None if replacement is None else collected.add(replacement)
        decided = collected.add(result)
        if decided is not None:
            # One event per deciding verdict (the metrics count them by
            # policy); a refusal also gets a line in text logs.
            reply = decided.reply
            refused = reply is not None and not reply.isPositive
            self.log.info(
                "policy {policy} refused {stage} from {peer}: {code} {enhanced} {text}" if refused else None,
                event="policy.verdict",
                policy=link.name,
                stage=stage.value,
                peer=peer,
                verdict=_verdictName(decided),
                code=0 if reply is None else reply.code,
                enhanced="" if reply is None else reply.enhanced,
                text="" if reply is None else reply.text,
            )
        return decided

    def _timeoutOf(self, link: ChainLink) -> float:
        return self.timeout if link.timeout is None else link.timeout

    def _failedLink(self, f: Failure, link: ChainLink, stage: str, peer: str) -> Verdict | None:
        """
        A policy failed: the 451 verdict, or C{None} to go on without it
        (C{on_error = "accept"}).  Logged either way.
        """
        reply = self.failureReply(f, stage, peer, link.name)
        if link.onError == "accept" and not f.check(CancelledError):
            return None
        return Verdict(reply)

    def failureReply(self, f: Failure, stage: str, peer: str, policy: str = "") -> SMTPReply:
        """
        The 451 for a plugin (a policy, the router) that failed or timed
        out; logged, never shown.  A call cancelled because the client left
        is not logged.
        """
        if f.check(CancelledError):
            return POLICY_FAILED
        if f.check(TimeoutError):
            self.log.warn(
                "{stage} check {policy} timed out for {peer}", stage=stage, policy=policy, peer=peer
            )
            return POLICY_TIMEOUT
        self.log.failure("{stage} check {policy} failed for {peer}", f, stage=stage, policy=policy, peer=peer)
        return POLICY_FAILED

    # --- the end-of-data stage ----------------------------------------------------

    def openMessage(
        self, session: Session, envelope: Envelope, header: bytes, peer: str
    ) -> MessageChecks | None:
        """
        Ask each policy's C{openMessage}; C{None} when none wants to see the
        message (nothing is fed then).
        """
        opened: list[tuple[ChainLink, IMessageCheck | Failure]] = []
        for link in self.links:
            try:
                check = link.policy.openMessage(session, envelope, header)
            except Exception:
                opened.append((link, Failure()))
                continue
            if check is not None:
                opened.append((link, check))
        if not opened:
            return None
        return MessageChecks(self, opened, peer)

    def sessionEnded(self, session: Session) -> None:
        """
        Tell every policy that the connection of C{session} is closed.
        """
        for link in self.links:
            try:
                link.policy.sessionEnded(session)
            except Exception:
                self.log.failure("policy {policy} failed to end a session", policy=link.name)


class MessageChecks:
    """
    The end-of-data checks of one message: fed the body as it streams, asked
    in chain order at its end.
    """

    def __init__(
        self, chain: PolicyChain, opened: Sequence[tuple[ChainLink, IMessageCheck | Failure]], peer: str
    ) -> None:
        self._chain = chain
        self._checks = list(opened)
        self._peer = peer
        self._ended = False

    def write(self, data: bytes) -> Deferred[Any] | None:
        """
        Feed C{data} to every check; a L{Deferred} when one asks the session
        to wait.  A check that raises fails (its link's C{on_error} decides
        at the end) and is fed no more.
        """
        waits: list[Deferred[Any]] = []
        checks = self._checks
        for index, (link, check) in enumerate(checks):
            if isinstance(check, Failure):
                continue
            try:
                wait = check.write(data)
            except Exception:
                checks[index] = (link, Failure())
                continue
            if wait is not None:
                waits.append(wait)
        if not waits:
            return None
        if len(waits) == 1:
            return waits[0]
        return gatherResults(waits, consumeErrors=True)

    def end(self, results: tuple[AuthResult, ...]) -> Deferred[Verdict]:
        """
        Ask the checks in order; each sees C{results} plus those of the
        checks before it.  The checks after a deciding one are aborted.
        Never fails; the verdict's C{results} are only the new ones.
        """
        self._ended = True
        collected = _Collected(results=list(results))

        def ending(check: IMessageCheck | Failure) -> Callable[[], object]:
            if isinstance(check, Failure):
                return lambda: check
            return lambda: check.end(tuple(collected.results))

        calls = [(link, ending(check)) for link, check in self._checks]
        return self._chain._run(calls, collected, Stage.END_OF_DATA, self._peer, self._abortAfter)

    def _abortAfter(self, index: int) -> None:
        self._abortFrom(index + 1)

    def _abortFrom(self, index: int) -> None:
        for link, check in self._checks[index:]:
            if not isinstance(check, Failure):
                _abort(link, check)

    def abort(self) -> None:
        """
        The message will not be queued: release every check (not after
        L{end}).
        """
        if self._ended:
            return
        self._ended = True
        for link, check in self._checks:
            if not isinstance(check, Failure):
                _abort(link, check)


def _bind(call: PolicyCall, policy: IPolicy) -> Callable[[], object]:
    return lambda: call(policy)


def _abort(link: ChainLink, check: IMessageCheck) -> None:
    try:
        check.abort()
    except Exception:
        PolicyChain.log.failure("policy {policy} failed to abort a message check", policy=link.name)


class _Collected:
    """
    What the verdicts of one question carried so far.
    """

    def __init__(self, results: list[AuthResult] | None = None) -> None:
        self.headers: list[tuple[str, str]] = []
        self.results: list[AuthResult] = results if results is not None else []
        self.edits: list[MessageEdit] = []
        self._first = len(self.results)

    def add(self, verdict: Verdict) -> Verdict | None:
        """
        Collect C{verdict}'s additions; return it (with everything so far)
        if it decides, C{None} to ask the next policy.
        """
        self.headers.extend(verdict.headers)
        self.results.extend(verdict.results)
        self.edits.extend(verdict.edits)
        if verdict.reply is not None or verdict.disconnect:
            return Verdict(verdict.reply, verdict.disconnect, *self._additions())
        return None

    def verdict(self) -> Verdict:
        if not (self.headers or self.edits or len(self.results) > self._first):
            return _NO_VERDICT
        return Verdict(None, False, *self._additions())

    def _additions(
        self,
    ) -> tuple[tuple[tuple[str, str], ...], tuple[AuthResult, ...], tuple[MessageEdit, ...]]:
        # Results given to end() are the caller's already: only new ones.
        return tuple(self.headers), tuple(self.results[self._first :]), tuple(self.edits)


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
