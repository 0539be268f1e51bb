"""
The local control socket: how C{mailfw queue ...} steers a running server
(and C{mailfw user quota} reads its sending-quota counters).

One JSON request line in, one JSON document out, then the server closes the
connection.  The socket lives in the data directory with mode 0600, so only
the server's own user (and root) can use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from mailfw.auth._quota import SendingQuotas
from mailfw.envelope import Envelope
from mailfw.interfaces import IMessageQueue, IQueueAdmin
from mailfw.queued import QueuedMessage, QueuedRecipient, RecipientState, Selector

__all__ = ["ControlFactory", "messageToJSON", "selectorFromJSON"]

CONTROL_SOCKET = "control.sock"
MAX_HEADER_BYTES = 64 * 1024


class ControlError(Exception):
    """
    A request the server cannot answer; the message goes to the operator.
    """


def selectorFromJSON(data: Mapping[str, Any]) -> Selector:
    """
    Build a L{Selector} from its JSON form, refusing unknown fields.
    """
    known = {"queueIDs", "domain", "sender", "state", "route"}
    unknown = set(data) - known
    if unknown:
        raise ControlError(f"unknown selector field {sorted(unknown)[0]!r}")
    state = data.get("state")
    try:
        return Selector(
            queueIDs=tuple(data.get("queueIDs", ())),
            domain=data.get("domain"),
            sender=data.get("sender"),
            state=None if state is None else RecipientState(state),
            route=data.get("route"),
        )
    except ValueError:
        raise ControlError(f"unknown state {state!r}") from None


def _recipientToJSON(r: QueuedRecipient) -> dict[str, Any]:
    return {
        "index": r.index,
        "address": str(r.recipient.address),
        "state": r.state.value,
        "attempts": r.attempts,
        "nextAttempt": r.nextAttempt,
        "lastReply": None if r.lastReply is None else str(r.lastReply),
        "bounceRequested": r.bounceRequested,
    }


def _envelopeToJSON(e: Envelope) -> dict[str, Any]:
    return {
        "sender": e.senderText,
        "arrival": e.arrival,
        "ret": e.ret,
        "envid": e.envid,
        "body": e.body,
        "smtputf8": e.smtputf8,
        "helo": e.helo,
        "peerHost": e.peerHost,
        "authenticated": e.authenticated,
    }


def messageToJSON(m: QueuedMessage) -> dict[str, Any]:
    """
    The JSON form of a queued message, as C{mailfw queue list --json} prints.
    """
    return {
        "queueID": m.queueID,
        "size": m.size,
        **_envelopeToJSON(m.envelope),
        "recipients": [_recipientToJSON(r) for r in m.recipients],
    }


class ControlProtocol(LineOnlyReceiver):
    """
    Answers one request, then closes.
    """

    MAX_LENGTH = 64 * 1024
    delimiter = b"\n"
    log = Logger()

    def __init__(
        self,
        queue: IQueueAdmin,
        readHeaders: Callable[[str], Deferred[bytes]],
        quotas: SendingQuotas | None = None,
    ) -> None:
        self.queue = queue
        self.readHeaders = readHeaders
        self.quotas = quotas
        self.answered = False

    def lineReceived(self, line: bytes) -> None:
        if self.answered:
            return
        self.answered = True
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ControlError("request must be a JSON object")
            d = maybeDeferred(self.dispatch, request)
        except (ValueError, ControlError) as e:
            self.answer({"ok": False, "error": str(e)})
            return
        d.addCallbacks(lambda result: self.answer({"ok": True, "result": result}), self.failed)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.answer({"ok": False, "error": "request too long"})

    def dispatch(self, request: dict[str, Any]) -> Deferred[Any]:
        command = request.get("command")
        if command == "quota":
            return self.quota(request.get("user"))
        selector = selectorFromJSON(request.get("selector", {}))
        if command == "list":
            return self.queue.list(selector).addCallback(
                lambda messages: [messageToJSON(m) for m in messages]
            )
        if command == "show":
            return self.show(selector)
        actions = {
            "flush": self.queue.flush,
            "hold": self.queue.hold,
            "release": self.queue.release,
            "delete": self.queue.delete,
            "bounce": self.queue.bounce,
        }
        if command not in actions:
            raise ControlError(f"unknown command {command!r}")
        if command in ("delete", "bounce") and selector == Selector():
            # Dropping or returning the whole queue is never what a
            # forgotten argument should do.
            raise ControlError(f"{command} needs a selector (a queue ID, --domain, --sender or --state)")
        return actions[command](selector)

    def show(self, selector: Selector) -> Deferred[Any]:
        def withHeaders(messages: Any) -> Deferred[Any]:
            if not messages:
                raise ControlError("no such message")
            [message] = messages[:1]
            data = messageToJSON(message)
            d = self.readHeaders(message.queueID)

            def add(headers: bytes) -> dict[str, Any]:
                data["headers"] = headers.decode("utf-8", "replace")
                return data

            return d.addCallback(add)

        return self.queue.list(selector).addCallback(withHeaders)

    def quota(self, user: object) -> Deferred[Any]:
        """
        What C{user} has used of each sending quota, as counted in the
        server's shared state: limit name to C{{"used": n, "limit": m}}
        (C{m} null for no limit).
        """
        if self.quotas is None:
            raise ControlError("no sending quotas are configured ([auth.quotas])")
        if not isinstance(user, str) or not user:
            raise ControlError("quota needs a user name")
        return self.quotas.usage(user).addCallback(
            lambda usage: {key: {"used": used, "limit": limit} for key, (used, limit) in usage.items()}
        )

    def failed(self, failure: Failure) -> None:
        if failure.check(ControlError):
            self.answer({"ok": False, "error": str(failure.value)})
            return
        self.log.failure("control request failed", failure)
        self.answer({"ok": False, "error": "internal error; see the server log"})

    def answer(self, document: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(document).encode("utf-8") + b"\n")
        self.transport.loseConnection()


class ControlFactory(Factory):
    """
    Serves the control protocol for one queue.

    @param readHeaders: returns a message's header section (for C{show});
        by default read from the queue's stored body in a thread.
    @param quotas: the server's sending quotas, for C{quota} requests.
    """

    def __init__(self, queue: IMessageQueue, reactor: Any, quotas: SendingQuotas | None = None) -> None:
        self.queue = queue
        self.reactor = reactor
        self.quotas = quotas

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.queue, self.readHeaders, self.quotas)

    def readHeaders(self, queueID: str) -> Deferred[bytes]:
        from twisted.internet.threads import deferToThreadPool

        def read(body: Any) -> Deferred[bytes]:
            def headersOf() -> bytes:
                with body.open() as f:
                    head: bytes = f.read(MAX_HEADER_BYTES)
                end = head.find(b"\r\n\r\n")
                return head if end < 0 else head[: end + 2]

            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), headersOf)

        return self.queue.openBody(queueID).addCallback(read)
