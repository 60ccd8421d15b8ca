"""Test data and helpers shared by tests and benchmarks: planted confusion matrices, tiny ImageFolder datasets, a
held pipeline lock.

Benchmarks import it through benchmarks/_common.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def planted_confusion(
    sizes: Sequence[int],
    seed: int = 0,
    within: float = 0.25,
    between: float = 0.15,
    lo: int = 20,
    hi: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic confusion matrix with known super-classes: (C [N, N] counts, truth [N]).

    Counts from a planted partition: each class keeps 1 - within - between of its images, loses `within` to
    its own group and `between` to the other groups (random spreads); random class frequencies, shuffled order."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)[rng.permutation(sum(sizes))]
    n = len(truth)
    C = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        same = np.flatnonzero((truth == truth[i]) & (np.arange(n) != i))
        other = np.flatnonzero(truth != truth[i])
        p = np.zeros(n)
        p[i] = 1 - within - between
        p[same] = within * rng.dirichlet(np.ones(len(same)))
        p[other] = between * rng.dirichlet(np.ones(len(other)))
        C[i] = rng.multinomial(rng.integers(lo, hi + 1), p)
    return C, truth


def image_folder(
    root: Path, train: dict[str, int], val: dict[str, int] | None = None, size: int = 16
) -> Path:
    """A user's ImageFolder dataset: ``root/train/<class>/<i>.png`` (and val/) of random colour images.

    Each class gets its own mean colour, so a model can learn something in a few steps."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for split, counts in (("train", train), ("val", val or {})):
        for c, (name, n) in enumerate(sorted(counts.items())):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256])
            for i in range(n):
                img = np.clip(base + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def hold_lock(out: Path):
    """Another process holding a pipeline directory's lock, as a second pipeline run would (kill it after)."""
    code = (
        "import sys, time; from pathlib import Path; from mobile_vmoe.pipeline_dir import locked\n"
        "with locked(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder
