"""Summarize py-spy raw (collapsed-stack) output: the top functions by own and by inclusive samples.

    python scripts/pyspy_top.py FILE.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(args.path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for frame in set(frames):
                incl[frame] += n
    print(f"{args.path}: {total} samples")
    for title, counter in (("own", own), ("inclusive", incl)):
        print(f"  -- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"  {100 * n / max(total, 1):5.1f}% {frame[:140]}")


if __name__ == "__main__":
    main()
