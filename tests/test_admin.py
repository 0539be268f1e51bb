"""
Tests for the control socket protocol and the C{mailfw} command.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailfw.admin._control import ControlProtocol, selectorFromJSON
from mailfw.admin._main import formatList, main
from mailfw.queued import RecipientState, Selector
from mailfw.testing import MemoryQueue, makeEnvelope


def queueWithMessages() -> MemoryQueue:
    queue = MemoryQueue(Clock())
    for envelope in [
        makeEnvelope("a@example.net", "b@sub.example.net"),
        makeEnvelope("c@example.org", sender=None),
    ]:
        incoming = queue.receive(envelope)
        incoming.write(b"Subject: test\r\n\r\nbody\r\n")
        incoming.commit()
    return queue


def ask(queue: MemoryQueue, request: Any) -> dict[str, Any]:
    """
    Send one request line and return the decoded answer.
    """
    protocol = ControlProtocol(queue, lambda queueID: succeed(b"Subject: test\r\n"))
    transport = StringTransport()
    protocol.makeConnection(transport)
    line = request if isinstance(request, bytes) else json.dumps(request).encode()
    protocol.dataReceived(line + b"\n")
    assert transport.disconnecting, "the server closes after answering"
    answer: dict[str, Any] = json.loads(transport.value())
    return answer


class ControlProtocolTests(SynchronousTestCase):
    def test_list(self) -> None:
        """
        C{list} returns every message with its recipients as JSON.
        """
        answer = ask(queueWithMessages(), {"command": "list"})
        self.assertTrue(answer["ok"])
        self.assertEqual(
            [(m["queueID"], m["sender"], [r["address"] for r in m["recipients"]]) for m in answer["result"]],
            [
                ("Q1", "sender@example.org", ["a@example.net", "b@sub.example.net"]),
                ("Q2", "", ["c@example.org"]),
            ],
        )

    def test_listByDomain(self) -> None:
        """
        A domain selector with a leading @ includes subdomains.
        """
        answer = ask(queueWithMessages(), {"command": "list", "selector": {"domain": "@example.net"}})
        [message] = answer["result"]
        self.assertEqual(len(message["recipients"]), 2)

    def test_holdAndRelease(self) -> None:
        """
        C{hold} and C{release} answer how many recipients changed, and the
        queue's state follows.
        """
        queue = queueWithMessages()
        self.assertEqual(ask(queue, {"command": "hold", "selector": {"queueIDs": ["Q1"]}})["result"], 2)
        held = self.successResultOf(queue.list(Selector(state=RecipientState.HOLD)))
        self.assertEqual([m.queueID for m in held], ["Q1"])
        self.assertEqual(ask(queue, {"command": "release", "selector": {}})["result"], 2)

    def test_flush(self) -> None:
        """
        C{flush} answers how many recipients were made due.
        """
        self.assertEqual(ask(queueWithMessages(), {"command": "flush"})["result"], 3)

    def test_deleteNeedsSelector(self) -> None:
        """
        C{delete} with no selector is refused: emptying the whole queue
        must be asked for explicitly.
        """
        queue = queueWithMessages()
        answer = ask(queue, {"command": "delete"})
        self.assertFalse(answer["ok"])
        self.assertIn("needs a selector", answer["error"])
        self.assertEqual(len(self.successResultOf(queue.list(Selector()))), 2)

    def test_delete(self) -> None:
        """
        C{delete} with a queue ID removes that message.
        """
        queue = queueWithMessages()
        self.assertEqual(ask(queue, {"command": "delete", "selector": {"queueIDs": ["Q2"]}})["result"], 1)
        self.assertEqual([m.queueID for m in self.successResultOf(queue.list(Selector()))], ["Q1"])

    def test_bounceNeedsSelector(self) -> None:
        """
        C{bounce} with no selector is refused, like C{delete}: returning
        the whole queue must be asked for explicitly.
        """
        queue = queueWithMessages()
        answer = ask(queue, {"command": "bounce", "selector": {}})
        self.assertEqual(
            answer,
            {"ok": False, "error": "bounce needs a selector (a queue ID, --domain, --sender or --state)"},
        )
        self.assertEqual(self._bounced(queue), [])

    def _bounced(self, queue: MemoryQueue) -> list[str]:
        return [
            str(r.recipient.address)
            for m in self.successResultOf(queue.list(Selector()))
            for r in m.recipients
            if r.bounceRequested
        ]

    def test_bounce(self) -> None:
        """
        C{bounce} marks the selected recipients, answers how many, and
        C{list} shows the mark.
        """
        queue = queueWithMessages()
        answer = ask(queue, {"command": "bounce", "selector": {"queueIDs": ["Q1"], "domain": "@example.net"}})
        self.assertEqual(answer, {"ok": True, "result": 2})
        self.assertEqual(self._bounced(queue), ["a@example.net", "b@sub.example.net"])
        listed = ask(queue, {"command": "list"})["result"]
        self.assertEqual(
            [[r["bounceRequested"] for r in m["recipients"]] for m in listed], [[True, True], [False]]
        )
        self.assertEqual(
            ask(queue, {"command": "bounce", "selector": {"sender": "nobody@example.org"}})["result"], 0
        )

    def test_show(self) -> None:
        """
        C{show} returns the envelope and the header section.
        """
        answer = ask(queueWithMessages(), {"command": "show", "selector": {"queueIDs": ["Q1"]}})
        self.assertEqual(answer["result"]["headers"], "Subject: test\r\n")

    def test_showUnknown(self) -> None:
        """
        C{show} of an unknown ID is a clear error.
        """
        answer = ask(queueWithMessages(), {"command": "show", "selector": {"queueIDs": ["nope"]}})
        self.assertEqual(answer, {"ok": False, "error": "no such message"})

    def test_badRequests(self) -> None:
        """
        Malformed JSON, non-objects, unknown commands and unknown selector
        fields are answered with an error, never a traceback.
        """
        queue = queueWithMessages()
        self.assertFalse(ask(queue, b"{nope")["ok"])
        self.assertEqual(ask(queue, [1])["error"], "request must be a JSON object")
        self.assertEqual(ask(queue, {"command": "explode"})["error"], "unknown command 'explode'")
        self.assertIn(
            "unknown selector field", ask(queue, {"command": "list", "selector": {"x": 1}})["error"]
        )
        self.assertIn("unknown state", ask(queue, {"command": "list", "selector": {"state": "x"}})["error"])


class SelectorTests(SynchronousTestCase):
    def test_fromJSON(self) -> None:
        """
        Every selector field is carried over.
        """
        self.assertEqual(
            selectorFromJSON(
                {"queueIDs": ["a"], "domain": "d", "sender": "s", "state": "hold", "route": "r"}
            ),
            Selector(("a",), "d", "s", RecipientState.HOLD, "r"),
        )


class CommandTests(SynchronousTestCase):
    def test_notRunning(self) -> None:
        """
        With no server on the control socket, the command says so in one
        line and exits 1.
        """
        errors: list[str] = []
        self.patch(
            __import__("sys"), "stderr", type("E", (), {"write": errors.append, "flush": lambda s: None})()
        )
        status = main(["queue", "list", "--socket", self.mktemp()])
        self.assertEqual(status, 1)
        self.assertIn("the mailfw server is not running", "".join(errors))

    def test_bounceCommand(self) -> None:
        """
        C{mailfw queue bounce} sends the selector to the control socket and
        prints how many recipients it returned, as text or JSON.
        """
        import mailfw.admin._main as _main

        sent: list[Any] = []

        def request(path: Any, document: Any) -> int:
            sent.append(document)
            return 3

        self.patch(_main, "request", request)
        printed: list[str] = []
        self.patch(
            __import__("sys"), "stdout", type("O", (), {"write": printed.append, "flush": lambda s: None})()
        )
        socket = self.mktemp()
        self.assertEqual(
            main(["queue", "bounce", "Q1", "Q2", "--domain", "example.com", "--socket", socket]), 0
        )
        self.assertEqual(main(["queue", "bounce", "--state", "hold", "--json", "--socket", socket]), 0)
        self.assertEqual(
            sent,
            [
                {"command": "bounce", "selector": {"queueIDs": ["Q1", "Q2"], "domain": "example.com"}},
                {"command": "bounce", "selector": {"state": "hold"}},
            ],
        )
        lines = "".join(printed).splitlines()
        self.assertEqual(lines[0], "bounce: 3 recipients")
        self.assertEqual(json.loads(lines[1]), {"action": "bounce", "recipients": 3})

    def test_formatBounceRequested(self) -> None:
        """
        The text listing says when a recipient waits to be bounced.
        """
        text = formatList(
            [
                {
                    "queueID": "Q1",
                    "size": 10,
                    "arrival": 0.0,
                    "sender": "a@b",
                    "recipients": [
                        {
                            "address": "c@d",
                            "state": "ready",
                            "attempts": 2,
                            "nextAttempt": 60.0,
                            "lastReply": None,
                            "bounceRequested": True,
                        },
                    ],
                }
            ]
        )
        self.assertIn("<c@d> (bounce requested, 2 attempts)", text)

    def test_formatEmpty(self) -> None:
        """
        An empty queue reads as such.
        """
        self.assertEqual(formatList([]), "Mail queue is empty")

    def test_formatMessage(self) -> None:
        """
        The text listing shows ID, size, sender, each recipient's state and
        last reply, and a total.
        """
        text = formatList(
            [
                {
                    "queueID": "Q1",
                    "size": 10,
                    "arrival": 0.0,
                    "sender": "a@b",
                    "recipients": [
                        {
                            "address": "c@d",
                            "state": "ready",
                            "attempts": 2,
                            "nextAttempt": 60.0,
                            "lastReply": "451 4.4.1 no answer",
                        },
                    ],
                }
            ]
        )
        self.assertIn("Q1", text)
        self.assertIn("<c@d> (deferred, next", text)
        self.assertIn("451 4.4.1 no answer", text)
        self.assertTrue(text.endswith("-- 1 messages, 1 recipients"))
