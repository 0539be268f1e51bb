"""
Run one fuzz target under atheris (libFuzzer, coverage-guided):

    python -m tests.fuzz.run TARGET [libFuzzer options] [corpus directories]

for example, the long run of one target for an hour, growing a corpus in
a scratch directory beside the seed corpus::

    mkdir -p /tmp/corpus-session
    python -m tests.fuzz.run session -max_total_time=3600 -timeout=10 \\
        /tmp/corpus-session tests/fuzz/corpus/session

mailfw's modules are instrumented for coverage as they are imported here;
a crash (an exception, a broken invariant, a call slower than
C{-timeout}) stops the run with the input saved as C{crash-*} or
C{timeout-*} under C{-artifact_prefix}.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    if len(argv) < 2:
        raise SystemExit(f"usage: {argv[0]} TARGET [libFuzzer options] [corpus directories]")
    name = argv.pop(1)
    with atheris.instrument_imports(include=["mailfw"]):
        from tests.fuzz import targets

    if name not in targets.TARGETS:
        raise SystemExit(f"unknown target {name!r}; use one of {', '.join(targets.TARGETS)}")
    targets.prepare()
    target = targets.TARGETS[name]
    failures = targets.checkLogged

    def testOneInput(data: bytes) -> None:
        target(data)
        failures()

    atheris.Setup(argv, testOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
