"""Do super-classes found from a trained dense baseline's held-out confusion match the true ones?

    .venv/bin/python benchmarks/superclass_recovery.py [--work bench_runs/superclass_recovery] [--config synthetic]
        [--run RUN]   # reuse a finished run directory instead of training

Drives the real CLI in subprocesses, as a user would:
    mobile-vmoe train --config synthetic --dataset synthetic --out RUN
    mobile-vmoe superclasses --checkpoint RUN/model.safetensors --num-superclasses 10 --out OUT
then compares OUT/superclasses.json with the dataset's superclasses_true.json (the dataset directory is the
checkpoint's metadata train.data_dir). Goal: ARI >= 0.8 for the default algorithm. The other algorithms are
run on the same confusion matrix (--confusion OUT/confusion.npy) for a side-by-side comparison.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

GOAL = 0.8


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "mobile_vmoe.cli", *args]
    print("$ mobile-vmoe " + " ".join(args), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise SystemExit(f"command failed with exit code {r.returncode}: {' '.join(cmd)}")
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_runs/superclass_recovery", help="where runs and outputs go")
    ap.add_argument("--config", default="synthetic", help="training preset (synthetic | quick | FILE.yaml)")
    ap.add_argument("--run", default=None, help="an existing run directory: skip training")
    ap.add_argument("--num-superclasses", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from mobile_vmoe.checkpoint import read_meta
    from mobile_vmoe.data import load_superclass_truth
    from mobile_vmoe.files.superclass_map import SUPERCLASSES_JSON, read_superclass_map
    from mobile_vmoe.superclasses import ALGORITHMS, DEFAULT_ALGORITHM

    work = Path(args.work)
    run = Path(args.run) if args.run else work / "run"
    if not (run / "model.safetensors").is_file():
        _cli("train", "--config", args.config, "--dataset", "synthetic", "--out", str(run))
    ckpt = run / "model.safetensors"
    data_dir = Path(read_meta(ckpt).train.data_dir)
    truth = load_superclass_truth(data_dir)
    E = str(args.num_superclasses)

    results = {}
    out = work / f"superclasses_{DEFAULT_ALGORITHM}"
    _cli("superclasses", "--checkpoint", str(ckpt), "--num-superclasses", E, "--out", str(out),
         "--seed", str(args.seed))  # fmt: skip
    results[DEFAULT_ALGORITHM] = read_superclass_map(out / SUPERCLASSES_JSON)
    C = np.load(out / "confusion.npy")
    for alg in ALGORITHMS:
        if alg == DEFAULT_ALGORITHM:
            continue
        o = work / f"superclasses_{alg}"
        _cli("superclasses", "--confusion", str(out / "confusion.npy"), "--num-superclasses", E, "--out", str(o),
             "--algorithm", alg, "--seed", str(args.seed))  # fmt: skip
        results[alg] = read_superclass_map(o / SUPERCLASSES_JSON)

    by_name = dict(zip(truth.class_names, truth.assignment))
    t = [by_name[c] for c in results[DEFAULT_ALGORITHM].class_names]
    off = C.sum() - np.trace(C)
    print(
        f"\nheld-out images: {int(C.sum())}, accuracy {np.trace(C) / C.sum():.3f}, off-diagonal counts {int(off)}"
    )
    ideal = np.array(t)
    true_within = C[ideal[:, None] == ideal[None, :]].sum() - np.trace(C)
    print(f"share of confusions inside the TRUE super-classes: {true_within / max(off, 1):.3f}")
    print("| algorithm | ARI vs true super-classes | within-super-class confusion share | sizes |")
    print("|---|---:|---:|---|")
    for alg, res in results.items():
        ari = adjusted_rand_score(t, res.assignment)
        wm = res.within_mass
        print(f"| {alg} | {ari:.3f} | {'n/a' if wm is None else f'{wm:.3f}'} | {res.sizes} |")
    ari = adjusted_rand_score(t, results[DEFAULT_ALGORITHM].assignment)
    print(
        f"default ({DEFAULT_ALGORITHM}) ARI {ari:.3f}: {'PASS' if ari >= GOAL else 'FAIL'} (goal >= {GOAL})"
    )
    return 0 if ari >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
