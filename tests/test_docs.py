"""
Every example in the documentation is tested, and the configuration
reference lists exactly the keys the code reads.

The examples are found in C{docs/*.rst} and C{README.rst}:

  - C{.. code-block:: toml} blocks must parse with L{tomllib}, load with
    L{mailfw.config.loadConfig}, name installed plugins (the example
    distribution in C{examples/webhook} counts as installed), and pass
    each plugin's own checks: every queue, router and delivery section is
    built by its plugin's C{fromConfig}, and C{[smtp]}, C{[scheduler]},
    C{[auth]} and C{[etrn]} by the code that reads them.  Then the whole
    file goes through L{mailfw.tap.checkComponents}, what C{mailfw config
    check} runs.
  - C{.. code-block:: python} blocks are run, and the test cases they
    define are run too.

Comments (invisible in the output) just before a block change that:

  - C{.. docs-test: host} marks a TOML example that names files, programs
    or sockets of a production host.  A plugin may then refuse it for
    naming a file that does not exist here (after its keys were checked),
    and the whole-server check is left out.
  - C{.. docs-test: skip (reason)} marks a Python example that cannot run
    here, such as one that needs a running server.
  - C{.. docs-test: passwd} marks a literal block that is a password file
    (C{mailfw passwd}'s format): every line must parse, with no problems.
  - C{.. docs-test: keys [section] [plugin]} before a definition list in
    C{docs/configuration.rst} says that the list documents that section
    (of that plugin); the test compares its terms with the keys the code
    asks for.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import shutil
import sys
import tempfile
import textwrap
import time
import tomllib
import unittest
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from unittest import mock

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

import twisted.plugins
from mailfw.auth._config import authFromConfig
from mailfw.auth._passwd import parsePasswordFile
from mailfw.config import (
    ComponentContext,
    ConfigError,
    Section,
    ServerConfig,
    loadConfig,
)
from mailfw.etrn import settingsFromConfig
from mailfw.interfaces import (
    IDeliveryAgentFactory,
    IMessageQueue,
    IMessageQueueFactory,
    INamedPlugin,
    IPolicyFactory,
    IRouterFactory,
)
from mailfw.plugin import LazyComponent, MissingPlugin, findPlugin
from mailfw.policy._chain import LINK_OPTIONS
from mailfw.scheduling._scheduler import schedulerFromConfig
from mailfw.smtp import SMTPLimits
from mailfw.tap import checkComponents
from mailfw.testing import MemoryDeliveryAgent, MemoryQueue

_T = TypeVar("_T")

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [*sorted((ROOT / "docs").glob("*.rst")), ROOT / "README.rst"]
EXAMPLE = ROOT / "examples" / "webhook"

MARKER = re.compile(r"^(\s*)\.\. docs-test: *(.*?)\s*$")
CODE_BLOCK = re.compile(r"^(\s*)\.\. code-block:: *(\S+)\s*$")
HEADING = re.compile(r"^(=+|-+|~+|\^+)\s*$")

# What a plugin says when a "host" example names a file that exists only on
# a production host; it says so after Section.finish() accepted the keys.
HOST_FILE_ERRORS = re.compile(
    r"is not an executable file|cannot read|cannot set up the PostgreSQL queue|needs psycopg"
)

# Options a plugin requires, so that its other keys can be read.
REQUIRED_OPTIONS: dict[str, dict[str, object]] = {
    "lmtp": {"endpoint": "unix:/nonexistent/lmtp"},
    "pipe": {"command": ["/bin/sh"]},
    "milter": {"address": "inet:127.0.0.1:8891"},
    "policy-server": {"address": "inet:127.0.0.1:10023"},
    "rspamd": {"url": "http://127.0.0.1:11333"},
    "clamav": {"address": "inet:127.0.0.1:3310"},
    # Refused after its keys are read and before any connection is made,
    # so that the test never touches a database.
    "postgresql": {"node": ""},
}


@dataclasses.dataclass(frozen=True)
class Block:
    """
    One example in a document.

    @ivar language: C{"toml"}, C{"python"}, ... from C{.. code-block::}, or
        C{"::"} for a literal block.
    @ivar markers: the C{.. docs-test:} comments just before it.
    """

    path: Path
    line: int
    language: str
    text: str
    markers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def slug(self) -> str:
        stem = re.sub(r"\W", "", self.path.stem.title())
        return f"{stem[:1].lower()}{stem[1:]}Line{self.line}"


def _indentation(line: str) -> int:
    return len(line) - len(line.lstrip())


def _body(lines: list[str], start: int, outer: int) -> tuple[str, int]:
    """
    The text of the indented block starting at C{start} (after blank lines
    and directive options), deeper than C{outer}; and the index after it.
    """
    i = start
    while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith(":")):
        if lines[i].strip() and _indentation(lines[i]) <= outer:
            break
        i += 1
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indentation(lines[i]) > outer):
        body.append(lines[i])
        i += 1
    return textwrap.dedent("\n".join(body)).strip("\n") + "\n", i


def blocksIn(path: Path) -> list[Block]:
    """
    Every code block and literal block of C{path}, with its markers.
    """
    lines = path.read_text("utf-8").splitlines()
    found: list[Block] = []
    markers: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        code = CODE_BLOCK.match(line)
        if marker:
            if not marker.group(2).startswith("keys "):
                markers.append(marker.group(2))
            i += 1
        elif code:
            text, end = _body(lines, i + 1, _indentation(line))
            found.append(Block(path, i + 1, code.group(2), text, tuple(markers)))
            markers = []
            i = end
        elif line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            text, end = _body(lines, i + 1, _indentation(line))
            found.append(Block(path, i + 1, "::", text, tuple(markers)))
            markers = []
            i = end
        else:
            if line.strip():
                markers = []
            i += 1
    return found


def allBlocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in blocksIn(path)]


def documentedKeys(path: Path) -> dict[str, set[str]]:
    """
    For each C{.. docs-test: keys LABEL} marker of C{path}, the keys named by
    the terms of the definition list that follows it.
    """
    lines = path.read_text("utf-8").splitlines()
    documented: dict[str, set[str]] = {}
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker or not marker.group(2).startswith("keys "):
            continue
        label = marker.group(2)[len("keys ") :]
        indent = len(marker.group(1))
        keys: set[str] = set()
        for j, following in enumerate(lines[i + 1 :], i + 1):
            if not following.strip() or _indentation(following) > indent:
                continue
            if _indentation(following) < indent or not following.lstrip().startswith("``"):
                break
            underline = lines[j + 1].strip() if j + 1 < len(lines) else ""
            if underline and set(underline) <= set("=-~^"):
                # The next section's title, not a key.
                break
            term = following.strip().split(" (", 1)[0]
            keys.update(re.findall(r"``(\w+)``", term))
        documented[label] = keys
    return documented


@implementer(IReactorFromThreads)
class ThreadedMemoryReactor(MemoryReactorClock):
    """
    A L{MemoryReactorClock} that also takes calls from other threads (the
    SQLite queue's writer thread answers through C{callFromThread}) and
    runs them when the test asks, with a bounded wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fromThreads: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.fromThreads.put(lambda: callable(*args, **kwargs))

    def runUntilCalled(self, d: Deferred[Any], timeout: float = 30.0) -> None:
        """
        Run calls from other threads until C{d} has its final result (it
        may wait on other L{Deferred}s after its first callback).
        """
        fired: list[bool] = []

        def seen(result: _T) -> _T:
            fired.append(True)
            return result

        d.addBoth(seen)
        deadline = time.monotonic() + timeout
        while not fired:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{d!r} did not fire within {timeout} seconds")
            try:
                call = self.fromThreads.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            call()


def _isBundled(plugin: INamedPlugin) -> bool:
    return isinstance(plugin, LazyComponent) and plugin.target.startswith("mailfw.")


@contextmanager
def examplePlugins() -> Iterator[None]:
    """
    Make the example distribution's plugins findable as if it were
    installed (unless it is): a copy of its package goes on C{sys.path}
    and a copy of its dropin directory joins L{twisted.plugins}' search
    path, so that nothing is written into the checkout.
    """
    try:
        findPlugin(IDeliveryAgentFactory, "webhook")
    except MissingPlugin:
        pass
    else:
        yield
        return
    scratch = Path(tempfile.mkdtemp(prefix="mailfw-docs-plugins-"))
    shutil.copytree(EXAMPLE / "mailfw_webhook", scratch / "mailfw_webhook")
    shutil.copytree(EXAMPLE / "twisted" / "plugins", scratch / "plugins")
    sys.path.insert(0, str(scratch))
    twisted.plugins.__path__.append(str(scratch / "plugins"))
    try:
        yield
    finally:
        twisted.plugins.__path__.remove(str(scratch / "plugins"))
        sys.path.remove(str(scratch))
        for name in list(sys.modules):
            if name.split(".")[0] == "mailfw_webhook" or name.startswith("twisted.plugins.mailfw_webhook"):
                del sys.modules[name]
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def recordingKeys() -> Iterator[dict[str, set[str]]]:
    """
    Record which keys of which section the code asks for, through every
    getter of L{Section}.
    """
    asked: dict[str, set[str]] = defaultdict(set)
    patches = []
    for name in ("text", "integer", "number", "flag", "strings", "table", "choice", "has"):
        original = getattr(Section, name)

        def recording(self: Section, key: str, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            asked[self.title].add(key)
            return _original(self, key, *args, **kwargs)

        patches.append(mock.patch.object(Section, name, recording))
    for p in patches:
        p.start()
    try:
        yield asked
    finally:
        for p in reversed(patches):
            p.stop()


def sectionsOf(config: ServerConfig) -> list[tuple[str, str, str, Mapping[str, object], type[INamedPlugin]]]:
    """
    Each component section: C{(title, instanceName, pluginName, options,
    factory interface)}.
    """
    sections = [
        ("[queue]", "queue", config.queue, IMessageQueueFactory),
        ("[routing]", "routing", config.routing, IRouterFactory),
    ]
    sections += [
        (f"[delivery.{name}]", name, options, IDeliveryAgentFactory)
        for name, options in config.delivery.items()
    ]
    # The policy chain reads listeners, timeout and on_error; the plugin the rest.
    sections += [
        (
            f"[policy.{name}]",
            name,
            {k: v for k, v in options.items() if k not in LINK_OPTIONS},
            IPolicyFactory,
        )
        for name, options in config.policy.items()
    ]
    return [
        (title, name, str(options.get("plugin")), options, interface)
        for title, name, options, interface in sections
    ]


class DocsTestCase(SynchronousTestCase):
    """
    Helpers shared by the documentation tests.
    """

    def scratchDirectory(self) -> Path:
        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path

    def closeQueue(self, reactor: ThreadedMemoryReactor, q: IMessageQueue) -> None:
        d = q.close()
        reactor.runUntilCalled(d)
        self.successResultOf(d)

    def checkTOML(self, block: Block) -> None:
        """
        C{block} loads, names installed plugins, and passes every check that
        the server would make at start-up.
        """
        host = "host" in block.markers
        try:
            tomllib.loads(block.text)
        except tomllib.TOMLDecodeError as e:
            self.fail(f"{block}: not TOML: {e}")
        directory = self.scratchDirectory()
        path = directory / "mailfw.toml"
        path.write_text(block.text, "utf-8")
        try:
            config = loadConfig(str(path))
        except ConfigError as e:
            self.fail(f"{block}: {e}")
        dataDir = directory / "data"
        dataDir.mkdir()
        config = dataclasses.replace(config, dataDir=dataDir)
        reactor = ThreadedMemoryReactor()
        context = config.context(reactor)
        context.queue = MemoryQueue()

        with examplePlugins():
            built: dict[str, Any] = {}
            for title, name, pluginName, options, interface in sectionsOf(config):
                try:
                    factory: Any = findPlugin(interface, pluginName)
                except LookupError as e:
                    self.fail(f"{block}: {title}: {e}")
                try:
                    built[title] = factory.fromConfig(context, name, options)
                except ConfigError as e:
                    if not (host and HOST_FILE_ERRORS.search(str(e))):
                        self.fail(f"{block}: {title}: {e}")
            # A router refused for a host file is not needed to read [scheduler].
            router: Any = built.get("[routing]")
            try:
                SMTPLimits.fromSection(Section("[smtp]", config.smtp))
                authFromConfig(
                    Section("[auth]", config.auth),
                    context,
                    lambda f, *args: maybeDeferred(f, *args),
                )
                settingsFromConfig(config.raw.get("etrn", {}))
                scheduler = schedulerFromConfig(
                    Section("[scheduler]", config.scheduler),
                    reactor,
                    built.get("[queue]", MemoryQueue()),
                    router,
                    {name: MemoryDeliveryAgent(name) for name in config.delivery},
                    config.hostname,
                    resolver=context.resolver,
                )
            except ConfigError as e:
                self.fail(f"{block}: {e}")
            self.assertFalse(scheduler.running)
            if "[queue]" in built:
                self.closeQueue(reactor, built["[queue]"])
            if not host:
                # What `mailfw config check` does, listeners and TLS included.
                try:
                    d = checkComponents(config, reactor)
                except ConfigError as e:
                    self.fail(f"{block}: mailfw config check: {e}")
                reactor.runUntilCalled(d)
                self.successResultOf(d)

    def checkPasswordFile(self, block: Block) -> None:
        """
        C{block} is a password file whose every line parses.
        """
        entries, problems = parsePasswordFile(block.text)
        self.assertEqual(problems, [], f"{block}")
        self.assertTrue(entries, f"{block}: no users")

    def runPython(self, block: Block) -> None:
        """
        Run C{block}, and the test cases it defines.
        """
        namespace: dict[str, Any] = {"__name__": "mailfw_docs_example"}
        module = ModuleType("mailfw_docs_example")
        cwd = os.getcwd()
        os.chdir(self.scratchDirectory())
        sys.modules[module.__name__] = module
        try:
            exec(compile(block.text, str(block), "exec"), namespace)
        except Exception as e:
            self.fail(f"{block}: {type(e).__name__}: {e}")
        finally:
            os.chdir(cwd)
            del sys.modules[module.__name__]
        cases = [
            value
            for value in namespace.values()
            if isinstance(value, type)
            and issubclass(value, unittest.TestCase)
            and value.__module__ == "mailfw_docs_example"
        ]
        for case in cases:
            suite = unittest.TestLoader().loadTestsFromTestCase(case)
            result = unittest.TestResult()
            suite.run(result)
            self.assertTrue(result.testsRun, f"{block}: {case.__name__} has no tests")
            problems = [f"{test}: {trace}" for test, trace in result.errors + result.failures]
            self.assertEqual(problems, [], f"{block}: {case.__name__}")


class ExampleTests(DocsTestCase):
    """
    One test per example; the methods are added below, from the documents.
    """


def _addExampleTests() -> None:
    for block in allBlocks():
        if block.language == "toml":

            def testTOML(self: DocsTestCase, block: Block = block) -> None:
                self.checkTOML(block)

            testTOML.__doc__ = (
                f"The TOML example at {block} loads, names installed plugins and "
                "passes every plugin's checks."
            )
            setattr(ExampleTests, f"test_toml_{block.slug}", testTOML)
        elif block.language == "python" and not any(m.startswith("skip") for m in block.markers):

            def testPython(self: DocsTestCase, block: Block = block) -> None:
                self.runPython(block)

            testPython.__doc__ = f"The Python example at {block} runs, and so do its tests."
            setattr(ExampleTests, f"test_python_{block.slug}", testPython)
        elif block.language == "::" and "passwd" in block.markers:

            def testPasswordFile(self: DocsTestCase, block: Block = block) -> None:
                self.checkPasswordFile(block)

            testPasswordFile.__doc__ = f"The password file example at {block} parses cleanly."
            setattr(ExampleTests, f"test_passwd_{block.slug}", testPasswordFile)


_addExampleTests()


class ExtractionTests(SynchronousTestCase):
    """
    The examples are found, and marked as the tests expect.
    """

    def test_examplesFound(self) -> None:
        """
        The documents hold many TOML examples and runnable Python examples,
        so a change in their markup cannot silently leave them untested.
        """
        blocks = allBlocks()
        toml = [b for b in blocks if b.language == "toml"]
        self.assertGreaterEqual(len(toml), 20)
        self.assertIn(ROOT / "README.rst", {b.path for b in toml})
        python = [b for b in blocks if b.language == "python" and not b.markers]
        self.assertGreaterEqual(len(python), 4)
        self.assertTrue([b for b in blocks if "passwd" in b.markers])

    def test_knownMarkers(self) -> None:
        """
        Every C{docs-test} marker is one the tests understand, and a skipped
        example says why.
        """
        for block in allBlocks():
            for marker in block.markers:
                self.assertRegex(marker, r"^(host|passwd|skip \(.+\))$", f"{block}")
            if any(m == "host" for m in block.markers):
                self.assertEqual(block.language, "toml", f"{block}")
            if "passwd" in block.markers:
                self.assertEqual(block.language, "::", f"{block}")
            if any(m.startswith("skip") for m in block.markers):
                self.assertEqual(block.language, "python", f"{block}")

    def test_configurationIsMarkedTOML(self) -> None:
        """
        No configuration example hides in a literal block or another
        language, where these tests would not find it.
        """
        for block in allBlocks():
            if block.language in ("toml", "python", "ini"):
                continue
            try:
                parsed = tomllib.loads(block.text)
            except tomllib.TOMLDecodeError:
                continue
            tables = [key for key, value in parsed.items() if isinstance(value, dict)]
            self.assertEqual(tables, [], f"{block} looks like TOML: use .. code-block:: toml")

    def test_blocksParsed(self) -> None:
        """
        The extractor takes a block's indented text and its markers, and
        stops at the first line that is not indented.
        """
        path = Path(self.mktemp())
        path.write_text(
            "Title\n=====\n\n.. docs-test: host\n\n.. code-block:: toml\n"
            "    :caption: x\n\n    [a]\n      b = 1\n\nAfter::\n\n    text\n\nEnd.\n",
            "utf-8",
        )
        blocks = blocksIn(path)
        self.assertEqual(
            [(b.language, b.text, b.markers) for b in blocks],
            [("toml", "[a]\n  b = 1\n", ("host",)), ("::", "text\n", ())],
        )


class ReferenceTests(SynchronousTestCase):
    """
    C{docs/configuration.rst} documents exactly the keys the code reads.
    """

    documented = documentedKeys(ROOT / "docs" / "configuration.rst")

    def assertDocumented(self, label: str, asked: set[str]) -> None:
        self.assertIn(label, self.documented, f"no '.. docs-test: keys {label}' list")
        self.assertEqual(
            sorted(self.documented[label]),
            sorted(asked - {"plugin"}),
            f"the keys documented for {label} differ from those the code reads",
        )

    def test_coreSections(self) -> None:
        """
        C{[server]}, C{[listen]}, C{[tls]} and C{[dns]} list the keys that
        L{loadConfig} reads.
        """
        with recordingKeys() as asked:
            loadConfig(None)
        for title in ("[server]", "[listen]", "[tls]", "[dns]"):
            self.assertDocumented(title, asked[title])

    def test_smtp(self) -> None:
        """
        C{[smtp]} lists every limit L{SMTPLimits.fromSection} reads.
        """
        with recordingKeys() as asked:
            SMTPLimits.fromSection(Section("[smtp]", {}))
        self.assertDocumented("[smtp]", asked["[smtp]"])

    def test_scheduler(self) -> None:
        """
        C{[scheduler]} lists every key the scheduler reads, and a per-domain
        table takes only keys listed there.
        """
        with recordingKeys() as asked:
            schedulerFromConfig(
                Section("[scheduler]", {"domains": {"example.com": {}}}),
                MemoryReactorClock(),
                MemoryQueue(),
                None,  # type: ignore[arg-type]
                {},
                "mx.example.org",
            )
        self.assertDocumented("[scheduler]", asked["[scheduler]"])
        perDomain = asked['[scheduler.domains."example.com"]']
        self.assertTrue(perDomain)
        self.assertLessEqual(perDomain, self.documented["[scheduler]"])

    def test_schedulerDestinations(self) -> None:
        """
        C{[scheduler.destinations]} lists every key a destination table
        takes.
        """
        with recordingKeys() as asked:
            schedulerFromConfig(
                Section("[scheduler]", {"destinations": {"gmail.com": {}}}),
                MemoryReactorClock(),
                MemoryQueue(),
                None,  # type: ignore[arg-type]
                {},
                "mx.example.org",
            )
        self.assertDocumented("[scheduler.destinations]", asked['[scheduler.destinations."gmail.com"]'])

    def test_auth(self) -> None:
        """
        C{[auth]} lists every key L{authFromConfig} reads.
        """
        context = ComponentContext(
            reactor=MemoryReactorClock(),
            hostname="mx.example.org",
            dataDir=Path(self.mktemp()),
            agentNames=frozenset({"local"}),
        )
        with recordingKeys() as asked:
            authFromConfig(
                Section("[auth]", {"passwords": "passwd"}),
                context,
                lambda f, *args: maybeDeferred(f, *args),
            )
        self.assertDocumented("[auth]", asked["[auth]"])

    def test_etrn(self) -> None:
        """
        C{[etrn]} lists every key L{settingsFromConfig} reads.
        """
        with recordingKeys() as asked:
            settingsFromConfig({})
        self.assertDocumented("[etrn]", asked["[etrn]"])

    def test_odmr(self) -> None:
        """
        C{[odmr]} lists every key its C{settingsFromConfig} reads.
        """
        from mailfw.smtp._odmr import settingsFromConfig as odmrFromConfig

        with recordingKeys() as asked:
            odmrFromConfig({})
        self.assertDocumented("[odmr]", asked["[odmr]"])

    def test_policyLinks(self) -> None:
        """
        C{[policy]} lists the keys the policy chain reads from every policy
        section (the plugin reads the others).
        """
        from mailfw.policy import Policy
        from mailfw.policy._chain import linkFromSection

        with recordingKeys() as asked:
            linkFromSection("[policy.x]", {"plugin": "x"}, lambda options: Policy())
        self.assertDocumented("[policy]", asked["[policy.x]"])

    def test_bundledPlugins(self) -> None:
        """
        Every bundled queue, router and delivery plugin has a key list, and
        it names exactly the keys its C{fromConfig} reads.
        """
        kinds = [
            ("[queue]", IMessageQueueFactory, "queue"),
            ("[routing]", IRouterFactory, "routing"),
            ("[delivery]", IDeliveryAgentFactory, "instance"),
            ("[policy]", IPolicyFactory, "instance"),
        ]
        checked = []
        for kind, interface, instanceName in kinds:
            plugin: Any
            for plugin in getPlugins(interface):
                if not _isBundled(plugin):
                    continue
                label = f"{kind} {plugin.name}"
                checked.append(label)
                reactor = ThreadedMemoryReactor()
                context = ComponentContext(
                    reactor=reactor,
                    hostname="mx.example.org",
                    dataDir=Path(self.mktemp()),
                    agentNames=frozenset({"local"}),
                )
                options = {"plugin": plugin.name, **REQUIRED_OPTIONS.get(plugin.name, {})}
                with recordingKeys() as asked:
                    try:
                        component = plugin.fromConfig(context, instanceName, options)
                    except ConfigError:
                        # Refused after reading its keys (a file missing here).
                        component = None
                if IMessageQueue.providedBy(component):
                    d = component.close()
                    reactor.runUntilCalled(d)
                    self.successResultOf(d)
                # A plugin without options (discard) asks for nothing.
                titles = [t for t in asked if t.startswith(kind[:-1])]
                self.assertLessEqual(len(titles), 1, f"{label}: {dict(asked)}")
                self.assertDocumented(label, set().union(*(asked[t] for t in titles)))
        kindNames = {kind for kind, _, _ in kinds}
        documentedPlugins = [
            label for label in self.documented if label.split()[0] in kindNames and len(label.split()) == 2
        ]
        self.assertEqual(sorted(documentedPlugins), sorted(checked))
