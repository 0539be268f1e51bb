"""
Summarise a py-spy "raw" (collapsed stacks) profile: the functions that
take the most samples by themselves (self) and including their callees
(inclusive), as shares of all samples.

Usage::

    python benchmarks/pyspy_summary.py PROFILE.txt [--top 25] [--match TEXT]

C{accept.py --py-spy FILE.txt} writes such profiles of mailfw.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence

# py-spy frames look like "function (path/to/file.py:123)"; the line
# number is dropped so that one function is one entry.
_LINE = re.compile(r":\d+\)$")


def _frame(text: str) -> str:
    return _LINE.sub(")", text.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--match", default=None, help="only count stacks containing this text (e.g. a thread's entry point)"
    )
    args = parser.parse_args(argv)

    selfSamples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if args.match and args.match not in stack:
                continue
            n = int(count)
            frames = [_frame(x) for x in stack.split(";")]
            total += n
            selfSamples[frames[-1]] += n
            for name in set(frames):
                inclusive[name] += n
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples")
    print("\nself:")
    for name, n in selfSamples.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive:")
    for name, n in inclusive.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
