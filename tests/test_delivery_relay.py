"""
Tests for L{mailfw.delivery._relay}: the C{smtp-relay} delivery agent, with
an in-memory DNS and in-memory SMTP peers connected through
L{twisted.test.iosim}.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from twisted.protocols.basic import LineReceiver
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.delivery._contract import SAMPLE, DeliveryAgentContractTests, TrackingBody
from mailfw.delivery._relay import SMTPRelayAgent, fromConfig
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IConnectionShaping, IDeliveryAgent
from mailfw.routing._mx import MailHost, MXResolver
from mailfw.scheduling._shaping import ConnectionGate, Shape, ShapingTable
from mailfw.smtp._client import ClientOptions, SMTPClient, Timeouts


class ZoneResolver(ResolverBase):
    """
    Answers A and MX queries from a dictionary; absent names are NXDOMAIN.
    """

    def __init__(self, zone: dict[str, list[Any]]) -> None:
        ResolverBase.__init__(self)
        self.zone = zone

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        text = name.decode("ascii").lower()
        if text not in self.zone:
            return fail(error.DNSNameError(text))
        answers = [dns.RRHeader(name, type, payload=r) for r in self.zone[text] if type == r.TYPE]
        return succeed((answers, [], []))


class ScriptedServer(LineReceiver):
    """
    An SMTP server that answers from a script and records messages.
    """

    delimiter = b"\r\n"

    transport: Any

    def __init__(self, script: dict[str, Any], log: list[dict[str, Any]], quits: list[int]) -> None:
        self.script = script
        self.log = log
        self.quits = quits
        self.inData = False
        self.mails = 0
        self.message: dict[str, Any] = {"rcpts": [], "data": b"", "lines": []}

    def reply(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode() + b"\r\n" for line in lines))

    def connectionMade(self) -> None:
        self.reply(self.script.get("greeting", "220 fake ESMTP"))

    def lineReceived(self, line: bytes) -> None:
        if self.inData:
            if line == b".":
                self.inData = False
                self.log.append(self.message)
                self.message = {"rcpts": [], "data": b"", "lines": []}
                self.reply(self.script.get("final", "250 2.0.0 queued"))
                if self.script.get("closeAfterMessage"):
                    self.transport.loseConnection()
            else:
                self.message["data"] += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            return
        text = line.decode()
        self.message["lines"].append(text)
        verb = text.split(" ", 1)[0].split(":", 1)[0].upper()
        if verb == "EHLO":
            self.reply(*self.script.get("ehlo", ["250-fake", "250 PIPELINING"]))
        elif verb == "MAIL":
            if self.mails and "laterMail" in self.script:
                self.reply(self.script["laterMail"])
                if self.script["laterMail"].startswith("421"):
                    self.transport.loseConnection()
            else:
                self.reply(self.script.get("mail", "250 2.1.0 ok"))
            self.mails += 1
        elif verb == "RCPT":
            address = text[text.index("<") + 1 : text.index(">")]
            answer = self.script.get("rcpt", {}).get(address, "250 2.1.5 ok")
            if answer.startswith("2"):
                self.message["rcpts"].append(address)
            self.reply(answer)
        elif verb == "DATA":
            if self.message["rcpts"]:
                self.inData = True
                self.reply("354 go ahead")
            else:
                self.reply("554 5.5.1 no valid recipients")
        elif verb == "QUIT":
            self.quits.append(1)
            self.reply("221 bye")
            self.transport.loseConnection()
        else:
            self.reply("250 ok")


class FakeNetwork:
    """
    Hosts by address: a script for a listening peer, C{None} for a
    refused connection.
    """

    def __init__(self, clock: Clock, hosts: dict[str, dict[str, Any] | None]) -> None:
        self.clock = clock
        self.hosts = hosts
        self.attempts: list[tuple[str, int]] = []
        self.pumps: list[iosim.IOPump] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.quits: list[int] = []

    def connect(self, host: MailHost, port: int, client: SMTPClient) -> Deferred[Any]:
        self.attempts.append((host.address, port))
        script = self.hosts.get(host.address)
        if script is None:
            return fail(ConnectionRefusedError(host.address))
        server = ScriptedServer(script, self.messages.setdefault(host.address, []), self.quits)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
        )
        self.pumps.append(pump)
        return succeed(client)

    def settle(self) -> None:
        for _ in range(100):
            if not any(pump.pump(advanceClock=False) for pump in self.pumps):
                return

    def run(self, d: Deferred[Any]) -> None:
        for _ in range(1000):
            if d.called:
                return
            moved = False
            for pump in self.pumps:
                moved = pump.pump(advanceClock=False) or moved
            if not moved:
                self.clock.advance(1)
        raise AssertionError("delivery never finished")


ZONE: dict[str, list[Any]] = {
    "example.net": [dns.Record_MX(10, b"mx1.example.net"), dns.Record_MX(20, b"mx2.example.net")],
    "mx1.example.net": [dns.Record_A("192.0.2.1")],
    "mx2.example.net": [dns.Record_A("192.0.2.2")],
    "example.com": [dns.Record_MX(10, b"mx.example.com")],
    "mx.example.com": [dns.Record_A("192.0.2.3")],
    "nullmx.example": [dns.Record_MX(0, b".")],
}


def makeAgent(hosts: dict[str, dict[str, Any] | None], **optionKw: Any) -> tuple[SMTPRelayAgent, FakeNetwork]:
    clock = Clock()
    network = FakeNetwork(clock, hosts)
    resolver = MXResolver(ZoneResolver(ZONE), families=("ipv4",))
    options = ClientOptions(helo="relay.example.org", tls=optionKw.pop("tls", "none"), **optionKw)
    agent = SMTPRelayAgent("outbound", clock, resolver, network.connect, options, port=25)
    return agent, network


def envelope(*recipients: str) -> Envelope:
    return Envelope(
        sender=Address("sender", "example.org"),
        recipients=tuple(Recipient(Address.parse(r)) for r in recipients),
    )


def deliver(
    agent: SMTPRelayAgent, network: FakeNetwork, env: Envelope, nexthop: str | None = None
) -> list[RecipientOutcome]:
    d = agent.deliver(env, TrackingBody(), nexthop)
    network.run(d)
    result: list[RecipientOutcome] = SynchronousTestCase().successResultOf(d)  # type: ignore[arg-type]
    return result


def summary(outcomes: Sequence[RecipientOutcome]) -> list[tuple[str, int, str, str | None]]:
    return [(str(o.recipient.address), o.reply.code, o.reply.enhanced, o.remoteMTA) for o in outcomes]


class RelayContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    The agent passes the delivery agent contract against one peer.
    """

    def makeAgent(self) -> IDeliveryAgent:
        agent, self.network = makeAgent({"192.0.2.9": {}})
        return agent

    def nexthop(self) -> str | None:
        return "[192.0.2.9]"

    def resultOf(self, agent: IDeliveryAgent, deferred: Deferred[Any]) -> Any:
        self.network.run(deferred)
        return self.successResultOf(deferred)

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        for message in reversed(self.network.messages.get("192.0.2.9", [])):
            if str(recipient) in message["rcpts"]:
                data: bytes = message["data"]
                return data
        return None


