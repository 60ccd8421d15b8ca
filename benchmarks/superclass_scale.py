"""Super-class discovery at ImageNet-1k size: a planted 1000 x 1000 confusion matrix, partitioned on 2 cores.

    .venv/bin/python benchmarks/superclass_scale.py [--classes 1000] [--groups 10] [--threads 2] [--all]

Goal: the default algorithm partitions 1000 classes into 10 super-classes in under 30 s; prints seconds and the
ARI against the planted groups, for a well-sampled matrix (50 held-out images per class) and a sparse one (13 per
class: ImageNet's 1% held-out split). ``--all`` times every algorithm side by side; ``--outputs`` also times
writing superclasses.json/.png/.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="time every algorithm, not only the default")
    ap.add_argument("--outputs", action="store_true", help="also time writing the json/png/md outputs")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy/scipy load their BLAS

    import numpy as np
    from _common import planted_confusion
    from sklearn.metrics import adjusted_rand_score

    from mobile_vmoe.superclasses import ALGORITHMS, DEFAULT_ALGORITHM, find_superclasses, partition_confusion

    q, r = divmod(args.classes, args.groups)
    sizes = [q + 1] * r + [q] * (args.groups - r)
    regimes = {
        "50 img/class, 25% in-group + 15% other errors": dict(within=0.25, between=0.15, lo=40, hi=60),
        "13 img/class, 25% in-group + 15% other errors": dict(within=0.25, between=0.15, lo=13, hi=13),
    }
    algorithms = ALGORITHMS if args.all else (DEFAULT_ALGORITHM,)
    print(f"{args.classes} classes -> {args.groups} super-classes, {args.threads} threads")
    print("| matrix | algorithm | seconds | ARI | sizes min-max |")
    print("|---|---|---:|---:|---|")
    worst = 0.0
    for label, kw in regimes.items():
        C, truth = planted_confusion(sizes, 0, **kw)
        for alg in algorithms:
            t = time.perf_counter()
            a = partition_confusion(C, args.groups, algorithm=alg, seed=0)
            dt = time.perf_counter() - t
            if alg == DEFAULT_ALGORITHM:
                worst = max(worst, dt)
            s = np.bincount(a)
            print(
                f"| {label} | {alg} | {dt:.2f} | {adjusted_rand_score(truth, a):.3f} | {s.min()}-{s.max()} |"
            )
            sys.stdout.flush()
        if args.outputs:
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                find_superclasses(d, args.groups, confusion=C)
                print(f"find_superclasses with outputs ({label}): {time.perf_counter() - t:.2f} s")
    print(
        f"default ({DEFAULT_ALGORITHM}) worst time {worst:.2f} s: {'PASS' if worst < 30 else 'FAIL'} (< 30 s)"
    )
    return 0 if worst < 30 else 1


if __name__ == "__main__":
    sys.exit(main())
