"""
What pydoctor must know about mailfw beyond its source.

First, that C{twisted.plugin.IPlugin} is a zope interface.  pydoctor recognises an interface by its bases, and knows only the classes it
documents, plus C{zope.interface.Interface}.  L{mailfw.interfaces.INamedPlugin}
extends C{IPlugin}, so without this neither it nor the four factory
interfaces that extend it would be interfaces in the API reference, and
their pages would not list the plugins that implement them.

Second, that L{mailfw.interfaces} is the home of the interfaces.  pydoctor
moves an object to a module that re-exports it in C{__all__} when the
module defining it has no C{__all__}, as L{mailfw.interfaces} has not; the
interfaces would then be documented where some private module re-exports
them.

C{docs/conf.py} passes C{--system-class=mailfw_pydoctor.MailfwSystem}.
"""

from __future__ import annotations

import ast

from pydoctor import extensions, model
from pydoctor.extensions.zopeinterface import ZopeInterfaceClass

# Interfaces from other projects that mailfw's interfaces extend.
EXTERNAL_INTERFACES = frozenset({"twisted.plugin.IPlugin", "twisted.cred.credentials.ICredentials"})

# Modules whose objects stay where they are defined.
HOME_MODULES = frozenset({"mailfw.interfaces"})


class MailfwVisitor(extensions.ModuleVisitorExt):
    """
    Make a class an interface when it extends one of L{EXTERNAL_INTERFACES},
    as pydoctor's zope.interface extension does for the interfaces it knows;
    give each of L{HOME_MODULES} an C{__all__} of everything it defines.
    """

    def depart_Module(self, node: ast.Module) -> None:
        module = self.visitor.module
        if module.fullName() in HOME_MODULES and module.all is None:
            module.all = list(module.contents)

    def depart_ClassDef(self, node: ast.ClassDef) -> None:
        cls = self.visitor.builder.current.contents.get(node.name)
        if (
            isinstance(cls, ZopeInterfaceClass)
            and not cls.isinterface
            and EXTERNAL_INTERFACES.intersection(cls.bases)
        ):
            cls.isinterface = True
            cls.kind = model.DocumentableKind.INTERFACE
            cls.implementedby_directly = []


def setup_pydoctor_extension(r: extensions.ExtRegistrar) -> None:
    r.register_astbuilder_visitor(MailfwVisitor)


class MailfwSystem(model.System):
    """
    pydoctor's system with L{MailfwVisitor}.
    """

    custom_extensions = [__name__]  # noqa: RUF012 (pydoctor's own declaration is a plain list)
