"""
Tests for L{mailfw.config}: reading the TOML file and strict sections.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ConfigError, Section, loadConfig


class SectionTests(SynchronousTestCase):
    def test_typedGetters(self) -> None:
        """
        Each getter returns the value of its type, or the default.
        """
        s = Section("[x]", {"a": "t", "b": 3, "c": 1.5, "d": True, "e": ["1"], "f": {"k": "v"}})
        self.assertEqual(
            (s.text("a"), s.integer("b"), s.number("c"), s.flag("d"), s.strings("e"), s.table("f")),
            ("t", 3, 1.5, True, ["1"], {"k": "v"}),
        )
        self.assertEqual(s.text("missing", "dflt"), "dflt")
        s.finish()

    def test_wrongTypeNamesKey(self) -> None:
        """
        A value of the wrong type is an error naming the section and key;
        a boolean is not accepted as an integer.
        """
        e = self.assertRaises(ConfigError, Section("[smtp]", {"n": True}).integer, "n")
        self.assertIn("[smtp] n", str(e))
        e = self.assertRaises(ConfigError, Section("[smtp]", {"n": "x"}).integer, "n")
        self.assertIn("expected an integer", str(e))

    def test_required(self) -> None:
        """
        A getter without default requires the key.
        """
        e = self.assertRaises(ConfigError, Section("[delivery.a]", {}).text, "path")
        self.assertEqual(str(e), "[delivery.a] needs 'path'")

    def test_minimum(self) -> None:
        """
        Numbers below their minimum are refused.
        """
        self.assertRaises(ConfigError, Section("[s]", {"n": 0}).integer, "n", minimum=1)

    def test_unknownKeyRefused(self) -> None:
        """
        A key no getter asked for (a typo) is refused by C{finish}.
        """
        s = Section("[queue]", {"plugin": "sqlite", "pth": "q"})
        s.text("path", "x")
        e = self.assertRaises(ConfigError, s.finish)
        self.assertIn("'pth'", str(e))

    def test_choice(self) -> None:
        """
        C{choice} accepts only the listed values.
        """
        self.assertRaises(ConfigError, Section("[s]", {"t": "x"}).choice, "t", ["a", "b"])


class LoadConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def test_embeddedDefault(self) -> None:
        """
        With no file, loopback listeners, a SQLite queue and Maildir
        delivery for localhost under ./mailfw-data.
        """
        c = loadConfig(None, hostname="mx.test")
        self.assertEqual(c.listen["smtp"], ["tcp:2525:interface=127.0.0.1"])
        self.assertEqual(c.listen["submission"], ["tcp:2587:interface=127.0.0.1"])
        self.assertEqual(c.queue["plugin"], "sqlite")
        self.assertEqual(c.delivery["local"]["plugin"], "maildir")
        self.assertEqual(c.dataDir.name, "mailfw-data")
        self.assertEqual(c.hostname, "mx.test")

    def test_file(self) -> None:
        """
        A file's sections are read; relative paths are relative to the file.
        """
        path = self.write(
            """
            [server]
            hostname = "mx.example.org"
            data_dir = "data"
            [listen]
            smtp = ["tcp:25"]
            [tls]
            certificate = "c.pem"
            key = "k.pem"
            [dns]
            nameservers = ["127.0.0.1:5353", "::1"]
            [delivery.box]
            plugin = "maildir"
            """.replace("            ", "")
        )
        c = loadConfig(path)
        self.assertEqual(c.hostname, "mx.example.org")
        self.assertEqual(c.dataDir, Path(path).parent / "data")
        self.assertEqual(c.listen, {"smtp": ["tcp:25"], "submission": [], "submissions": [], "odmr": []})
        self.assertEqual(c.certificate, Path(path).parent / "data" / "c.pem")
        self.assertEqual(c.nameservers, (("127.0.0.1", 5353), ("::1", 53)))
        self.assertEqual(c.delivery, {"box": {"plugin": "maildir"}})
        self.assertEqual(c.queue, {"plugin": "sqlite"})

    def test_commandLineListenersWin(self) -> None:
        """
        Listeners given on the command line replace that kind's entries.
        """
        path = self.write('[listen]\nsmtp = ["tcp:25"]\nsubmission = ["tcp:587"]\n')
        c = loadConfig(path, listen={"smtp": ["tcp:2500"], "submission": []})
        self.assertEqual(c.listen["smtp"], ["tcp:2500"])
        self.assertEqual(c.listen["submission"], ["tcp:587"])

    def test_syntaxError(self) -> None:
        """
        A TOML syntax error names the file and line.
        """
        path = self.write("[server\n")
        e = self.assertRaises(ConfigError, loadConfig, path)
        self.assertIn(path, str(e))
        self.assertIn("line 1", str(e))

    def test_missingFile(self) -> None:
        """
        A missing file is one clear line.
        """
        e = self.assertRaises(ConfigError, loadConfig, "/nonexistent/mailfw.toml")
        self.assertIn("cannot read configuration /nonexistent/mailfw.toml", str(e))

    def test_unknownSection(self) -> None:
        """
        An unknown section (a typo) is refused.
        """
        e = self.assertRaises(ConfigError, loadConfig, self.write("[lisen]\nsmtp=[]\n"))
        self.assertEqual(str(e), "unknown section [lisen]")

    def test_unknownServerKey(self) -> None:
        """
        An unknown key in a core section is refused.
        """
        e = self.assertRaises(ConfigError, loadConfig, self.write('[server]\nhostnme = "x"\n'))
        self.assertIn("[server]: unknown option 'hostnme'", str(e))

    def test_tlsNeedsBoth(self) -> None:
        """
        A certificate without a key (or the reverse) is refused.
        """
        e = self.assertRaises(ConfigError, loadConfig, self.write('[tls]\ncertificate = "c"\n'))
        self.assertIn("[tls] needs both", str(e))

    def test_badNameserverPort(self) -> None:
        """
        A nameserver with a bad port names the entry.
        """
        for entry in ("127.0.0.1:x", "127.0.0.1:0", "127.0.0.1:65536", "[::1]:", "[::1]:-5"):
            e = self.assertRaises(ConfigError, loadConfig, self.write(f'[dns]\nnameservers = ["{entry}"]\n'))
            self.assertIn(repr(entry), str(e))

    def test_nameserverForms(self) -> None:
        """
        Nameservers are IPv4 or IPv6 addresses, IPv6 in brackets when it
        has a port; a bare IPv6 address has no port.
        """
        for entry, expected in [
            ("127.0.0.1", ("127.0.0.1", 53)),
            ("127.0.0.1:5353", ("127.0.0.1", 5353)),
            ("::1", ("::1", 53)),
            ("[::1]", ("::1", 53)),
            ("[::1]:5353", ("::1", 5353)),
            ("fd00::1:2", ("fd00::1:2", 53)),
            ("[fd00::1:2]:53", ("fd00::1:2", 53)),
        ]:
            c = loadConfig(self.write(f'[dns]\nnameservers = ["{entry}"]\n'))
            self.assertEqual(c.nameservers, (expected,), entry)

    def test_nameserverNotAnAddress(self) -> None:
        """
        Host names, malformed brackets and IPv4 in brackets are refused,
        naming the entry.
        """
        for entry in ("dns.example", "dns.example:53", "[::1", "[::1]x", "[127.0.0.1]", "1.2.3"):
            e = self.assertRaises(ConfigError, loadConfig, self.write(f'[dns]\nnameservers = ["{entry}"]\n'))
            self.assertIn(repr(entry), str(e))
            self.assertIn("[dns] nameservers", str(e))

    def test_deliveryMustBeTable(self) -> None:
        """
        A delivery instance that is not a table is refused by name.
        """
        e = self.assertRaises(ConfigError, loadConfig, self.write('[delivery]\nlocal = "x"\n'))
        self.assertEqual(str(e), "[delivery.local] must be a table")
