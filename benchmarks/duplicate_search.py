"""How long `imagegen inspect`'s near-duplicate search takes (output/duplicates.near_groups)
on random 64-bit perceptual hashes, 1% of them near copies of another, at the default
distance. The figure README.md and output/duplicates.py quote.

    .venv/bin/python benchmarks/duplicate_search.py [--images 100000 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.output.duplicates import DEFAULT_DISTANCE, near_groups  # noqa: E402


def hashes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    copies = n // 100
    h[:copies] = h[rng.integers(0, n, size=copies)] ^ (np.uint64(1) << rng.integers(0, 64, size=copies).astype(np.uint64))
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    for n in args.images:
        h = hashes(n)
        start = time.perf_counter()
        groups = near_groups(h, DEFAULT_DISTANCE)
        print(f"{n} images: {time.perf_counter() - start:.2f} s, {len(np.unique(groups))} groups", flush=True)


if __name__ == "__main__":
    main()
