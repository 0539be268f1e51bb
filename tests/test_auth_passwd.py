"""
The password file, its checker and the realm (L{mailfw.auth}).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.auth import (
    IMailUser,
    MailRealm,
    MailUser,
    PasswordEntry,
    PasswordFileChecker,
    PasswordFileError,
    hashPassword,
    parsePasswordFile,
    updatePasswordFile,
    verifyPassword,
)
from mailfw.auth._passwd import checkHash, formatEntry, parseLine
from mailfw.auth._scram import ScramKeys

# Cheap parameters keep the tests fast; the format is the same.
CHEAP: dict[str, Any] = {"logN": 4, "r": 1, "p": 1}


def synchronous(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


class HashTests(SynchronousTestCase):
    def test_format(self) -> None:
        """
        Hashes are PHC strings for scrypt with the default cost (N=2**15,
        r=8, p=1), a 16-octet salt and a 32-octet key.
        """
        encoded = hashPassword("pw")
        self.assertRegex(encoded, r"^\$scrypt\$ln=15,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$")
        self.assertTrue(verifyPassword(encoded, b"pw"))

    def test_saltedAndVerified(self) -> None:
        """
        The same password hashes differently each time; the right password
        verifies, a wrong one does not.
        """
        one, two = hashPassword("pässword", **CHEAP), hashPassword("pässword", **CHEAP)
        self.assertNotEqual(one, two)
        self.assertTrue(verifyPassword(one, "pässword".encode()))
        self.assertFalse(verifyPassword(one, b"password"))
        self.assertFalse(verifyPassword(one, b""))

    def test_malformed(self) -> None:
        """
        Anything but a sane scrypt hash is refused with L{PasswordFileError}.
        """
        good = hashPassword("x", **CHEAP)
        for bad in [
            "plaintext",
            "$2b$12$abcdefghijklmnopqrstuv",
            good.replace("ln=4", "ln=40"),
            good.replace("r=1", "r=0"),
            good.replace("ln=4,r=1", "ln=24,r=64"),
            good[:-30],
            good + "!",
        ]:
            self.assertRaises(PasswordFileError, checkHash, bad)
            self.assertRaises(PasswordFileError, verifyPassword, bad, b"x")


class FileFormatTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        A line holds the user, the hash, sender patterns and ETRN domains,
        normalised; it formats back to the same line.
        """
        encoded = hashPassword("x", **CHEAP)
        entry = parseLine(f"alice:{encoded}:Alice@EXAMPLE.org, @Example.NET,*:Example.org,.sub.example")
        assert entry is not None
        self.assertEqual(entry.senders, ("Alice@example.org", "@example.net", "*"))
        self.assertEqual(entry.etrn, ("example.org", ".sub.example"))
        self.assertEqual(parseLine(formatEntry(entry)), entry)
        self.assertEqual(formatEntry(PasswordEntry("bob", encoded)), f"bob:{encoded}")
        self.assertEqual(
            parseLine(f"bob:{encoded}::example.org"), PasswordEntry("bob", encoded, (), ("example.org",))
        )

    def test_scramKeys(self) -> None:
        """
        SCRAM keys are an optional fifth field: they read back, empty
        sender and ETRN fields are kept in front of them, and a line
        without them (the old format) has none.
        """
        encoded = hashPassword("x", **CHEAP)
        keys = ScramKeys.fromPassword("x")
        entry = PasswordEntry("alice", encoded, scram=keys)
        self.assertEqual(formatEntry(entry), f"alice:{encoded}:::{keys.format()}")
        self.assertEqual(parseLine(formatEntry(entry)), entry)
        full = PasswordEntry("bob", encoded, ("@example.org",), ("example.org",), keys)
        self.assertEqual(formatEntry(full), f"bob:{encoded}:@example.org:example.org:{keys.format()}")
        self.assertEqual(parseLine(formatEntry(full)), full)
        old = parseLine(f"carol:{encoded}:@example.org:example.org")
        assert old is not None
        self.assertIsNone(old.scram)
        self.assertEqual(formatEntry(old), f"carol:{encoded}:@example.org:example.org")

    def test_badScramKeys(self) -> None:
        """
        A line with malformed SCRAM keys is reported and skipped like any
        other bad line.
        """
        encoded = hashPassword("x", **CHEAP)
        keys = ScramKeys.fromPassword("x").format()
        entries, problems = parsePasswordFile(
            f"a:{encoded}:::{keys.replace('i=4096', 'i=1')}\nb:{encoded}:::{keys[:-3]}\nc:{encoded}:::{keys}\n"
        )
        self.assertEqual(sorted(entries), ["c"])
        self.assertEqual(
            problems,
            [
                "line 1: SCRAM iteration count must be 4096 to 10000000",
                "line 2: SCRAM salt or key of the wrong length",
            ],
        )

    def test_badLinesSkipped(self) -> None:
        """
        Comments and blank lines are ignored; each bad line is reported and
        skipped without hiding the good ones; a duplicate user keeps its
        first line.
        """
        encoded = hashPassword("x", **CHEAP)
        text = "\n".join(
            [
                "# users",
                "",
                f"alice:{encoded}",
                "bob:plaintext",
                f"carol:{encoded}:not an address",
                f"dave:{encoded}:a@b.example:c:d",
                f"bad user:{encoded}",
                f"alice:{hashPassword('other', **CHEAP)}",
                f"eve:{encoded}:::",
            ]
        )
        entries, problems = parsePasswordFile(text)
        self.assertEqual(sorted(entries), ["alice"])
        self.assertEqual(entries["alice"].hash, encoded)
        self.assertEqual(
            [p.split(":")[0] for p in problems], ["line 4", "line 5", "line 6", "line 7", "line 8", "line 9"]
        )


