"""
The conformance kit for hosting tables: what every L{IHostingTable} must
do, as a test mixin run against each store (SQLite and PostgreSQL in
mailfw's own tests; a third-party store runs it too).

Usage::

    class MyTableTests(HostingTableContractTests, SynchronousTestCase):
        def makeTable(self) -> IHostingTable:
            return MyTable(...)          # empty, its answers already fired

Override L{resultOf} and L{failureOf} if the table's L{Deferred}s fire
later.  L{makeSecondTable} must give another handle on the same data (a
second process, in effect): the kit checks that a change made through one
is seen by the next lookup through the other, which is what lets
C{mailfw user add} take effect without a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.hosting._values import AliasEntry, HostingError, Mailbox, SenderRight
from mailfw.interfaces import IHostingTable

__all__ = ["HostingTableContractTests"]

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object


def _a(text: str) -> Address:
    return Address.parse(text, utf8=True)


class HostingTableContractTests(_Base):
    """
    Tests every L{IHostingTable} must pass.
    """

    def makeTable(self) -> IHostingTable:
        """
        A new, empty table.
        """
        raise NotImplementedError("subclasses of HostingTableContractTests define makeTable")

    def makeSecondTable(self) -> IHostingTable:
        """
        Another handle on the data of the last L{makeTable}.
        """
        raise NotImplementedError("subclasses of HostingTableContractTests define makeSecondTable")

    def resultOf(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def failureOf(self, d: Deferred[Any], *types: type[BaseException]) -> Failure:
        failure: Failure = self.failureResultOf(d, *types)
        return failure

    def setUp(self) -> None:
        super().setUp()
        self.table = self.makeTable()

    def hosted(self, *domains: str) -> None:
        for domain in domains:
            self.resultOf(self.table.addDomain(domain))

    def test_provides(self) -> None:
        """
        The table provides L{IHostingTable}.
        """
        self.assertTrue(verifyObject(IHostingTable, self.table))

    def test_domains(self) -> None:
        """
        Added domains are hosted, normalised (case, trailing dot), listed
        sorted; adding twice says so; deleting stops hosting.
        """
        self.assertFalse(self.resultOf(self.table.domain("example.org")))
        self.assertTrue(self.resultOf(self.table.addDomain("Example.ORG.")))
        self.assertFalse(self.resultOf(self.table.addDomain("example.org")))
        self.assertTrue(self.resultOf(self.table.addDomain("b.example")))
        self.assertTrue(self.resultOf(self.table.domain("example.org")))
        self.assertEqual(self.resultOf(self.table.listDomains()), ("b.example", "example.org"))
        self.assertTrue(self.resultOf(self.table.deleteDomain("example.org")))
        self.assertFalse(self.resultOf(self.table.deleteDomain("example.org")))
        self.assertFalse(self.resultOf(self.table.domain("example.org")))

    def test_badDomain(self) -> None:
        """
        A malformed domain or an address literal is refused with
        L{HostingError}.
        """
        for bad in ("exa mple.org", "[192.0.2.1]", ""):
            self.failureOf(self.table.addDomain(bad), HostingError)
        self.assertEqual(self.resultOf(self.table.listDomains()), ())

    def test_mailbox(self) -> None:
        """
        A mailbox is found whatever the case of its local part and domain,
        with its agent, path and (nullable) quota columns.
        """
        self.hosted("example.org")
        box = Mailbox("Alice@Example.org", "local", "alice/Maildir", 100, None)
        self.assertTrue(self.resultOf(self.table.addMailbox(box)))
        found = self.resultOf(self.table.mailbox(_a("ALICE@example.ORG")))
        self.assertEqual(found, Mailbox("alice@example.org", "local", "alice/Maildir", 100, None))
        self.assertIsNone(self.resultOf(self.table.mailbox(_a("bob@example.org"))))

    def test_mailboxReplaced(self) -> None:
        """
        Adding an existing mailbox replaces its row and says it was not new.
        """
        self.hosted("example.org")
        self.resultOf(self.table.addMailbox(Mailbox("alice@example.org")))
        self.assertFalse(
            self.resultOf(self.table.addMailbox(Mailbox("alice@example.org", "other", None, 5, 50)))
        )
        self.assertEqual(
            self.resultOf(self.table.listMailboxes(None)),
            (Mailbox("alice@example.org", "other", None, 5, 50),),
        )

    def test_mailboxNeedsHostedDomain(self) -> None:
        """
        A mailbox in a domain that is not hosted is refused, naming the
        command that fixes it.
        """
        failure = self.failureOf(self.table.addMailbox(Mailbox("alice@example.org")), HostingError)
        self.assertIn("mailfw domain add example.org", str(failure.value))
        self.assertEqual(self.resultOf(self.table.listMailboxes(None)), ())

    def test_badMailbox(self) -> None:
        """
        A malformed address or a negative quota is refused.
        """
        self.hosted("example.org")
        self.failureOf(self.table.addMailbox(Mailbox("no-at-sign")), HostingError)
        self.failureOf(self.table.addMailbox(Mailbox("a b@example.org")), HostingError)
        self.failureOf(self.table.addMailbox(Mailbox("a@example.org", messagesPerDay=-1)), HostingError)

    def test_deleteMailbox(self) -> None:
        """
        A deleted mailbox is gone; deleting it again says there was none.
        """
        self.hosted("example.org", "example.net")
        self.resultOf(self.table.addMailbox(Mailbox("alice@example.org")))
        self.resultOf(self.table.addMailbox(Mailbox("bob@example.net")))
        self.assertEqual(
            [m.address for m in self.resultOf(self.table.listMailboxes("example.org"))], ["alice@example.org"]
        )
        self.assertTrue(self.resultOf(self.table.deleteMailbox("Alice@example.org")))
        self.assertFalse(self.resultOf(self.table.deleteMailbox("alice@example.org")))
        self.assertIsNone(self.resultOf(self.table.mailbox(_a("alice@example.org"))))

    def test_domainWithMailboxesStays(self) -> None:
        """
        A domain that still has mailboxes or aliases cannot be deleted.
        """
        self.hosted("example.org")
        self.resultOf(self.table.addMailbox(Mailbox("alice@example.org")))
        failure = self.failureOf(self.table.deleteDomain("example.org"), HostingError)
        self.assertIn("1 mailbox", str(failure.value))
        self.resultOf(self.table.deleteMailbox("alice@example.org"))
        self.resultOf(self.table.addAlias("@example.org", ["x@example.net"]))
        self.failureOf(self.table.deleteDomain("example.org"), HostingError)
        self.assertTrue(self.resultOf(self.table.domain("example.org")))

    def test_aliases(self) -> None:
        """
        An alias has its targets, sorted, without duplicates; the
        catch-all answers only for addresses without an alias of their own.
        """
        self.hosted("example.org")
        self.assertEqual(
            self.resultOf(self.table.addAlias("Team@example.org", ["bob@example.net", "alice@example.org"])),
            2,
        )
        self.assertEqual(self.resultOf(self.table.addAlias("team@example.org", ["bob@example.net"])), 0)
        self.resultOf(self.table.addAlias("@Example.org", ["catch@example.net"]))
        self.assertEqual(
            self.resultOf(self.table.aliases(_a("TEAM@example.org"))),
            ("alice@example.org", "bob@example.net"),
        )
        self.assertEqual(self.resultOf(self.table.aliases(_a("anyone@example.org"))), ("catch@example.net",))
        self.assertEqual(self.resultOf(self.table.aliases(_a("team@example.net"))), ())
        self.assertEqual(
            self.resultOf(self.table.listAliases("example.org")),
            (
                AliasEntry("@example.org", "catch@example.net"),
                AliasEntry("team@example.org", "alice@example.org"),
                AliasEntry("team@example.org", "bob@example.net"),
            ),
        )

    def test_deleteAlias(self) -> None:
        """
        One target or the whole alias can be deleted; the counts say how
        many went.
        """
        self.hosted("example.org")
        self.resultOf(self.table.addAlias("team@example.org", ["a@example.net", "b@example.net"]))
        self.assertEqual(self.resultOf(self.table.deleteAlias("team@example.org", "a@Example.NET")), 1)
        self.assertEqual(self.resultOf(self.table.aliases(_a("team@example.org"))), ("b@example.net",))
        self.assertEqual(self.resultOf(self.table.deleteAlias("team@example.org", None)), 1)
        self.assertEqual(self.resultOf(self.table.aliases(_a("team@example.org"))), ())

    def test_badAlias(self) -> None:
        """
        An alias needs a hosted domain, a valid name and valid targets.
        """
        self.failureOf(self.table.addAlias("team@example.org", ["a@example.net"]), HostingError)
        self.hosted("example.org")
        self.failureOf(self.table.addAlias("team@example.org", []), HostingError)
        self.failureOf(self.table.addAlias("team@example.org", ["not an address"]), HostingError)
        self.failureOf(self.table.addAlias("@", ["a@example.net"]), HostingError)
        self.assertEqual(self.resultOf(self.table.listAliases(None)), ())

    def test_senderRights(self) -> None:
        """
        A mailbox may send as itself; others only with a right for the
        address or its domain; a right can be withdrawn.
        """
        self.hosted("example.org")
        self.resultOf(self.table.addMailbox(Mailbox("alice@example.org")))
        self.assertTrue(self.resultOf(self.table.maySendAs("alice@example.org", _a("Alice@example.org"))))
        self.assertFalse(self.resultOf(self.table.maySendAs("alice@example.org", _a("boss@example.org"))))
        self.assertFalse(self.resultOf(self.table.maySendAs("bob@example.org", _a("alice@example.org"))))
        self.assertTrue(self.resultOf(self.table.allowSender("alice@example.org", "Boss@example.org")))
        self.assertFalse(self.resultOf(self.table.allowSender("alice@example.org", "boss@example.org")))
        self.resultOf(self.table.allowSender("admin", "@example.org"))
        self.assertTrue(self.resultOf(self.table.maySendAs("alice@example.org", _a("boss@example.org"))))
        self.assertTrue(self.resultOf(self.table.maySendAs("admin", _a("anyone@example.org"))))
        self.assertFalse(self.resultOf(self.table.maySendAs("admin", _a("anyone@example.net"))))
        self.assertEqual(
            self.resultOf(self.table.sendersFor("alice@example.org")),
            ("alice@example.org", "boss@example.org"),
        )
        self.assertEqual(
            self.resultOf(self.table.listSenders(None)),
            (SenderRight("admin", "@example.org"), SenderRight("alice@example.org", "boss@example.org")),
        )
        self.assertTrue(self.resultOf(self.table.denySender("alice@example.org", "boss@example.org")))
        self.assertFalse(self.resultOf(self.table.denySender("alice@example.org", "boss@example.org")))
        self.assertFalse(self.resultOf(self.table.maySendAs("alice@example.org", _a("boss@example.org"))))

    def test_badSenderRight(self) -> None:
        """
        A right needs a user name without spaces and an address or C{@domain}.
        """
        self.failureOf(self.table.allowSender("a b", "x@example.org"), HostingError)
        self.failureOf(self.table.allowSender("", "x@example.org"), HostingError)
        self.failureOf(self.table.allowSender("alice", "nonsense"), HostingError)
        self.assertEqual(self.resultOf(self.table.listSenders(None)), ())

    def test_changesSeenByOtherHandles(self) -> None:
        """
        A change made through another handle on the same data (another
        process) is seen by the next lookup: nothing stale is cached.
        """
        self.hosted("example.org")
        self.assertIsNone(self.resultOf(self.table.mailbox(_a("new@example.org"))))
        other = self.makeSecondTable()
        try:
            self.resultOf(other.addMailbox(Mailbox("new@example.org")))
            self.resultOf(other.addDomain("example.net"))
        finally:
            self.resultOf(other.close())
        self.assertIsNotNone(self.resultOf(self.table.mailbox(_a("new@example.org"))))
        self.assertTrue(self.resultOf(self.table.domain("example.net")))