class RelayTests(SynchronousTestCase):
    def test_verify(self) -> None:
        """
        L{SMTPRelayAgent} provides L{IDeliveryAgent}.
        """
        agent, _ = makeAgent({})
        self.assertTrue(verifyObject(IDeliveryAgent, agent))

    def test_deliversToFirstMX(self) -> None:
        """
        Mail goes to the most preferred MX host, on port 25, and arrives
        intact; the outcome names that host.  The connection says QUIT once
        it has waited the cache time for another transaction.
        """
        agent, network = makeAgent({"192.0.2.1": {}, "192.0.2.2": {}})
        outcomes = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual(summary(outcomes), [("a@example.net", 250, "2.0.0", "mx1.example.net")])
        self.assertEqual(network.attempts, [("192.0.2.1", 25)])
        [message] = network.messages["192.0.2.1"]
        self.assertEqual(message["data"], SAMPLE)
        network.settle()
        self.assertEqual(network.quits, [])
        network.clock.advance(agent.cacheTime)
        network.settle()
        self.assertEqual(network.quits, [1])

    def test_reusesConnection(self) -> None:
        """
        A second message to the same host within the cache time goes over
        the first one's connection: one connection, one EHLO, two
        transactions, then QUIT once it has idled.
        """
        agent, network = makeAgent({"192.0.2.1": {}})
        deliver(agent, network, envelope("a@example.net"))
        network.clock.advance(agent.cacheTime / 2)
        outcomes = deliver(agent, network, envelope("b@example.net"))
        self.assertEqual(summary(outcomes), [("b@example.net", 250, "2.0.0", "mx1.example.net")])
        self.assertEqual(network.attempts, [("192.0.2.1", 25)])
        [first, second] = network.messages["192.0.2.1"]
        self.assertEqual((first["rcpts"], second["rcpts"]), (["a@example.net"], ["b@example.net"]))
        self.assertEqual(sum(line.startswith("EHLO") for line in first["lines"]), 1)
        self.assertFalse(any(line.startswith("EHLO") for line in second["lines"]))
        network.settle()
        self.assertEqual(network.quits, [])
        network.clock.advance(agent.cacheTime)
        network.settle()
        self.assertEqual(network.quits, [1])
        self.assertEqual(agent._idle, {})

    def test_closedConnectionReplaced(self) -> None:
        """
        A cached connection the host has closed meanwhile is not used: the
        next message gets a new connection.
        """
        agent, network = makeAgent({"192.0.2.1": {"closeAfterMessage": True}})
        deliver(agent, network, envelope("a@example.net"))
        network.settle()
        outcomes = deliver(agent, network, envelope("b@example.net"))
        self.assertEqual(summary(outcomes), [("b@example.net", 250, "2.0.0", "mx1.example.net")])
        self.assertEqual(network.attempts, [("192.0.2.1", 25), ("192.0.2.1", 25)])

    def test_staleConnectionReplaced(self) -> None:
        """
        A cached connection whose host refuses the next MAIL with a 4xx is
        closed and a new one made to the same host, which takes the
        message; that does not count as the host failing (the second MX is
        not tried).
        """
        agent, network = makeAgent(
            {"192.0.2.1": {"laterMail": "421 4.7.0 one message per connection"}, "192.0.2.2": {}}
        )
        deliver(agent, network, envelope("a@example.net"))
        outcomes = deliver(agent, network, envelope("b@example.net"))
        self.assertEqual(summary(outcomes), [("b@example.net", 250, "2.0.0", "mx1.example.net")])
        self.assertEqual(network.attempts, [("192.0.2.1", 25), ("192.0.2.1", 25)])
        self.assertEqual(
            [m["rcpts"] for m in network.messages["192.0.2.1"]], [["a@example.net"], ["b@example.net"]]
        )

    def test_reuseLimitAndCacheOff(self) -> None:
        """
        A connection older than the reuse limit, or any connection when the
        cache time is 0, says QUIT right after its transaction.
        """
        for attribute, value in (("reuseLimit", 0.0), ("cacheTime", 0.0)):
            agent, network = makeAgent({"192.0.2.1": {}})
            setattr(agent, attribute, value)
            deliver(agent, network, envelope("a@example.net"))
            network.settle()
            self.assertEqual(network.quits, [1], attribute)
            deliver(agent, network, envelope("b@example.net"))
            self.assertEqual(len(network.attempts), 2, attribute)

    def test_firstMXRefuses(self) -> None:
        """
        When the first MX host refuses the connection, the next one is used.
        """
        agent, network = makeAgent({"192.0.2.1": None, "192.0.2.2": {}})
        outcomes = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual(summary(outcomes), [("a@example.net", 250, "2.0.0", "mx2.example.net")])
        self.assertEqual(network.attempts, [("192.0.2.1", 25), ("192.0.2.2", 25)])

    def test_greeting4xxMovesOn(self) -> None:
        """
        A 4xx greeting moves on to the next host.
        """
        agent, network = makeAgent({"192.0.2.1": {"greeting": "421 4.3.2 busy"}, "192.0.2.2": {}})
        outcomes = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual(outcomes[0].remoteMTA, "mx2.example.net")
        self.assertTrue(outcomes[0].delivered)

    def test_mail4xxMovesOn(self) -> None:
        """
        A 4xx reply to MAIL moves on to the next host.
        """
        agent, network = makeAgent({"192.0.2.1": {"mail": "451 4.3.0 later"}, "192.0.2.2": {}})
        outcomes = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual(outcomes[0].remoteMTA, "mx2.example.net")

    def test_mail5xxFailsAll(self) -> None:
        """
        A 5xx reply to MAIL fails every recipient; no other host is tried.
        """
        agent, network = makeAgent({"192.0.2.1": {"mail": "553 5.7.1 sender refused"}, "192.0.2.2": {}})
        outcomes = deliver(agent, network, envelope("a@example.net", "b@example.net"))
        self.assertEqual(
            summary(outcomes),
            [
                ("a@example.net", 553, "5.7.1", "mx1.example.net"),
                ("b@example.net", 553, "5.7.1", "mx1.example.net"),
            ],
        )
        self.assertEqual(len(network.attempts), 1)

    def test_allHostsFail(self) -> None:
        """
        When no host can be reached every recipient is deferred with 4.4.1.
        """
        agent, network = makeAgent({"192.0.2.1": None, "192.0.2.2": None})
        outcomes = deliver(agent, network, envelope("a@example.net", "b@example.net"))
        self.assertEqual(
            [(o.reply.code, o.reply.enhanced, o.remoteMTA) for o in outcomes],
            [(451, "4.4.1", "mx2.example.net")] * 2,
        )
        self.assertTrue(all(o.deferred for o in outcomes))

    def test_allHostsGreet5xx(self) -> None:
        """
        Even 5xx greetings from every host only defer (4.4.1).
        """
        script = {"greeting": "554 5.3.2 no service"}
        agent, network = makeAgent({"192.0.2.1": script, "192.0.2.2": script})
        [outcome] = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.4.1"))
        self.assertIn("554", outcome.reply.text)

    def test_perRecipientReplies(self) -> None:
        """
        RCPT replies decide per recipient: 5xx failed, 4xx deferred, others
        delivered, in envelope order.
        """
        script = {"rcpt": {"b@example.net": "550 5.1.1 unknown", "c@example.net": "450 4.2.1 later"}}
        agent, network = makeAgent({"192.0.2.1": script})
        outcomes = deliver(agent, network, envelope("a@example.net", "b@example.net", "c@example.net"))
        self.assertEqual(
            [(o.reply.code, o.delivered, o.deferred, o.failed) for o in outcomes],
            [(250, True, False, False), (550, False, False, True), (450, False, True, False)],
        )
        self.assertEqual(network.messages["192.0.2.1"][0]["rcpts"], ["a@example.net"])

    def test_finalReply5xx(self) -> None:
        """
        A 5xx after DATA fails the whole group.
        """
        agent, network = makeAgent({"192.0.2.1": {"final": "554 5.7.1 rejected as spam"}})
        outcomes = deliver(agent, network, envelope("a@example.net", "b@example.net"))
        self.assertEqual([o.reply.code for o in outcomes], [554, 554])

    def test_splitByDomain(self) -> None:
        """
        Without a next hop, recipients are delivered per domain, and the
        outcomes keep the envelope order.
        """
        agent, network = makeAgent({"192.0.2.1": {}, "192.0.2.3": {}})
        outcomes = deliver(agent, network, envelope("a@example.net", "b@example.com", "c@example.net"))
        self.assertEqual(
            [(str(o.recipient.address), o.remoteMTA) for o in outcomes],
            [
                ("a@example.net", "mx1.example.net"),
                ("b@example.com", "mx.example.com"),
                ("c@example.net", "mx1.example.net"),
            ],
        )
        self.assertEqual(network.messages["192.0.2.1"][0]["rcpts"], ["a@example.net", "c@example.net"])

    def test_nullMX(self) -> None:
        """
        A null MX fails the recipients with 556 5.1.10 and no connection.
        """
        agent, network = makeAgent({})
        [outcome] = deliver(agent, network, envelope("a@nullmx.example"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (556, "5.1.10"))
        self.assertEqual(network.attempts, [])

    def test_nxdomain(self) -> None:
        """
        A recipient domain that does not exist fails permanently (5.1.2).
        """
        agent, network = makeAgent({})
        [outcome] = deliver(agent, network, envelope("a@nowhere.example"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (550, "5.1.2"))

    def test_fixedNexthopAndPort(self) -> None:
        """
        A C{[host]:port} next hop is used for every recipient, whatever the
        domain, on that port.
        """
        agent, network = makeAgent({"192.0.2.50": {}})
        outcomes = deliver(agent, network, envelope("a@example.net", "b@example.com"), "[192.0.2.50]:2525")
        self.assertEqual(network.attempts, [("192.0.2.50", 2525)])
        self.assertEqual([o.reply.code for o in outcomes], [250, 250])

    def test_badNexthop(self) -> None:
        """
        A malformed next hop defers (a configuration error), never bounces.
        """
        agent, network = makeAgent({})
        [outcome] = deliver(agent, network, envelope("a@example.net"), "[broken")
        self.assertTrue(outcome.deferred)

    def test_requiredTLSNotOffered(self) -> None:
        """
        When TLS is required and no host offers it, the recipients are
        deferred with the TLS reason, and nothing is sent.
        """
        agent, network = makeAgent(
            {"192.0.2.1": {}, "192.0.2.2": {}}, tls="encrypt", tlsContext=lambda h, l: None
        )
        [outcome] = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.7.10"))
        self.assertEqual(len(network.attempts), 2)
        self.assertEqual(network.messages, {"192.0.2.1": [], "192.0.2.2": []})

    def test_sizeTooBigIsPermanent(self) -> None:
        """
        A message over the host's SIZE limit fails permanently without
        trying other hosts.
        """
        script = {"ehlo": ["250-fake", "250 SIZE 10"]}
        agent, network = makeAgent({"192.0.2.1": script, "192.0.2.2": {}})
        [outcome] = deliver(agent, network, envelope("a@example.net"))
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (552, "5.3.4"))
        self.assertEqual(len(network.attempts), 1)


class ConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        return ComponentContext(
            reactor=MemoryReactorClock(),
            hostname="relay.example.org",
            dataDir=Path(self.mktemp()),
            nameservers=(("127.0.0.1", 5353),),
        )

    def test_defaults(self) -> None:
        """
        Defaults: port 25, opportunistic TLS, HELO with the host name, no
        credentials, RFC 5321 timeouts.
        """
        agent = fromConfig(self.context(), "outbound", {"plugin": "smtp-relay"})
        self.assertEqual(agent.name, "outbound")
        self.assertEqual(agent.port, 25)
        self.assertEqual(agent.options.tls, "may")
        self.assertEqual(agent.options.helo, "relay.example.org")
        self.assertIsNone(agent.options.credentials)
        self.assertEqual(agent.options.timeouts, Timeouts())
        self.assertEqual(agent.resolver.maxAddresses, 5)

    def test_options(self) -> None:
        """
        Every option is read.
        """
        agent = fromConfig(
            self.context(),
            "smart",
            {
                "port": 587,
                "tls": "verify",
                "helo": "out.example.org",
                "auth_user": "u",
                "auth_password": "p",
                "source_address": "127.0.0.1",
                "max_addresses": 2,
                "address_families": ["ipv4"],
                "connect_timeout": 5,
                "command_timeout": 6,
                "data_timeout": 7,
                "transfer_timeout": 8,
                "data_done_timeout": 9,
            },
        )
        self.assertEqual(agent.port, 587)
        self.assertEqual(agent.options.tls, "verify")
        self.assertEqual(agent.options.credentials, ("u", "p"))
        self.assertEqual(agent.options.timeouts, Timeouts(5, 6, 7, 8, 9))
        self.assertEqual(agent.resolver.families, ("ipv4",))

    def test_errors(self) -> None:
        """
        Bad options are refused naming the section and key.
        """
        for options, fragment in (
            ({"tls": "always"}, "tls"),
            ({"port": 0}, "port"),
            ({"port": 70000}, "port"),
            ({"auth_user": "u"}, "auth_user"),
            ({"source_address": "host"}, "source_address"),
            ({"address_families": ["ipx"]}, "address_families"),
            ({"helo": "two words"}, "helo"),
            ({"ca_file": "/nonexistent.pem", "tls": "verify"}, "ca_file"),
            ({"colour": "blue"}, "colour"),
        ):
            e = self.assertRaises(ConfigError, fromConfig, self.context(), "outbound", options)
            self.assertIn("[delivery.outbound]", str(e))
            self.assertIn(fragment, str(e))


class ConnectionShapingTests(SynchronousTestCase):
    """
    The relay agent keeps within traffic shaping's connection limits
    (L{IConnectionShaping}).
    """

    def gated(self, **shape: Any) -> tuple[SMTPRelayAgent, FakeNetwork]:
        agent, network = makeAgent({"192.0.2.1": {}})
        table = ShapingTable(network.clock, [Shape("*.example.net", **shape)])
        agent.shapeConnections(ConnectionGate(network.clock, table))
        return agent, network

    def test_verify(self) -> None:
        """
        L{SMTPRelayAgent} provides L{IConnectionShaping}.
        """
        agent, _ = makeAgent({})
        self.assertTrue(verifyObject(IConnectionShaping, agent))

    def test_messagesPerConnection(self) -> None:
        """
        With C{max_messages_per_connection = 1} a connection says QUIT after
        its transaction instead of waiting for the next message, which
        gets a new connection.
        """
        agent, network = self.gated(maxMessagesPerConnection=1)
        deliver(agent, network, envelope("a@example.net"))
        network.settle()
        self.assertEqual(network.quits, [1])
        deliver(agent, network, envelope("b@example.net"))
        self.assertEqual(len(network.attempts), 2)

    def test_connectionsPerMinute(self) -> None:
        """
        With C{max_connections_per_minute = 2} the second new connection
        waits half a minute after the first; a cached connection is reused
        without waiting.
        """
        agent, network = self.gated(maxConnectionsPerMinute=2, maxMessagesPerConnection=2)
        deliver(agent, network, envelope("a@example.net"))
        deliver(agent, network, envelope("b@example.net"))
        self.assertEqual((len(network.attempts), network.clock.seconds()), (1, 0))
        d = agent.deliver(envelope("c@example.net"), TrackingBody(), None)
        network.clock.advance(29)
        network.settle()
        self.assertEqual(len(network.attempts), 1)
        network.clock.advance(1)
        network.run(d)
        self.assertEqual(
            summary(self.successResultOf(d)), [("c@example.net", 250, "2.0.0", "mx1.example.net")]
        )
        self.assertEqual(len(network.attempts), 2)

    def test_otherDestinationsUnaffected(self) -> None:
        """
        Mail whose domain and hosts match no section connects at once.
        """
        agent, network = makeAgent({"192.0.2.3": {}})
        table = ShapingTable(network.clock, [Shape("*.example.net", maxConnectionsPerMinute=1)])
        agent.shapeConnections(ConnectionGate(network.clock, table))
        agent.cacheTime = 0
        for to in ("a@example.com", "b@example.com"):
            deliver(agent, network, envelope(to))
        self.assertEqual((len(network.attempts), network.clock.seconds()), (2, 0))


class ServerLimitsTests(SynchronousTestCase):
    """
    The relay agent keeps within the limits a server announces (RFC 9422).
    """

    def test_serverLimitsSplit(self) -> None:
        """
        A host announcing C{LIMITS RCPTMAX=2} gets a 5-recipient message in
        three transactions over one connection, and each recipient the
        reply of its own transaction.
        """
        agent, network = makeAgent(
            {
                "192.0.2.1": {
                    "ehlo": ["250-fake", "250-PIPELINING", "250 LIMITS RCPTMAX=2"],
                    "rcpt": {"r3@example.net": "550 5.1.1 no such user"},
                }
            }
        )
        outcomes = deliver(agent, network, envelope(*[f"r{n}@example.net" for n in range(5)]))
        self.assertEqual(
            [m["rcpts"] for m in network.messages["192.0.2.1"]],
            [["r0@example.net", "r1@example.net"], ["r2@example.net"], ["r4@example.net"]],
        )
        self.assertEqual([o.reply.code for o in outcomes], [250, 250, 250, 550, 250])
        self.assertEqual(network.attempts, [("192.0.2.1", 25)])
