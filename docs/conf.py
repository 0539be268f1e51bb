"""
Sphinx configuration for mailfw's documentation.

The build runs offline (no intersphinx inventories are fetched) and with
C{-W}, so every warning fails CI.  The API reference uses
C{sphinx.ext.autodoc}; mailfw's docstrings are epytext, which
L{_epytextToRST} turns into reStructuredText first.
"""

from __future__ import annotations

import importlib
import io
import re
import sys
from pathlib import Path
from typing import Any

from docutils.parsers.rst import Directive, Parser
from docutils.utils import new_document
from sphinx.util import logging

# Build from a plain checkout too (the CI installs mailfw, so this is only a
# convenience).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "mailfw"
author = "the mailfw developers"
copyright = "the mailfw developers"
try:
    from importlib.metadata import version as _version

    release = _version("mailfw")
except Exception:
    release = ""
version = release

extensions = ["sphinx.ext.autodoc"]

root_doc = "index"
exclude_patterns = ["_build"]
# `name` in the narrative docs and L{name} in docstrings link to Python
# objects when Sphinx knows them, and stay plain text otherwise.
default_role = "py:obj"
# Short names in type hints (Deferred, Address) can match more than one
# documented object; that is not worth failing the build over.
suppress_warnings = ["ref.python"]

html_theme = "alabaster"
html_title = "mailfw"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

_log = logging.getLogger("mailfw.docs")

# --- epytext ---------------------------------------------------------------

# @param name: text   ->  :param name: text
_FIELD = re.compile(r"^(\s*)@(\w+)(?:\s+([^:]+?))?\s*:(.*)$")
_FIELD_NAMES = {
    "param": "param",
    "type": "type",
    "return": "returns",
    "returns": "returns",
    "rtype": "rtype",
    "raise": "raises",
    "raises": "raises",
    "ivar": "ivar",
    "cvar": "cvar",
    "var": "var",
    "keyword": "keyword",
    "kwarg": "keyword",
}
_INLINE = re.compile(r"([LCIBUM])\{")
_ESCAPE = re.compile(r"([*`|_\\])")


def _closingBrace(text: str, start: int) -> int:
    """
    The index of the brace closing the one opened just before C{start}, or
    -1; epytext allows balanced braces inside markup (C{{"a": 1}}).
    """
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _escape(text: str) -> str:
    """
    Make prose safe for reStructuredText: C{*}, C{_}, C{|} and backquotes
    mean markup there and nothing in epytext.
    """
    return _ESCAPE.sub(r"\\\1", text)


def _wrap(before: str, markup: str, after: str) -> str:
    """
    Glue inline markup to its neighbours: reStructuredText needs a space or
    punctuation around it, and an escaped space is invisible.
    """
    if before and (before[-1].isalnum() or before[-1] in "`*"):
        markup = "\\ " + markup
    if after and (after[0].isalnum() or after[0] in "`*"):
        markup = markup + "\\ "
    return markup


def _inline(text: str) -> str:
    """
    Convert epytext inline markup on one line or paragraph to
    reStructuredText.
    """
    out: list[str] = []
    position = 0
    while True:
        match = _INLINE.search(text, position)
        if match is None:
            out.append(_escape(text[position:]))
            return "".join(out)
        end = _closingBrace(text, match.end())
        if end < 0:
            out.append(_escape(text[position:]))
            return "".join(out)
        out.append(_escape(text[position : match.start()]))
        kind, content = match.group(1), text[match.end() : end]
        flat = " ".join(content.split())
        if kind == "L":
            # L{label <target>} or L{target}
            target = re.match(r"^(.*?)\s*<([^<>]+)>$", flat)
            name = target.group(2) if target else flat
            markup = f"`{name}`" if re.fullmatch(r"[\w.]+(\(\))?", name) else f"``{flat}``"
        elif kind == "C":
            markup = f"``{flat}``" if flat.strip() else ""
        elif kind == "I":
            markup = f"*{_escape(flat)}*"
        elif kind == "B":
            markup = f"**{_escape(flat)}**"
        else:  # U{}, M{}: keep the text
            markup = _escape(flat)
        out.append(_wrap("".join(out)[-1:], markup, text[end + 1 : end + 2]))
        position = end + 1


def _epytextToRST(lines: list[str]) -> list[str]:
    """
    Translate an epytext docstring (already split in lines) to
    reStructuredText: fields become field lists, inline markup becomes
    roles and literals, and prose is escaped.

    Inline markup may span lines, so each paragraph is converted as a whole
    and split again.
    """
    # Group lines into paragraphs, keeping field starts as boundaries.
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if not line.strip() or _FIELD.match(line):
            if current:
                paragraphs.append(current)
            current = []
            if not line.strip():
                paragraphs.append([""])
                continue
        current.append(line)
    if current:
        paragraphs.append(current)

    result: list[str] = []
    sawField = False
    literalIndent: int | None = None
    for paragraph in paragraphs:
        if paragraph == [""]:
            result.append("")
            continue
        first = paragraph[0]
        indent = len(first) - len(first.lstrip())
        if literalIndent is not None and indent > literalIndent:
            # The body of a C{::} literal block: verbatim.
            result.extend(paragraph)
            continue
        literalIndent = None
        if first.lstrip().startswith(">>>"):
            result.extend(paragraph)
            continue
        if paragraph[-1].rstrip().endswith("::"):
            literalIndent = indent
        field = _FIELD.match(first)
        if field and field.group(2) in _FIELD_NAMES:
            indent, kind, argument, rest = field.groups()
            if not sawField and result and result[-1].strip():
                result.append("")
            sawField = True
            name = _FIELD_NAMES[kind]
            head = f"{indent}:{name} {argument.strip()}:" if argument else f"{indent}:{name}:"
            paragraph = [head + "\x00" + rest, *paragraph[1:]]
        text = "\n".join(paragraph)
        if "\x00" in text:
            head, _, body = text.partition("\x00")
            converted = head + _inline(body)
        else:
            converted = _inline(text)
        result.extend(converted.split("\n"))
    return result


