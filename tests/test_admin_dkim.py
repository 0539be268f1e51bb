"""
Tests for C{mailfw dkim} (L{mailfw.admin._dkim}): keygen, and the record
comparison of C{check} (its DNS lookup runs in tests/integration/test_dkim.py).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailfw.admin._dkim import _keyPath, checkRecord, zoneLines
from mailfw.admin._main import main
from mailfw.policy._dkimsign import generateKey, loadKey

_, RSA_KEY = generateKey("rsa", "example.org", "s1")
_, ED_KEY = generateKey("ed25519", "example.org", "s2")


class KeygenTests(SynchronousTestCase):
    def command(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        status = main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def test_keygen(self) -> None:
        """
        Each algorithm writes a private key only its owner can read and
        prints the record of its public half.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        for algorithm, kind in (("rsa", "k=rsa"), ("ed25519", "k=ed25519")):
            path = directory / f"{algorithm}.key"
            status, out, err = self.command(
                "dkim", "keygen", "Example.ORG", "sel", "--algorithm", algorithm, "-o", str(path)
            )
            self.assertEqual((status, err), (0, ""))
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)
            [line] = [line for line in out.splitlines() if " IN TXT " in line]
            self.assertTrue(line.startswith("sel._domainkey.Example.ORG. IN TXT ("), line)
            record = "".join(re.findall(r'"([^"]*)"', line))
            key = loadKey(path.read_bytes(), "example.org", "sel")
            self.assertEqual(record, key.record)
            self.assertIn(kind, record)

    def test_noOverwrite(self) -> None:
        """
        An existing file is never replaced (it may be the key in use).
        """
        path = Path(self.mktemp())
        path.write_bytes(b"the key in use")
        status, _, err = self.command("dkim", "keygen", "example.org", "sel", "-o", str(path))
        self.assertEqual(status, 1)
        self.assertIn("exists", err)
        self.assertEqual(path.read_bytes(), b"the key in use")


class CheckTests(SynchronousTestCase):
    def test_match(self) -> None:
        for key in (RSA_KEY, ED_KEY):
            self.assertEqual(
                checkRecord([key.record.encode()], key.public, key.algorithm),
                (True, "the record matches the key"),
            )

    def test_mismatches(self) -> None:
        """
        Every way a record can fail to publish the key is named.
        """
        public, algorithm = RSA_KEY.public, RSA_KEY.algorithm
        for records, reason in [
            ([], "no TXT record found"),
            ([b"v=DKIM1; p=A", b"v=DKIM1; p=B"], "2 TXT records found"),
            ([ED_KEY.record.encode()], "the record has k=ed25519, the key is rsa"),
            ([b"v=DKIM1; k=rsa; p="], "revoked"),
            ([b"v=DKIM2; k=rsa; p=" + public.encode()], "v= is not DKIM1"),
            ([b"no tags here"], "does not parse"),
            ([b"v=DKIM1; k=rsa; p=" + ED_KEY.public.encode()], "a different key"),
        ]:
            ok, why = checkRecord(records, public, algorithm)
            self.assertFalse(ok, records)
            self.assertIn(reason, why)

    def test_splitKey(self) -> None:
        """
        A key split over several strings, with white space, still matches.
        """
        record = RSA_KEY.record.encode()
        spaced = record[:60] + b" " + record[60:]
        self.assertTrue(checkRecord([spaced], RSA_KEY.public, RSA_KEY.algorithm)[0])

    def test_zoneLines(self) -> None:
        """
        The printed record splits its text into strings of at most 255.
        """
        line = zoneLines("s1._domainkey.example.org", RSA_KEY.record)
        pieces = re.findall(r'"([^"]*)"', line)
        self.assertGreater(len(pieces), 1)
        self.assertTrue(all(len(p) <= 255 for p in pieces))
        self.assertEqual("".join(pieces), RSA_KEY.record)

    def test_keyFromConfiguration(self) -> None:
        """
        Without C{--key}, the key is the one the configuration's dkim-sign
        policy uses for that domain and selector.
        """
        config = Path(self.mktemp())
        config.write_text(
            '[policy.sign]\nplugin = "dkim-sign"\n'
            '[policy.sign.domains."example.org"]\n'
            'keys = [{ selector = "s1", key = "k/one.key" }, { selector = "s2", key = "k/two.key" }]\n'
        )
        args = argparse.Namespace(
            key=None, config=str(config), data_dir="/srv/mail", domain="example.org", selector="s2"
        )
        self.assertEqual(_keyPath(args), Path("/srv/mail/k/two.key"))
        args.selector = "other"
        self.assertEqual(_keyPath(args), Path("example.org.other.key"))
