"""
The C{policy-server} policy: Postfix's policy delegation protocol against
a scripted policy server.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ComponentContext, ConfigError
from mailfw.policy import CONTINUE, AddHeader, Discard, Quarantine, Verdict
from mailfw.policy._policyserver import PolicyServerError, PolicyServerPolicy, fromConfig, verdictFor
from mailfw.testing import PolicyContractTests
from tests._milterpeer import InMemoryEndpoint
from tests._smtpdoubles import PROLOGUE, connect

BODY = b"Subject: hello\r\n\r\nline one\r\n"


class ScriptedPolicyServer(Protocol):
    """
    Answers each request with the next of C{actions} (C{None}: never
    answers; C{b"..."}: raw bytes), recording the requests.
    """

    def __init__(self, actions: list[Any], requests: list[dict[str, str]]) -> None:
        self.actions = actions
        self.requests = requests
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            request, self.buffer = self.buffer.split(b"\n\n", 1)
            self.requests.append(dict(line.split("=", 1) for line in request.decode().split("\n")))
            action = self.actions.pop(0) if self.actions else "DUNNO"
            assert self.transport is not None
            if action is None:
                continue
            if isinstance(action, bytes):
                self.transport.write(action)
            else:
                self.transport.write(f"action={action}\n\n".encode())


def policy(
    actions: list[Any], clock: Clock, **kw: Any
) -> tuple[PolicyServerPolicy, list[dict[str, str]], InMemoryEndpoint]:
    requests: list[dict[str, str]] = []
    endpoint = InMemoryEndpoint(
        lambda: ScriptedPolicyServer(actions, requests), refuse=kw.pop("refuse", False)
    )
    return PolicyServerPolicy("greylist", endpoint, clock, "inet:test:1", **kw), requests, endpoint


class VerdictTests(SynchronousTestCase):
    def test_actions(self) -> None:
        """
        Postfix's access-table actions map to verdicts.
        """

        def reply(action: str) -> tuple[int, str, str]:
            verdict = verdictFor(action)
            assert verdict.reply is not None
            return verdict.reply.code, verdict.reply.enhanced, verdict.reply.text

        self.assertEqual(verdictFor("DUNNO"), CONTINUE)
        self.assertEqual(verdictFor("dunno"), CONTINUE)
        self.assertEqual(reply("OK"), (250, "2.0.0", "Ok"))
        self.assertEqual(reply("REJECT"), (550, "5.7.1", "Access denied"))
        self.assertEqual(reply("REJECT go away"), (550, "5.0.0", "go away"))
        self.assertEqual(
            reply("DEFER_IF_PERMIT Greylisted, see http://postgrey.schweikert.ch/"),
            (450, "4.0.0", "Greylisted, see http://postgrey.schweikert.ch/"),
        )
        self.assertEqual(reply("DEFER 4.7.1 busy"), (450, "4.7.1", "busy"))
        self.assertEqual(reply("554 5.7.1 No thanks"), (554, "5.7.1", "No thanks"))
        self.assertEqual(
            verdictFor("PREPEND X-Greylist: delayed 300 seconds"),
            Verdict(edits=(AddHeader("X-Greylist", "delayed 300 seconds", 0),)),
        )
        self.assertEqual(verdictFor("HOLD"), Verdict(edits=(Quarantine("policy server: HOLD"),)))
        self.assertEqual(verdictFor("DISCARD spam"), Verdict(edits=(Discard("policy server: spam"),)))
        for bad in ("FROBNICATE", "", "PREPEND no colon", "299 odd"):
            with self.assertRaises(PolicyServerError):
                verdictFor(bad)


class PolicyServerTests(SynchronousTestCase):
    def test_requestAttributes(self) -> None:
        """
        Each recipient is asked about with Postfix's attributes, one
        connection for all, and the instance names the transaction.
        """
        clock = Clock()
        p, requests, endpoint = policy([], clock)
        conn = connect(policies=(p,), clock=clock)
        conn.send(PROLOGUE.replace(b"DATA\r\n", b"RCPT TO:<other@example.org>\r\nDATA\r\n") + BODY + b".\r\n")
        self.assertEqual(conn.newCodes()[-1], b"250")
        self.assertEqual(len(endpoint.servers), 1)
        first, second = requests
        self.assertEqual(first["request"], "smtpd_access_policy")
        self.assertEqual(first["protocol_state"], "RCPT")
        self.assertEqual((first["client_address"], first["helo_name"]), ("192.0.2.1", "client.example.net"))
        self.assertEqual((first["sender"], first["recipient"]), ("sender@example.net", "rcpt@example.org"))
        self.assertEqual(second["recipient"], "other@example.org")
        self.assertEqual(first["instance"], second["instance"])

    def test_deferAndPrepend(self) -> None:
        """
        postgrey's answers: the first attempt is deferred; the retry is
        accepted with its header on top.
        """
        clock = Clock()
        p, _, _ = policy(["DEFER_IF_PERMIT Greylisted", "PREPEND X-Greylist: delayed 300 seconds"], clock)
        conn = connect(policies=(p,), clock=clock)
        conn.send(PROLOGUE)
        self.assertIn(b"450 4.0.0 Greylisted", conn.lines())
        conn.send(b"RSET\r\n" + PROLOGUE.split(b"\r\n", 1)[1] + BODY + b".\r\n")
        self.assertEqual(conn.newCodes()[-1], b"250")
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(
            incoming.data.startswith(b"X-Greylist: delayed 300 seconds\r\nReceived: "), incoming.data
        )

    def test_endOfMessage(self) -> None:
        """
        With END-OF-MESSAGE configured, the server is asked once more at the
        end of data, with the size.
        """
        clock = Clock()
        p, requests, _ = policy(
            ["DUNNO", "REJECT 5.7.1 over quota"], clock, states=("RCPT", "END-OF-MESSAGE")
        )
        conn = connect(policies=(p,), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        self.assertEqual(conn.lines()[-1], b"550 5.7.1 over quota")
        self.assertEqual(requests[-1]["protocol_state"], "END-OF-MESSAGE")
        self.assertEqual(requests[-1]["size"], str(len(b"line one\r\n")))

    def test_serverDown(self) -> None:
        """
        A server that cannot be reached gets the default action: 451 4.3.5
        (tempfail), or go on (accept).
        """
        clock = Clock()
        p, _, _ = policy([], clock, refuse=True)
        conn = connect(policies=(p,), clock=clock)
        conn.send(PROLOGUE)
        self.assertIn(b"451 4.3.5 Server configuration problem", conn.lines())
        p, _, _ = policy([], clock, refuse=True, defaultAction="accept")
        conn = connect(policies=(p,), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        self.assertEqual(conn.newCodes()[-1], b"250")

    def test_brokenAnswers(self) -> None:
        """
        No answer in time, a reply without action, an unknown action or an
        oversized reply: the default action; the next request opens a new
        connection, unless the reply was well framed (an unknown action).
        """
        for answer in (None, b"hello=1\n\n", "FROBNICATE", b"x" * 5000):
            clock = Clock()
            p, _, endpoint = policy([answer], clock, timeout=5.0)
            conn = connect(policies=(p,), clock=clock)
            conn.send(PROLOGUE)
            clock.advance(5)
            self.assertIn(b"451 4.3.5 Server configuration problem", conn.lines(), answer)
            conn.send(b"RCPT TO:<again@example.org>\r\n")
            self.assertEqual(conn.newCodes()[-1], b"250", answer)
            self.assertEqual(len(endpoint.servers), 1 if answer == "FROBNICATE" else 2, answer)

    def test_config(self) -> None:
        """
        fromConfig checks the address and the protocol states.
        """
        context = ComponentContext(reactor=MemoryReactorClock(), hostname="mx.example.org", dataDir=None)  # type: ignore[arg-type]
        p = fromConfig(
            context,
            "g",
            {
                "plugin": "policy-server",
                "address": "inet:127.0.0.1:10023",
                "protocol_states": ["RCPT", "END-OF-MESSAGE"],
            },
        )
        self.assertEqual(p.states, ("RCPT", "END-OF-MESSAGE"))
        for bad in ({"address": "inet:x"}, {"address": "unix:/s", "protocol_states": ["DATA"]}):
            with self.assertRaises(ConfigError):
                fromConfig(context, "g", {"plugin": "policy-server", **bad})


class PolicyServerContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> PolicyServerPolicy:
        return policy([], Clock(), states=("RCPT", "END-OF-MESSAGE"))[0]
