"""
Sphinx configuration for mailfw's documentation.

The narrative pages are Sphinx; the API reference is made by pydoctor
(Twisted's own tool: it reads epytext and knows zope interfaces and who
implements them) through C{pydoctor.sphinx_ext.build_apidocs}, into C{api/}
of the HTML output.  That extension hands pydoctor's C{objects.inv} to
intersphinx, so C{`mailfw.envelope.Envelope`} in a page links to the
pydoctor page.

The build runs offline and with C{-W} in CI, so every warning fails it.
Python's, Twisted's and zope.interface's inventories are fetched only when
C{MAILFW_DOCS_INTERSPHINX=1}; without them pydoctor cannot link names from
those projects, and L{_ExternalLinks} reports just those as information.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

# Build from a plain checkout too (the CI installs mailfw, so this is only a
# convenience).
_root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_root))
# mailfw_pydoctor, for pydoctor's --system-class.
sys.path.insert(0, str(_root / "docs"))

project = "mailfw"
author = "the mailfw developers"
copyright = "the mailfw developers"
try:
    from importlib.metadata import version as _version

    release = _version("mailfw")
except Exception:
    release = ""
version = release

extensions = ["sphinx.ext.intersphinx", "pydoctor.sphinx_ext.build_apidocs"]

root_doc = "index"
exclude_patterns = ["_build"]
# `mailfw.envelope.Envelope` in the narrative docs links to pydoctor's page
# for it (through intersphinx); a name nobody documents stays plain text.
default_role = "py:obj"

html_theme = "alabaster"
html_title = "mailfw"
html_static_path: list[str] = []

# The projects whose names mailfw's docstrings and pages mention most.
_external = {
    "python": "https://docs.python.org/3/",
    "twisted": "https://docs.twisted.org/en/stable/api/",
    "zopeinterface": "https://zopeinterface.readthedocs.io/en/latest/",
}
_online = os.environ.get("MAILFW_DOCS_INTERSPHINX") == "1"

intersphinx_mapping: dict[str, tuple[str, str | None]] = (
    {name: (url, None) for name, url in _external.items()} if _online else {}
)

pydoctor_args = [
    "--project-name=mailfw",
    f"--project-version={release}",
    "--docformat=epytext",
    "--system-class=mailfw_pydoctor.MailfwSystem",
    f"--project-base-dir={_root}",
    "--html-output={outdir}/api",
    *([f"--intersphinx={url}objects.inv" for url in _external.values()] if _online else []),
    str(_root / "mailfw"),
]
# Relative, so that the links work from a local build as well as a server.
pydoctor_url_path = "api/"


class _ExternalLinks(logging.Filter):
    """
    Offline, pydoctor warns about every name it could have linked in
    Python's, Twisted's or zope.interface's documentation.  Report those as
    information, so that C{-W} still fails on the warnings that matter:
    epytext errors, links to mailfw names that do not exist, interface
    problems.
    """

    _unresolved = re.compile(r'Cannot find link target for "([^"]+)"')

    def filter(self, record: logging.LogRecord) -> bool:
        match = self._unresolved.search(record.getMessage())
        if match is not None and not (match.group(1) + ".").startswith("mailfw."):
            record.levelno, record.levelname = logging.INFO, "INFO"
            # Sphinx ends a warning's line itself, but not an info's.
            record.nonl = False
        return True


def setup(app: Any) -> dict[str, Any]:
    if not _online:
        # build_apidocs logs pydoctor's output through sphinx.util.logging,
        # which prefixes the module's name with "sphinx.".
        pydoctorLog = logging.getLogger("sphinx.pydoctor.sphinx_ext.build_apidocs")
        if not any(isinstance(f, _ExternalLinks) for f in pydoctorLog.filters):
            pydoctorLog.addFilter(_ExternalLinks())
    return {"parallel_read_safe": True}
