"""
C{mailfw domain|user|alias|sender}: the hosting table commands, run
in-process through L{mailfw.admin._main.main} on a SQLite table that the
configuration names.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailfw.address import Address
from mailfw.admin._main import main
from mailfw.auth import parsePasswordFile, verifyPassword
from mailfw.hosting import Mailbox
from mailfw.hosting._sql import runSynchronously, tableFromText

CONFIG = """\
[server]
data_dir = "data"

[routing]
virtual = "sqlite:hosting.sqlite"

[delivery.local]
plugin = "maildir"

[delivery.virtual-aliases]
plugin = "virtual-aliases"
virtual = "sqlite:hosting.sqlite"
"""


class HostingCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.config = self.dir / "mailfw.toml"
        self.config.write_text(CONFIG)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def run_(self, *args: str, stdin: str = "") -> int:
        self.patch(sys, "stdin", io.StringIO(stdin))
        self.out.seek(0)
        self.out.truncate()
        self.err.seek(0)
        self.err.truncate()
        return main([*args, "-c", str(self.config)])

    def table(self) -> object:
        table = tableFromText("sqlite:hosting.sqlite", self.dir / "data", runSynchronously, "t")
        self.addCleanup(table.close)
        return table

    def test_domains(self) -> None:
        """
        C{domain add}, C{list} and C{delete} edit the table the
        configuration names; deleting a missing domain fails.
        """
        self.assertEqual(self.run_("domain", "add", "Example.ORG"), 0)
        self.assertEqual(self.run_("domain", "add", "example.net"), 0)
        self.assertEqual(self.run_("domain", "list"), 0)
        self.assertEqual(self.out.getvalue(), "example.net\nexample.org\n")
        self.assertTrue((self.dir / "data" / "hosting.sqlite").exists())
        self.assertEqual(self.run_("domain", "delete", "example.net"), 0)
        self.assertEqual(self.run_("domain", "delete", "example.net"), 1)
        self.assertIn("mailfw: domain example.net is not hosted", self.err.getvalue())

    def test_users(self) -> None:
        """
        C{user add} adds a mailbox with its agent, path and quotas, C{list}
        shows them, C{delete} removes it.
        """
        self.run_("domain", "add", "example.org")
        self.assertEqual(
            self.run_(
                "user",
                "add",
                "Alice@example.org",
                "--agent",
                "local",
                "--path",
                "alice",
                "--messages-per-hour",
                "50",
            ),
            0,
        )
        self.assertIn("added mailbox Alice@example.org", self.out.getvalue())
        self.assertEqual(self.run_("user", "list", "example.org"), 0)
        self.assertEqual(
            self.out.getvalue(), "alice@example.org\tagent=local\tpath=alice\tper-hour=50\tper-day=-\n"
        )
        table = self.table()
        self.assertEqual(
            self.successResultOf(table.mailbox(Address("alice", "example.org"))),  # type: ignore[attr-defined]
            Mailbox("alice@example.org", "local", "alice", 50, None),
        )
        self.assertEqual(self.run_("user", "delete", "alice@example.org"), 0)
        self.assertEqual(self.run_("user", "delete", "alice@example.org"), 1)
        self.assertIn("no mailbox alice@example.org", self.err.getvalue())

    def test_unknownAgent(self) -> None:
        """
        C{--agent} must name a delivery instance of the configuration.
        """
        self.run_("domain", "add", "example.org")
        self.assertEqual(self.run_("user", "add", "bob@example.org", "--agent", "nosuch"), 1)
        self.assertIn("no [delivery.nosuch] (configured: local, virtual-aliases)", self.err.getvalue())

    def test_userInUnhostedDomain(self) -> None:
        """
        A mailbox in a domain that is not hosted is refused, saying how to
        host it.
        """
        self.assertEqual(self.run_("user", "add", "bob@example.org"), 1)
        self.assertIn("mailfw domain add example.org", self.err.getvalue())

    def test_userWithPassword(self) -> None:
        """
        C{user add --password} also writes the AUTH password file through
        C{mailfw passwd}, and C{user delete --password} removes the entry.
        """
        self.config.write_text(CONFIG + '\n[auth]\npasswords = "users.passwd"\n')
        self.run_("domain", "add", "example.org")
        self.assertEqual(self.run_("user", "add", "Carol@example.org", "--password", stdin="pw 1\n"), 0)
        entries = parsePasswordFile((self.dir / "data" / "users.passwd").read_text())[0]
        self.assertTrue(verifyPassword(entries["carol@example.org"].hash, b"pw 1"))
        self.assertEqual(self.run_("user", "delete", "carol@example.org", "--password"), 0)
        entries = parsePasswordFile((self.dir / "data" / "users.passwd").read_text())[0]
        self.assertEqual(dict(entries), {})

    def test_passwordNeedsPasswordFile(self) -> None:
        """
        C{--password} without C{[auth] passwords} says what is missing.
        """
        self.run_("domain", "add", "example.org")
        self.assertEqual(self.run_("user", "add", "dave@example.org", "--password", stdin="pw\n"), 1)
        self.assertIn("--password needs an [auth] passwords file", self.err.getvalue())

    def test_aliases(self) -> None:
        """
        C{alias add} takes several targets and C{@domain} for the
        catch-all; C{delete} removes one target or all.
        """
        self.run_("domain", "add", "example.org")
        self.assertEqual(self.run_("alias", "add", "team@example.org", "a@example.net", "b@example.net"), 0)
        self.assertEqual(self.run_("alias", "add", "@example.org", "catch@example.net"), 0)
        self.assertEqual(self.run_("alias", "list"), 0)
        self.assertEqual(
            self.out.getvalue(),
            "@example.org\tcatch@example.net\nteam@example.org\ta@example.net\nteam@example.org\tb@example.net\n",
        )
        self.assertEqual(self.run_("alias", "delete", "team@example.org", "a@example.net"), 0)
        self.assertEqual(self.run_("alias", "delete", "team@example.org"), 0)
        self.assertEqual(self.run_("alias", "delete", "team@example.org"), 1)
        self.assertIn("no alias team@example.org", self.err.getvalue())
        self.assertEqual(self.run_("alias", "add", "x@example.org", "not an address"), 1)
        self.assertIn("bad alias target 'not an address'", self.err.getvalue())

    def test_senders(self) -> None:
        """
        C{sender allow}, C{list} and C{deny}.
        """
        self.assertEqual(self.run_("sender", "allow", "alice@example.org", "@example.org"), 0)
        self.assertEqual(self.run_("sender", "list", "alice@example.org"), 0)
        self.assertEqual(self.out.getvalue(), "alice@example.org\t@example.org\n")
        self.assertEqual(self.run_("sender", "deny", "alice@example.org", "@example.org"), 0)
        self.assertEqual(self.run_("sender", "deny", "alice@example.org", "@example.org"), 1)
        self.assertIn("had no right", self.err.getvalue())

    def test_noTable(self) -> None:
        """
        A configuration without C{[routing] virtual} is named in the error.
        """
        self.config.write_text("[server]\n")
        self.assertEqual(self.run_("domain", "list"), 1)
        self.assertIn("has no [routing] virtual table", self.err.getvalue())

    def test_badConfig(self) -> None:
        """
        A malformed table or configuration is one line, not a traceback.
        """
        self.config.write_text('[routing]\nvirtual = "mysql:x"\n')
        self.assertEqual(self.run_("domain", "list"), 1)
        self.assertIn("mailfw: [routing] virtual: expected 'sqlite:PATH'", self.err.getvalue())
        self.config.write_text("[routing\n")
        self.assertEqual(self.run_("domain", "list"), 1)
        self.assertTrue(self.err.getvalue().startswith("mailfw: "))
