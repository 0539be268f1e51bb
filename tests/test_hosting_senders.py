"""
Sender rights from the hosting table: L{MailRealm} with a table, through a
real L{Portal}, and L{useHostedSenders}, which the server uses to give the
realm the router's table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.auth._realm import MailRealm, useHostedSenders
from mailfw.hosting import Mailbox
from mailfw.hosting._sql import SQLHostingTable, runSynchronously, tableFromText
from mailfw.interfaces import IMailUser


def senderTable(case: SynchronousTestCase) -> SQLHostingTable:
    data = Path(case.mktemp())
    data.mkdir()
    table = tableFromText("sqlite:h.sqlite", data, runSynchronously, "[routing] virtual")
    case.addCleanup(table.close)
    table.addDomain("example.org")
    table.addMailbox(Mailbox("alice@example.org"))
    table.allowSender("alice@example.org", "sales@example.org")
    table.allowSender("relay", "@example.org")
    return table


class HostedSenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = senderTable(self)
        self.realm = MailRealm(hosting=self.table)
        checker = InMemoryUsernamePasswordDatabaseDontUse(
            **{"alice@example.org": b"pw", "relay": b"pw", "bob@example.org": b"pw"}
        )
        self.portal = Portal(self.realm, [checker])

    def login(self, user: str) -> Any:
        _, avatar, _ = self.successResultOf(
            self.portal.login(UsernamePassword(user.encode(), b"pw"), None, IMailUser)
        )
        return avatar

    def test_mailboxAndRights(self) -> None:
        """
        A mailbox user may send as itself and as the addresses granted to it,
        not as others.
        """
        alice = self.login("alice@example.org")
        self.assertTrue(alice.maySend(Address("Alice", "example.org")))
        self.assertTrue(alice.maySend(Address("sales", "example.org")))
        self.assertFalse(alice.maySend(Address("boss", "example.org")))

    def test_domainRight(self) -> None:
        """
        A C{@domain} right covers every address of that domain only.
        """
        relay = self.login("relay")
        self.assertTrue(relay.maySend(Address("anyone", "example.org")))
        self.assertFalse(relay.maySend(Address("anyone", "example.net")))

    def test_noRightsKeepsDefault(self) -> None:
        """
        A user the table knows nothing about keeps the default: its own
        name, when that is an address.
        """
        bob = self.login("bob@example.org")
        self.assertEqual(bob.senders, ("bob@example.org",))

    def test_rightsReadAtLogin(self) -> None:
        """
        A right granted after one login applies from the next.
        """
        before = self.login("alice@example.org")
        self.table.allowSender("alice@example.org", "boss@example.org")
        self.assertFalse(before.maySend(Address("boss", "example.org")))
        self.assertTrue(self.login("alice@example.org").maySend(Address("boss", "example.org")))

    def test_tableDownFailsLogin(self) -> None:
        """
        A table that cannot be read fails the login (the server answers
        454), rather than logging the user in with fewer or more rights.
        """

        class Broken:
            def sendersFor(self, user: str) -> Deferred[tuple[str, ...]]:
                return fail(OSError("database is locked"))

        self.realm.hosting = Broken()  # type: ignore[assignment]
        self.failureResultOf(self.portal.login(UsernamePassword(b"relay", b"pw"), None, IMailUser), OSError)

    def test_useHostedSenders(self) -> None:
        """
        L{useHostedSenders} gives a L{MailRealm} the router's table, and
        leaves the realm alone when the router has none.
        """

        class Router:
            hosting = self.table

        realm = MailRealm()
        self.assertTrue(useHostedSenders(Portal(realm), Router()))
        self.assertIs(realm.hosting, self.table)
        other = MailRealm()
        self.assertFalse(useHostedSenders(Portal(other), object()))
        self.assertIsNone(other.hosting)
