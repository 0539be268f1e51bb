"""
Delivery to a program (plugin C{pipe}).

The configured command runs without a shell, through
C{reactor.spawnProcess}, with the message on its standard input (streamed
from the body in small pieces, with flow control).  Its arguments come
from a template: each argument may use C{{sender}}, C{{recipient}},
C{{localpart}}, C{{domain}}, C{{user}} (the local part lowercased, without
C{+detail}) and C{{detail}}.  Values from addresses can start with C{-}:
put C{--} before them if the program takes options.

How the exit is mapped (the convention of C{sysexits.h}, as in Postfix's
C{pipe} and C{local}):

  - exit 0: C{250 2.0.0} delivered;
  - exit 75 (C{EX_TEMPFAIL}): C{451 4.3.0}, try again later;
  - any other exit, or death by a signal: C{554 5.3.0} with the first line
    of the program's standard error, reduced to at most 100 printable
    ASCII characters (that text reaches the sender in the bounce, so write
    messages meant for senders there);
  - still running after C{timeout} seconds: killed with C{SIGKILL} and
    deferred with C{451 4.3.0} ("Delivery command timed out").  RFC 3463's
    4.4.7 would say the message is too old in the queue, which is not what
    happened: a local resource (the program) failed for now.

With C{per_recipient = true} (the default) the command runs once per
recipient, one after the other.  With C{per_recipient = false} it runs once
for the whole group; an argument that is exactly C{{recipient}} then
expands to one argument per recipient, the other per-recipient fields are
refused, and the outcome applies to every recipient.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from string import Formatter
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.address import Address
from mailfw.config import ConfigError, Section
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.queue._produce import ProducerStopped
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["PipeDeliveryAgent", "checkCommand", "fromConfig", "replyForExit"]

EX_TEMPFAIL = 75
DELIVERED = SMTPReply(250, "2.0.0", "Delivered")
TEMPFAIL = SMTPReply(451, "4.3.0", "Delivery command asked to try again later")
TIMED_OUT = SMTPReply(451, "4.3.0", "Delivery command timed out")
LOCAL_ERROR = SMTPReply(451, "4.3.0", "Local delivery error, try again later")
STDERR_KEEP = 4096
SUMMARY_LENGTH = 100
RECIPIENT_FIELDS = frozenset({"recipient", "localpart", "domain", "user", "detail"})
FIELDS = RECIPIENT_FIELDS | {"sender"}
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def summarise(stderr: bytes) -> str:
    """
    The first non-empty line of C{stderr} as at most L{SUMMARY_LENGTH}
    printable ASCII characters (others become C{?}).
    """
    for raw in stderr.splitlines():
        text = "".join(c if " " <= c <= "~" else "?" for c in raw.decode("utf-8", "replace").strip())
        if text:
            return text if len(text) <= SUMMARY_LENGTH else text[: SUMMARY_LENGTH - 3] + "..."
    return ""


def replyForExit(exitCode: int | None, signal: int | None, timedOut: bool, stderr: bytes) -> SMTPReply:
    """
    Map how the command ended to a reply (see the module docstring).
    """
    if timedOut:
        return TIMED_OUT
    if exitCode == 0:
        return DELIVERED
    if exitCode == EX_TEMPFAIL:
        return TEMPFAIL
    how = f"exit status {exitCode}" if exitCode is not None else f"signal {signal}"
    summary = summarise(stderr)
    return SMTPReply(554, "5.3.0", f"Delivery command failed ({how})" + (f": {summary}" if summary else ""))


class _CommandProtocol(ProcessProtocol):
    """
    Feeds the message to one process, keeps the start of its standard
    error and reports how it ended.
    """

    def __init__(self, body: IMessageBody, clock: Any, timeout: float) -> None:
        self._body = body
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._stderr = bytearray()
        self.timedOut = False
        self.readFailed = False
        self.ended: Deferred[SMTPReply] = Deferred()

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._kill)
        # The body's producer reads off the reactor thread and writes to
        # the child's standard input as the pipe drains.
        sending = self._body.produce(self.transport)  # type: ignore[arg-type]
        sending.addBoth(self._bodySent)

    def _bodySent(self, result: object) -> None:
        if isinstance(result, Failure) and not result.check(ProducerStopped):
            # The message could not be read: the command saw only part of
            # it, so whatever it did must not count as delivered.
            self.readFailed = True
            self._signal("KILL")
            return
        # ProducerStopped: the command exited or closed its input without
        # reading everything; that is its business, and its exit status
        # says how it went.
        if self.transport is not None:
            self.transport.closeStdin()

    def _signal(self, name: str) -> None:
        with contextlib.suppress(ProcessExitedAlready):
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    def _kill(self) -> None:
        self._timer = None
        self.timedOut = True
        self._signal("KILL")

    def outReceived(self, data: bytes) -> None:
        pass

    def errReceived(self, data: bytes) -> None:
        room = STDERR_KEEP - len(self._stderr)
        if room > 0:
            self._stderr += data[:room]

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        exitCode: int | None = None
        signal: int | None = None
        if isinstance(reason.value, ProcessDone):
            exitCode = 0
        elif isinstance(reason.value, ProcessTerminated):
            exitCode, signal = reason.value.exitCode, reason.value.signal
        if self.readFailed:
            self.ended.callback(LOCAL_ERROR)
            return
        self.ended.callback(replyForExit(exitCode, signal, self.timedOut, bytes(self._stderr)))


def _fields(sender: str, address: Address, separator: str) -> dict[str, str]:
    localpart = address.unquotedLocalpart
    if separator:
        user, _, detail = localpart.partition(separator)
    else:
        user, detail = localpart, ""
    return {
        "sender": sender,
        "recipient": str(address),
        "localpart": localpart,
        "domain": address.domain,
        "user": user.lower(),
        "detail": detail,
    }


def checkCommand(command: Sequence[str], perRecipient: bool) -> None:
    """
    Refuse a command template that uses unknown fields, format
    specifications, or per-recipient fields when running once per group.

    @raise ValueError: naming the problem.
    """
    if not command:
        raise ValueError("the command is empty")
    if not os.path.isabs(command[0]):
        raise ValueError("the program must be an absolute path")
    for argument in command:
        try:
            parsed = list(Formatter().parse(argument))
        except ValueError as e:
            raise ValueError(f"bad argument {argument!r}: {e}") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in FIELDS or spec or conversion:
                raise ValueError(f"unknown field {{{field}}} in {argument!r}")
            if not perRecipient and field in RECIPIENT_FIELDS and argument != "{recipient}":
                raise ValueError(
                    f"{{{field}}} in {argument!r} needs per_recipient = true "
                    "(only a whole argument {recipient} expands to every recipient)"
                )


@implementer(IDeliveryAgent)
class PipeDeliveryAgent:
    """
    Runs a command with the message on its standard input.

    @ivar reactor: provides C{IReactorProcess} and C{IReactorTime}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        name: str,
        command: Sequence[str],
        timeout: float = 300.0,
        perRecipient: bool = True,
        env: Mapping[str, str] | None = None,
        separator: str = "+",
    ) -> None:
        checkCommand(command, perRecipient)
        self.reactor = reactor
        self.name = name
        self.command = list(command)
        self.timeout = timeout
        self.perRecipient = perRecipient
        self.env = {"PATH": DEFAULT_PATH, **(env or {})}
        self.separator = separator

    def argumentsFor(self, sender: str, recipients: Sequence[Address]) -> list[str]:
        """
        The argument vector for a run delivering to C{recipients}.
        """
        if self.perRecipient:
            [address] = recipients
            fields = _fields(sender, address, self.separator)
            return [argument.format_map(fields) for argument in self.command]
        arguments: list[str] = []
        for argument in self.command:
            if argument == "{recipient}":
                arguments.extend(str(a) for a in recipients)
            else:
                arguments.append(argument.format_map({"sender": sender}))
        return arguments

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        recipients = list(envelope.recipients)
        if not recipients:
            return succeed([])
        if not self.perRecipient:
            run = self._run(envelope, recipients, body)
            return run.addCallback(lambda reply: [RecipientOutcome(r, reply) for r in recipients])
        outcomes: list[RecipientOutcome] = []
        result: Deferred[Sequence[RecipientOutcome]] = Deferred()

        def next(_: object = None) -> None:
            if len(outcomes) == len(recipients):
                result.callback(outcomes)
                return
            recipient = recipients[len(outcomes)]

            def record(reply: SMTPReply) -> None:
                outcomes.append(RecipientOutcome(recipient, reply))
                next()

            self._run(envelope, [recipient], body).addCallback(record)

        next()
        return result

    def _run(
        self, envelope: Envelope, recipients: Sequence[Recipient], body: IMessageBody
    ) -> Deferred[SMTPReply]:
        """
        Run the command once; always fires with a reply.
        """
        addresses = [r.address for r in recipients]
        arguments = self.argumentsFor(envelope.senderText, addresses)
        protocol = _CommandProtocol(body, self.reactor, self.timeout)
        try:
            self.reactor.spawnProcess(
                protocol, arguments[0], arguments, env=self.env, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except OSError as e:
            self.log.error(
                "{agent}: cannot start {program}: {error}",
                agent=self.name,
                program=arguments[0],
                error=str(e),
            )
            return succeed(LOCAL_ERROR)

        def logged(reply: SMTPReply) -> SMTPReply:
            for address in addresses:
                self.log.info(
                    "{agent}: {recipient} from {sender}: {code} {enhanced} {text}",
                    agent=self.name,
                    sender=envelope.senderText,
                    recipient=str(address),
                    code=reply.code,
                    enhanced=reply.enhanced,
                    text=reply.text,
                )
            return reply

        return protocol.ended.addCallback(logged)


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> PipeDeliveryAgent:
    """
    Build a pipe agent from C{[delivery.NAME]}: C{command} (a list),
    C{timeout} (seconds, default 300), C{per_recipient} (default true),
    C{env} (a table of strings), C{separator} (default C{"+"}).
    """
    section = Section(f"[delivery.{instanceName}]", options)
    command = section.strings("command")
    timeout = section.number("timeout", 300.0, minimum=0.001)
    perRecipient = section.flag("per_recipient", True)
    env = section.table("env", {})
    separator = section.text("separator", "+")
    section.finish()
    if isinstance(options.get("command"), str):
        raise ConfigError(f"{section.title} command: must be a list of arguments (no shell)")
    try:
        checkCommand(command, perRecipient)
    except ValueError as e:
        raise ConfigError(f"{section.title} command: {e}") from None
    if not os.access(command[0], os.X_OK):
        # Checked once at start-up, so a typo is not found on the first message.
        raise ConfigError(f"{section.title} command: {command[0]} is not an executable file")
    for key, value in env.items():
        if not isinstance(value, str):
            raise ConfigError(f"{section.title} env.{key}: expected a string")
    if len(separator) > 1:
        raise ConfigError(f"{section.title} separator: must be one character or empty")
    return PipeDeliveryAgent(
        context.reactor,
        instanceName,
        command,
        timeout=timeout,
        perRecipient=perRecipient,
        env=env,
        separator=separator,
    )
