"""
C{mailfw passwd}: the password file tool.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailfw.admin._main import main
from mailfw.auth import parsePasswordFile, verifyPassword
from mailfw.auth._scram import ScramKeys


class TerminalInput(io.StringIO):
    def isatty(self) -> bool:
        return True


class PasswdToolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.file = self.dir / "passwd"
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)

    def passwd(self, *args: str, stdin: str = "") -> int:
        self.patch(sys, "stdin", io.StringIO(stdin))
        return main(["passwd", *args])

    def entries(self) -> dict[str, object]:
        return dict(parsePasswordFile(self.file.read_text())[0])

    def test_addFromStdin(self) -> None:
        """
        C{add} reads the password from standard input when it is not a
        terminal, writes a scrypt hash the checker accepts, and creates the
        file with mode 0600.
        """
        self.assertEqual(
            self.passwd("add", "alice@example.org", "--file", str(self.file), stdin="s3cret pass\n"), 0
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.file).st_mode), 0o600)
        [(name, entry)] = parsePasswordFile(self.file.read_text())[0].items()
        self.assertEqual(name, "alice@example.org")
        self.assertTrue(entry.hash.startswith("$scrypt$ln=15,r=8,p=1$"))
        self.assertTrue(verifyPassword(entry.hash, b"s3cret pass"))
        self.assertNotIn("s3cret", self.file.read_text())
        assert entry.scram is not None
        self.assertEqual(entry.scram.iterations, 4096)
        self.assertEqual(entry.scram, ScramKeys.fromPassword("s3cret pass", entry.scram.salt, 4096))

    def test_scramIterations(self) -> None:
        """
        C{--scram-iterations} sets the SCRAM count within 4096 to 10**7; a
        value outside that is refused before anything is written.
        """
        self.assertEqual(
            self.passwd("add", "ann", "-f", str(self.file), "--scram-iterations", "5000", stdin="pw\n"), 0
        )
        entry = parsePasswordFile(self.file.read_text())[0]["ann"]
        assert entry.scram is not None
        self.assertEqual(entry.scram, ScramKeys.fromPassword("pw", entry.scram.salt, 5000))
        for bad in ("100", "lots"):
            with self.assertRaises(SystemExit):
                self.passwd("add", "ben", "-f", str(self.file), "--scram-iterations", bad, stdin="pw\n")
        self.assertNotIn("ben", self.entries())

    def test_passwordSASLprepRefuses(self) -> None:
        """
        A password that SASLprep refuses (no SCRAM client could send it)
        gets a scrypt hash only, with a warning: that user has PLAIN and
        LOGIN but not SCRAM.
        """
        self.assertEqual(self.passwd("add", "cy", "-f", str(self.file), stdin="pass\x07word\n"), 0)
        entry = parsePasswordFile(self.file.read_text())[0]["cy"]
        self.assertIsNone(entry.scram)
        self.assertTrue(verifyPassword(entry.hash, b"pass\x07word"))
        self.assertIn("no SCRAM keys for cy", self.err.getvalue())

    def test_sendersAndETRN(self) -> None:
        """
        C{--sender} and C{--etrn} set the user's rights; a later C{add}
        without them keeps them and changes only the password.
        """
        self.passwd(
            "add",
            "bob",
            "-f",
            str(self.file),
            "--sender",
            "bob@Example.org",
            "--sender",
            "@example.net",
            "--etrn",
            "example.org",
            stdin="one\n",
        )
        self.passwd("add", "bob", "-f", str(self.file), stdin="two\n")
        entry = parsePasswordFile(self.file.read_text())[0]["bob"]
        self.assertEqual((entry.senders, entry.etrn), (("bob@example.org", "@example.net"), ("example.org",)))
        self.assertTrue(verifyPassword(entry.hash, b"two"))

    def test_checkListDelete(self) -> None:
        """
        C{check} exits 0 for the right password and 1 for a wrong one;
        C{list} shows users; C{delete} removes one (1 if unknown).
        """
        self.passwd("add", "carol", "-f", str(self.file), stdin="pw\n")
        self.assertEqual(self.passwd("check", "carol", "-f", str(self.file), stdin="pw\n"), 0)
        self.assertEqual(self.passwd("check", "carol", "-f", str(self.file), stdin="nope\n"), 1)
        self.assertEqual(self.passwd("check", "dave", "-f", str(self.file), stdin="pw\n"), 1)
        self.out.truncate(0)
        self.passwd("list", "-f", str(self.file))
        self.assertIn("carol\tsenders=(user name)\tetrn=-\tscram=yes", self.out.getvalue())
        self.assertEqual(self.passwd("delete", "carol", "-f", str(self.file)), 0)
        self.assertEqual(self.entries(), {})
        self.assertEqual(self.passwd("delete", "carol", "-f", str(self.file)), 1)

    def test_refusals(self) -> None:
        """
        Empty passwords, bad user names and bad sender patterns are refused
        with exit status 1 and nothing written.
        """
        self.assertEqual(self.passwd("add", "erin", "-f", str(self.file), stdin="\n"), 1)
        self.assertEqual(self.passwd("add", "er:in", "-f", str(self.file), stdin="pw\n"), 1)
        self.assertEqual(self.passwd("add", "er in", "-f", str(self.file), stdin="pw\n"), 1)
        self.assertEqual(
            self.passwd("add", "erin", "-f", str(self.file), "--sender", "nope", stdin="pw\n"), 1
        )
        self.assertFalse(self.file.exists())
        self.assertIn("empty password", self.err.getvalue())

    def test_terminalPrompt(self) -> None:
        """
        On a terminal the password is asked twice and must match.
        """
        answers = iter(["pw1", "pw2", "pw", "pw"])
        self.patch(sys.modules["getpass"], "getpass", lambda prompt="": next(answers))
        self.patch(sys, "stdin", TerminalInput())
        self.assertEqual(main(["passwd", "add", "fred", "-f", str(self.file)]), 1)
        self.assertIn("do not match", self.err.getvalue())
        self.assertEqual(main(["passwd", "add", "fred", "-f", str(self.file)]), 0)
        self.assertIn("fred", self.entries())

    def test_fileFromConfig(self) -> None:
        """
        Without C{--file} the tool uses C{[auth] passwords} in the data
        directory of the configuration.
        """
        config = self.dir / "mailfw.toml"
        config.write_text('[server]\ndata_dir = "data"\n[auth]\npasswords = "users.passwd"\n')
        self.assertEqual(self.passwd("add", "gina", "-c", str(config), stdin="pw\n"), 0)
        self.assertTrue((self.dir / "data" / "users.passwd").exists())
        config.write_text("[server]\n")
        self.assertEqual(self.passwd("list", "-c", str(config)), 1)
        self.assertIn("no [auth] passwords", self.err.getvalue())
