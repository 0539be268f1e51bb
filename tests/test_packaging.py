"""
The built wheel: what users get from C{pip install mailfw}.

Twisted finds plugins by scanning C{twisted/plugins/} directories, so the
wheel must ship mailfw's dropins there, and must not ship
C{twisted/__init__.py} or C{twisted/plugins/__init__.py}, which would
shadow Twisted's own package once installed.

The wheel is built once per test run, offline: C{pip wheel --no-deps
--no-build-isolation --no-index} with the setuptools and wheel of the running
environment (C{.ci/run} installs both), from a copy of the source tree so
that a stale C{build/} directory cannot leak old files into it.
"""

from __future__ import annotations

import atexit
import configparser
import email.parser
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

# Not needed to build the wheel, and possibly large or stale.
_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "_build",
    ".mypy_cache",
    ".pytest_cache",
    ".hypothesis",
    "mailfw-data",
    "dropin.cache",
    "_trial_temp*",
)

_built: list[Path] = []


def _wheel() -> Path:
    """
    Build the wheel on first use and return its path.
    """
    if _built:
        return _built[0]
    work = Path(tempfile.mkdtemp(prefix="mailfw-wheel-"))
    atexit.register(shutil.rmtree, work, True)
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=_IGNORE)
    out = work / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheels = sorted(out.glob("mailfw-*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise AssertionError(
            f"building the wheel failed (exit {result.returncode}, wheels {wheels}); "
            "it needs setuptools >= 68 and wheel in this environment "
            "(.ci/run installs them):\n" + result.stdout + result.stderr
        )
    _built.append(wheels[0])
    return wheels[0]


def _names() -> set[str]:
    with zipfile.ZipFile(_wheel()) as archive:
        return set(archive.namelist())


def _distInfo(name: str) -> str:
    with zipfile.ZipFile(_wheel()) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/" + name)]
        return archive.read(path).decode("utf-8")


class WheelContentsTests(SynchronousTestCase):
    """
    The files in the wheel.
    """

    def test_dropinsIncluded(self) -> None:
        """
        Both of mailfw's dropins are in the wheel under C{twisted/plugins/}.
        """
        names = _names()
        self.assertIn("twisted/plugins/mailfw_twistd.py", names)
        self.assertIn("twisted/plugins/mailfw_components.py", names)

    def test_everyDropinIncluded(self) -> None:
        """
        Every C{mailfw_*.py} dropin of the source tree is in the wheel, so a
        new dropin cannot be forgotten by the packaging configuration.
        """
        inSource = {f"twisted/plugins/{p.name}" for p in (ROOT / "twisted" / "plugins").glob("mailfw_*.py")}
        inWheel = {n for n in _names() if n.startswith("twisted/plugins/")}
        self.assertEqual(inSource, inWheel)

    def test_noTwistedPackageInit(self) -> None:
        """
        The wheel has no C{twisted/__init__.py} nor
        C{twisted/plugins/__init__.py}, which would replace Twisted's own
        modules when installed.
        """
        names = _names()
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)

    def test_noDropinCache(self) -> None:
        """
        No C{dropin.cache} is shipped: it is built on the user's machine and
        a stale one hides plugins.
        """
        self.assertEqual([n for n in _names() if n.endswith("dropin.cache")], [])

    def test_onlyMailfwFiles(self) -> None:
        """
        Everything in the wheel is the C{mailfw} package, a mailfw dropin or
        metadata: no tests, examples or stray top-level modules.
        """
        stray = sorted(
            n
            for n in _names()
            if not n.startswith("mailfw/")
            and not (n.startswith("twisted/plugins/mailfw_") and n.endswith(".py"))
            and not n.split("/")[0].endswith(".dist-info")
        )
        self.assertEqual(stray, [])

    def test_packagesIncluded(self) -> None:
        """
        Every package directory of C{mailfw/} in the source tree, with its
        modules, is in the wheel.
        """
        names = _names()
        for init in (ROOT / "mailfw").rglob("__init__.py"):
            relative = init.relative_to(ROOT).as_posix()
            self.assertIn(relative, names)


class WheelMetadataTests(SynchronousTestCase):
    """
    The wheel's metadata.
    """

    def test_metadata(self) -> None:
        """
        The metadata names the distribution, requires Python 3.11 and
        declares Twisted as a dependency.
        """
        metadata = email.parser.Parser().parsestr(_distInfo("METADATA"))
        self.assertEqual(metadata["Name"], "mailfw")
        self.assertEqual(metadata["Requires-Python"], ">=3.11")
        requirements = [r.split()[0].split("[")[0].lower() for r in metadata.get_all("Requires-Dist", [])]
        self.assertIn("twisted", requirements)

    def test_consoleScript(self) -> None:
        """
        The wheel declares the C{mailfw} console script.
        """
        entryPoints = configparser.ConfigParser()
        entryPoints.read_string(_distInfo("entry_points.txt"))
        self.assertIn("mailfw", entryPoints["console_scripts"])

    def test_readmeRenders(self) -> None:
        """
        The long description (README.rst) renders on PyPI: C{twine check}'s
        renderer accepts it.
        """
        try:
            from readme_renderer.rst import render
        except ImportError:
            raise SkipTest("readme_renderer (from twine, in the dev extra) is not installed") from None
        metadata = email.parser.Parser().parsestr(_distInfo("METADATA"))
        description = metadata.get_payload()
        assert isinstance(description, str)
        self.assertTrue(description.strip())
        warnings = io.StringIO()
        self.assertIsNotNone(render(description, stream=warnings), warnings.getvalue())
