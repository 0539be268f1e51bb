"""
A target for L{mailfw.plugin.LazyComponent} tests.
"""


def fromConfig(context: object, instanceName: str, options: object) -> object:
    return (instanceName, options)
