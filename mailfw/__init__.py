"""
mailfw: a pluggable mail server framework on Twisted.

The public API lives in L{mailfw.interfaces} (what plugins implement),
L{mailfw.address}, L{mailfw.envelope} and L{mailfw.reply} (the values they
exchange), L{mailfw.plugin} (discovery) and L{mailfw.testing} (doubles and
conformance tests for plugin authors).
"""

__all__: list[str] = []
