"""
Tests for C{[server] workers = "auto"}: what it resolves to
(L{mailfw._workers.autoWorkers}), that it is the default with a
configuration file and not without one (L{mailfw.config.loadConfig}), and
how C{twistd mailfw --workers} takes it (L{mailfw.tap.Options}).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mailfw._workers import autoWorkers
from mailfw.config import AUTO_WORKERS, ConfigError, loadConfig
from mailfw.tap import Options

TCP = {"smtp": ["tcp:25"], "submission": ["tcp6:587"], "submissions": ["ssl:465"], "odmr": []}


class AutoWorkersTests(SynchronousTestCase):
    def test_perCore(self) -> None:
        """
        Shareable listeners and a shared queue: one process per core.
        """
        self.assertEqual(autoWorkers(TCP, "sqlite", 4), 4)
        self.assertEqual(autoWorkers(TCP, "sqlite", 2), 2)

    def test_unshareableListener(self) -> None:
        """
        A listener whose socket workers cannot adopt (UNIX, systemd,
        haproxy) keeps one process, instead of the usage error an explicit
        number would give.
        """
        for description in ("unix:/run/mailfw.sock", "systemd:domain=INET:index=0", "haproxy:tcp:25"):
            listen = {**TCP, "odmr": [description]}
            self.assertEqual(autoWorkers(listen, "sqlite", 8), 1, description)

    def test_unsharedQueue(self) -> None:
        """
        A queue each process would keep for itself (the in-memory one), or
        whose processes would share one lease owner (a PostgreSQL node),
        keeps one process.
        """
        self.assertEqual(autoWorkers(TCP, "memory", 8), 1)
        self.assertEqual(autoWorkers(TCP, "postgresql", 8), 1)
        self.assertEqual(autoWorkers(TCP, None, 8), 1)

    def test_unknownCores(self) -> None:
        """
        C{os.cpu_count()} may say C{None}: one process.
        """
        self.assertEqual(autoWorkers(TCP, "sqlite", None), 1)


def configFile(case: SynchronousTestCase, text: str) -> str:
    directory = Path(case.mktemp())
    directory.mkdir()
    path = directory / "mailfw.toml"
    path.write_text(text)
    return str(path)


class ConfigDefaultTests(SynchronousTestCase):
    def test_fileDefaultsToAuto(self) -> None:
        """
        A configuration file that does not set C{workers} gets C{"auto"}.
        """
        config = loadConfig(configFile(self, '[listen]\nsmtp = ["tcp:2525"]\n'))
        self.assertEqual(config.workers, AUTO_WORKERS)

    def test_embeddedDefaultIsOne(self) -> None:
        """
        Without a file (the embedded default, a newcomer's first try) the
        server stays one process.
        """
        self.assertEqual(loadConfig(None, dataDir=self.mktemp()).workers, 1)

    def test_explicit(self) -> None:
        """
        C{"auto"} and integers are taken as written.
        """
        self.assertEqual(loadConfig(configFile(self, '[server]\nworkers = "auto"\n')).workers, AUTO_WORKERS)
        self.assertEqual(loadConfig(configFile(self, "[server]\nworkers = 3\n")).workers, 3)

    def test_badValues(self) -> None:
        """
        Another string, or a number below 1, is a configuration error
        naming the key.
        """
        e = self.assertRaises(ConfigError, loadConfig, configFile(self, '[server]\nworkers = "many"\n'))
        self.assertEqual(str(e), '[server] workers: expected an integer or "auto"')
        e = self.assertRaises(ConfigError, loadConfig, configFile(self, "[server]\nworkers = 0\n"))
        self.assertIn("workers: must be at least 1", str(e))


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "cpu_count", lambda: 3)

    def options(self, *args: str) -> Options:
        o = Options()
        o.parseOptions(list(args))
        return o

    def test_autoFromFile(self) -> None:
        """
        A file with TCP listeners and the SQLite queue, no C{workers}: as
        many processes as cores.
        """
        path = configFile(self, '[listen]\nsmtp = ["tcp:2525"]\n[queue]\nplugin = "sqlite"\n')
        self.assertEqual(self.options("--config", path)["workers"], 3)

    def test_autoFromFileUnshareable(self) -> None:
        """
        The same with a UNIX listener: one process, and no usage error.
        """
        path = configFile(self, '[listen]\nsmtp = ["unix:mailfw.sock"]\n[queue]\nplugin = "sqlite"\n')
        self.assertEqual(self.options("--config", path)["workers"], 1)

    def test_embeddedDefault(self) -> None:
        """
        No file: one process, however many cores.
        """
        self.assertEqual(self.options("--data-dir", self.mktemp())["workers"], 1)

    def test_commandLine(self) -> None:
        """
        C{--workers} takes a number or C{auto} and replaces the file's
        setting; anything else is a usage error.
        """
        path = configFile(self, '[server]\nworkers = 1\n[listen]\nsmtp = ["tcp:2525"]\n')
        self.assertEqual(self.options("--config", path)["workers"], 1)
        self.assertEqual(self.options("--config", path, "--workers", "auto")["workers"], 3)
        self.assertEqual(self.options("--config", path, "--workers", "2")["workers"], 2)
        e = self.assertRaises(usage.UsageError, self.options, "--config", path, "--workers", "lots")
        self.assertEqual(str(e), "--workers must be an integer or \"auto\", not 'lots'")
        e = self.assertRaises(usage.UsageError, self.options, "--config", path, "--workers", "0")
        self.assertEqual(str(e), "--workers must be at least 1")