class UpdateTests(SynchronousTestCase):
    def test_createdPrivate(self) -> None:
        """
        A new file is created with mode 0600.
        """
        path = Path(self.mktemp()) / "passwd"
        self.assertFalse(
            updatePasswordFile(path, "alice", PasswordEntry("alice", hashPassword("x", **CHEAP)))
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(list(path.parent.iterdir()), [path])

    def test_replaceKeepsOtherLines(self) -> None:
        """
        Updating a user replaces only its line; comments and other users
        stay, the file keeps its mode; deleting removes the line.
        """
        path = Path(self.mktemp()) / "passwd"
        path.parent.mkdir()
        old, new = hashPassword("old", **CHEAP), hashPassword("new", **CHEAP)
        path.write_text(f"# comment\nalice:{old}\nbob:{old}\n")
        os.chmod(path, 0o640)
        self.assertTrue(updatePasswordFile(path, "alice", PasswordEntry("alice", new, ("@example.org",))))
        self.assertEqual(path.read_text(), f"# comment\nalice:{new}:@example.org\nbob:{old}\n")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertTrue(updatePasswordFile(path, "bob", None))
        self.assertFalse(updatePasswordFile(path, "nobody", None))
        self.assertEqual(path.read_text(), f"# comment\nalice:{new}:@example.org\n")


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(
            f"alice@example.org:{hashPassword('secret', **CHEAP)}\n"
            f"bob:{hashPassword('hunter2', **CHEAP)}:@example.org:example.org\n"
        )
        self.checker = PasswordFileChecker(self.path, synchronous)

    def check(self, user: bytes, password: bytes) -> Deferred[Any]:
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_interface(self) -> None:
        """
        L{PasswordFileChecker} provides L{ICredentialsChecker}.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    def test_rightPassword(self) -> None:
        """
        The right password gives the user name as avatar ID.
        """
        self.assertEqual(
            self.successResultOf(self.check(b"alice@example.org", b"secret")), "alice@example.org"
        )

    def test_refusals(self) -> None:
        """
        A wrong password, an unknown user, and a user name that is not UTF-8
        are refused with L{UnauthorizedLogin}.
        """
        for user, password in [(b"bob", b"secret"), (b"mallory", b"secret"), (b"\xff", b"x"), (b"bob", b"")]:
            self.failureResultOf(self.check(user, password), UnauthorizedLogin)

    def test_reloads(self) -> None:
        """
        A changed file is read again at the next check.
        """
        self.successResultOf(self.check(b"bob", b"hunter2"))
        self.path.write_text(f"bob:{hashPassword('changed', **CHEAP)}\n")
        os.utime(self.path, ns=(1, 1))
        self.failureResultOf(self.check(b"bob", b"hunter2"), UnauthorizedLogin)
        self.successResultOf(self.check(b"bob", b"changed"))

    def test_missingFile(self) -> None:
        """
        A file that cannot be read fails with the L{OSError}, not as a
        refusal (the server answers 454).
        """
        self.path.unlink()
        self.failureResultOf(self.check(b"bob", b"hunter2"), OSError)

    def test_rightsForRealm(self) -> None:
        """
        Through a portal with L{MailRealm}, the avatar carries the file's
        senders and ETRN domains.
        """
        portal = Portal(MailRealm(self.checker.rights), [self.checker])
        _, avatar, logout = self.successResultOf(
            portal.login(UsernamePassword(b"bob", b"hunter2"), None, IMailUser)
        )
        self.assertEqual(
            (IMailUser(avatar).identity, IMailUser(avatar).senders, IMailUser(avatar).etrnDomains),
            ("bob", ("@example.org",), ("example.org",)),
        )
        logout()


class RealmTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        L{MailRealm} provides L{IRealm}; L{MailUser} provides L{IMailUser}.
        """
        self.assertTrue(verifyObject(IRealm, MailRealm()))
        self.assertTrue(verifyObject(IMailUser, MailUser("alice")))

    def test_defaultSenders(self) -> None:
        """
        Without configured senders, a user called by an address may use that
        address; another user none.
        """
        realm = MailRealm()
        self.assertEqual(realm.avatarFor("Alice@Example.org").senders, ("Alice@example.org",))
        self.assertEqual(realm.avatarFor("bob").senders, ())
        self.assertFalse(realm.avatarFor("bob").maySend(Address("bob", "example.org")))

    def test_configuredRights(self) -> None:
        """
        Configured senders and ETRN domains add to the checker's.
        """
        realm = MailRealm(
            lambda user: (("a@example.org",), ("example.org",)) if user == "a" else None,
            senders={"a": ("@example.net",)},
            etrn={"a": (".example.com",)},
        )
        avatar = realm.avatarFor("a")
        self.assertEqual(avatar.senders, ("a@example.org", "@example.net"))
        self.assertEqual(avatar.etrnDomains, ("example.org", ".example.com"))

    def test_onlyMailUsers(self) -> None:
        """
        The realm makes only L{IMailUser} avatars, from str or bytes IDs.
        """
        realm = MailRealm()
        self.assertRaises(NotImplementedError, realm.requestAvatar, "a", None, IRealm)
        iface, avatar, _ = realm.requestAvatar(b"z\xc3\xab", None, IMailUser)
        self.assertEqual((iface, IMailUser(avatar).identity), (IMailUser, "zë"))
        self.assertRaises(ValueError, MailRealm, senderCheck="some")

    def test_maySend(self) -> None:
        """
        The sender checks: exact addresses (any case), C{@domain}, C{*},
        the domain mode, the any mode and the null sender.
        """
        user = MailUser("u", ("Alice@example.org", "@example.net"))
        self.assertTrue(user.maySend(Address("alice", "example.org")))
        self.assertTrue(user.maySend(Address("x", "example.net")))
        self.assertFalse(user.maySend(Address("bob", "example.org")))
        self.assertFalse(user.maySend(Address("x", "sub.example.net")))
        self.assertTrue(user.maySend(None))
        self.assertFalse(MailUser("u", (), allowNullSender=False).maySend(None))
        self.assertTrue(MailUser("u", ("*",)).maySend(Address("x", "y.example")))
        domain = MailUser("u", ("alice@example.org",), senderCheck="domain")
        self.assertTrue(domain.maySend(Address("bob", "example.org")))
        self.assertFalse(domain.maySend(Address("bob", "example.com")))
        self.assertTrue(MailUser("u", (), senderCheck="any").maySend(Address("x", "y.example")))

    def test_mayFlush(self) -> None:
        """
        ETRN rights: exact domains (normalised), C{.parent} for subdomains,
        C{*} for all.
        """
        user = MailUser("u", etrnDomains=("example.org", ".example.net"))
        self.assertTrue(user.mayFlush("Example.ORG."))
        self.assertTrue(user.mayFlush("mx.example.net"))
        self.assertFalse(user.mayFlush("example.net"))
        self.assertFalse(user.mayFlush("other.example"))
        self.assertFalse(user.mayFlush("bad domain"))
        self.assertTrue(MailUser("u", etrnDomains=("*",)).mayFlush("anything.example"))
