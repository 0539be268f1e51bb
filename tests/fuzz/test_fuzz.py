"""
The fuzz targets of L{tests.fuzz.targets}, two ways:

  - every input of the seed corpus (C{corpus/TARGET/}) and every input that
    once broke something (C{regressions/TARGET/}) is replayed in process,
    in the ordinary unit test run;
  - each target is fuzzed by atheris (coverage-guided libFuzzer) for
    C{MAILFW_FUZZ_SECONDS} (default 10) seconds, two targets at a time, in
    child processes started from the seed corpus.  CI runs this short
    round; docs/reliability.rst describes the long run.

A crash fails the test with the target's name, the input and atheris's
report; the input then belongs in C{regressions/TARGET/}, and the bug gets
its fix.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.targets import TARGETS, runOne

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"
ROOT = HERE.parent.parent


def inputsOf(target: str) -> list[Path]:
    return sorted(
        path for base in (CORPUS, REGRESSIONS) for path in (base / target).glob("*") if path.is_file()
    )


class ReplayTests(SynchronousTestCase):
    """
    The seed corpus and the regression inputs, through every target.
    """

    def test_everyTargetHasSeeds(self) -> None:
        """
        Each target starts from a seed corpus of its own.
        """
        for target in TARGETS:
            self.assertTrue(list((CORPUS / target).glob("*")), f"no seed corpus for {target}")

    def test_replay(self) -> None:
        """
        No saved input makes a target fail.
        """
        for target in TARGETS:
            for path in inputsOf(target):
                try:
                    runOne(target, path.read_bytes())
                except Exception as e:
                    self.fail(f"{target} fails on {path.relative_to(ROOT)}: {e!r}")


def _fuzz(target: str, seconds: int, scratch: Path) -> tuple[str, int, str]:
    """
    Fuzz C{target} for C{seconds} in a child process.

    @return: the target, the exit status and atheris's output.
    """
    grown = scratch / target
    grown.mkdir()
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        target,
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=1536",
        "-max_len=4096",
        f"-artifact_prefix={scratch}/{target}-",
        str(grown),
        str(CORPUS / target),
        *([str(REGRESSIONS / target)] if (REGRESSIONS / target).is_dir() else []),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=seconds + 120,
    )
    return target, result.returncode, result.stdout + result.stderr


def test_fuzzTargets() -> None:
    """
    atheris finds no crash, no broken invariant and no input slower than
    10 s in any target within its time.
    """
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is not installed; the test extra must install it")
        pytest.skip("atheris is not installed (pip install atheris)")
    seconds = int(os.environ.get("MAILFW_FUZZ_SECONDS", "10"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mailfw-fuzz-") as name:
        scratch = Path(name)
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda t: _fuzz(t, seconds, scratch), TARGETS))
        failures = []
        print(f"\nfuzzing {len(TARGETS)} targets for {seconds} s each:")
        for target, status, output in results:
            runs = re.findall(r"Done (\d+) runs in (\d+) second", output)
            coverage = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", output)
            stats = f"{runs[-1][0]} runs" if runs else "no summary"
            if coverage:
                stats += f", coverage {coverage[-1][0]} edges, {coverage[-1][1]} features, corpus {coverage[-1][2]}"
            print(f"  {target}: exit {status}, {stats}")
            if status != 0:
                artifacts = sorted(scratch.glob(f"{target}-*"))
                found = artifacts[0].read_bytes()[:2000] if artifacts else b"(no artifact)"
                failures.append(
                    f"fuzz target {target!r} failed (exit {status}) on input {found!r};"
                    f" add it to tests/fuzz/regressions/{target}/ and fix the bug:\n{output[-4000:]}"
                )
        print(f"  total {time.monotonic() - started:.0f} s")
    assert not failures, "\n\n".join(failures)
