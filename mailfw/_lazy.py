"""
Packages whose re-exported names are imported on first use.

A package's C{__init__} runs whenever any of its modules is imported, so a
package that re-exports everything makes C{import mailfw.ops._events} cost
C{prometheus_client} and C{twisted.web}, and C{import mailfw.auth._quota}
cost the password file code: start-up paid for features the configuration
did not use (issue 19).  Such a package sets its module C{__getattr__}
(PEP 562) to L{lazyExports} and imports the names for type checkers only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from importlib import import_module
from typing import Any

__all__ = ["lazyExports"]


def lazyExports(namespace: MutableMapping[str, Any], homes: Mapping[str, str]) -> Callable[[str], object]:
    """
    A module C{__getattr__} for the package whose C{globals()} is
    C{namespace}: it imports each name of C{homes} from the module named
    there the first time it is asked for, and keeps it in the package so
    that it is asked once.

    @param homes: public name -> the module that defines it.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(home), name)
        namespace[name] = value
        return value

    return __getattr__
