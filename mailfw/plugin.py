"""
Finding component plugins by the name configuration gives them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.plugin import getPlugins
from zope.interface import directlyProvides, implementer

from mailfw.interfaces import INamedPlugin

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["DuplicatePlugin", "LazyComponent", "MissingPlugin", "findPlugin"]

_P = TypeVar("_P", bound=INamedPlugin)


class MissingPlugin(LookupError):
    """
    No installed plugin has the requested name.
    """


class DuplicatePlugin(LookupError):
    """
    Two installed plugins of one kind share a name, so a choice by name
    would be a guess.
    """


def findPlugin(interface: type[_P], name: str, plugins: Iterable[_P] | None = None) -> _P:
    """
    Return the installed provider of C{interface} called C{name}.

    @param plugins: plugins to search instead of L{getPlugins} (tests pass
        a list here); those not providing C{interface} are ignored, as
        L{getPlugins} would.
    @raise MissingPlugin: naming what is installed.
    @raise DuplicatePlugin: if two providers share C{name}.
    """
    found: dict[str, _P] = {}
    candidates = getPlugins(interface) if plugins is None else plugins
    for plugin in candidates:
        if not interface.providedBy(plugin):
            continue
        if plugin.name in found:
            raise DuplicatePlugin(f"{interface.__name__} plugin {plugin.name!r} is installed twice")
        found[plugin.name] = plugin
    try:
        return found[name]
    except KeyError:
        raise MissingPlugin(
            f"no {interface.__name__} plugin named {name!r}; "
            f"installed: {', '.join(sorted(found)) or '(none)'}"
        ) from None


@implementer(INamedPlugin)
class LazyComponent:
    """
    A component plugin that imports its implementation only when used.

    Twisted imports every dropin module on each plugin scan, so dropins
    hold these light objects; C{target} names a
    C{fromConfig(context, instanceName, options)} callable as
    C{"package.module:name"}.
    """

    def __init__(self, interface: type[INamedPlugin], name: str, target: str) -> None:
        self.name = name
        self.target = target
        directlyProvides(self, interface)

    def fromConfig(self, context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> Any:
        module, _, attribute = self.target.partition(":")
        return getattr(import_module(module), attribute)(context, instanceName, options)

    def __repr__(self) -> str:
        return f"<LazyComponent {self.name!r} -> {self.target}>"