def _problems(text: str) -> list[str]:
    """
    Parse C{text} with docutils alone and return its warnings and errors,
    so a docstring that is not valid reStructuredText can be shown verbatim
    instead of failing the whole (C{-W}) build.
    """
    try:
        from docutils.frontend import get_default_settings

        settings = get_default_settings(Parser)
    except ImportError:  # docutils < 0.19
        from docutils.frontend import OptionParser

        settings = OptionParser(components=(Parser,)).get_default_values()
    settings.report_level = 5
    settings.halt_level = 5
    settings.warning_stream = io.StringIO()
    document = new_document("<docstring>", settings)
    found: list[str] = []

    def observe(message: Any) -> None:
        if message["level"] >= 2:
            found.append(message.astext())

    document.reporter.attach_observer(observe)
    # Sphinx registers its roles and directives (and the default role) in
    # docutils' global tables during the build; check against plain
    # docutils instead, so the check has no side effects on the build.
    from docutils.parsers.rst import directives, roles

    savedRoles, savedDirectives = roles._roles, directives._directives  # type: ignore[attr-defined]
    roles._roles, directives._directives = {}, {}  # type: ignore[attr-defined]
    try:
        Parser().parse(text, document)
    finally:
        roles._roles, directives._directives = savedRoles, savedDirectives  # type: ignore[attr-defined]
    return found


def _docstringToRST(name: str, lines: list[str]) -> list[str]:
    """
    Convert an epytext docstring, or show it verbatim if the conversion is
    not clean reStructuredText (so one odd docstring cannot fail the
    build).
    """
    converted = _epytextToRST(lines)
    problems = _problems("\n".join(converted))
    if problems:
        _log.info("%s: docstring shown verbatim: %s", name, problems[0].splitlines()[0])
        return ["::", ""] + ["    " + line for line in lines] + [""]
    return converted


def _processDocstring(app: Any, what: str, name: str, obj: object, options: Any, lines: list[str]) -> None:
    lines[:] = _docstringToRST(name, lines)


# --- zope interfaces -------------------------------------------------------


class InterfacesDirective(Directive):
    """
    C{.. mailfw-interfaces:: module}: document every zope interface defined
    in a module, in source order, with its methods and attributes.

    autodoc does not know zope interfaces (they are not classes), so this
    writes the standard C{py:class}, C{py:method} and C{py:attribute}
    directives for them.
    """

    required_arguments = 1
    has_content = False

    def run(self) -> list[Any]:
        from zope.interface.interface import InterfaceClass, Method

        moduleName = self.arguments[0]
        module = importlib.import_module(moduleName)
        out: list[str] = []

        def docstring(name: str, text: str | None, indent: str) -> None:
            from sphinx.util.docstrings import prepare_docstring

            for line in _docstringToRST(name, prepare_docstring(text or "")):
                out.append(indent + line if line else "")

        for objectName, interface in vars(module).items():
            if not isinstance(interface, InterfaceClass):
                continue
            if interface.__module__ != moduleName or objectName.startswith("_"):
                continue
            qualified = f"{moduleName}.{objectName}"
            out += [f".. py:class:: {objectName}", f"   :module: {moduleName}", ""]
            bases = [
                f"`{base.__module__}.{base.__name__}`"
                for base in interface.__bases__
                if base.__name__ != "Interface"
            ]
            if bases:
                out += ["   Extends " + ", ".join(bases) + ".", ""]
            docstring(qualified, interface.__doc__, "   ")
            out.append("")
            for memberName, member in interface.namesAndDescriptions(all=False):
                if isinstance(member, Method):
                    out.append(f"   .. py:method:: {memberName}{member.getSignatureString()}")
                else:
                    out.append(f"   .. py:attribute:: {memberName}")
                out.append("")
                docstring(f"{qualified}.{memberName}", member.getDoc(), "      ")
                out.append("")
        self.state.document.settings.record_dependencies.add(module.__file__ or "")
        return self._parse(out)

    def _parse(self, lines: list[str]) -> list[Any]:
        from docutils import nodes
        from docutils.statemachine import StringList
        from sphinx.util.nodes import nested_parse_with_titles

        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, "<mailfw-interfaces>"), container)
        return list(container.children)


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _processDocstring)
    app.add_directive("mailfw-interfaces", InterfacesDirective)
    return {"parallel_read_safe": True}
