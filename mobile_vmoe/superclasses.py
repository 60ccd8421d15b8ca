"""Super-class discovery: the dense baseline's held-out confusion matrix -> confusion graph -> E super-classes.

Paper recipe (Mobile V-MoE, Sec. 3): classes that the dense model confuses with each other should go to the same
expert, so the classes are grouped by clustering the confusion graph into E balanced super-classes.

    mobile-vmoe superclasses --checkpoint RUN/model.safetensors --num-superclasses 10 --out OUT
    mobile-vmoe superclasses --confusion confusion.npy --num-superclasses 10 --out OUT

The graph and the clustering algorithms are in ``mobile_vmoe.clustering``.

A class without held-out images (an all-zero confusion row) still lands in a super-class, and an all-zero or
diagonal matrix still gives a balanced partition, an arbitrary one: both are warned about in the log and in
``SuperclassMap.warnings`` (superclasses.json and .md).

Outputs in --out: superclasses.json (docs/FILES.md), superclasses.png, superclasses.md and, with --checkpoint,
the confusion matrix (confusion.npy / .csv / classes.json, mobile_vmoe.confusion).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .clustering import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    EPSILON,
    affinity,
    check_num_superclasses,
    confusion_graph,
    confusion_warnings,
    partition_confusion,
    within_mass,
)
from .common import UserError, atomic_path, write_text_atomic
from .confusion import Confusion, check_counts, heldout_confusion, load_counts, write_confusion
from .files.superclass_map import SUPERCLASSES_JSON, SuperclassMap, write_superclass_map

log = logging.getLogger(__name__)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "confusion_graph",
    "confusion_warnings",
    "find_superclasses",
    "partition_confusion",
    "within_mass",
]


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _write_plot(path: Path, C: np.ndarray, assignment: np.ndarray, names: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(assignment)
    order = np.lexsort((np.arange(n), assignment))  # by super-class, then class index
    P = affinity(C, normalize=True) / 2  # off-diagonal rates, symmetric: blocks show on the diagonal
    M = P[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    vmax = float(M.max()) if M.max() > 0 else 1.0
    im = ax.imshow(np.sqrt(M), cmap="viridis", vmin=0, vmax=math.sqrt(vmax), interpolation="nearest")
    bounds = np.flatnonzero(np.diff(assignment[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="white", lw=0.8)
        ax.axvline(b, color="white", lw=0.8)
    if n <= 40:
        ax.set_xticks(range(n), [names[i] for i in order], rotation=90, fontsize=6)
        ax.set_yticks(range(n), [names[i] for i in order], fontsize=6)
    ax.set_xlabel("class (ordered by super-class)")
    ax.set_ylabel("class (ordered by super-class)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="sqrt(symmetrised confusion rate)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _markdown(result: SuperclassMap) -> str:
    names, a = result.class_names, result.assignment
    wm = result.within_mass
    lines = [
        "# Super-classes",
        "",
        f"{result.num_superclasses} super-classes of {len(names)} classes; algorithm `{result.algorithm}`; "
        f"within-super-class share of off-diagonal confusion: {'n/a' if wm is None else f'{wm:.3f}'}"
        + (f"; ARI vs truth: {result.ari_vs_truth:.3f}" if result.ari_vs_truth is not None else "")
        + ".",
    ]
    if result.warnings:
        lines += ["", *(f"> **Warning:** {w}" for w in result.warnings)]
    for s in range(result.num_superclasses):
        members = [names[i] for i in range(len(names)) if a[i] == s]
        lines += ["", f"## Super-class {s} ({len(members)} classes)", ""]
        lines += [f"- {m}" for m in members]
    return "\n".join(lines) + "\n"


def _truth_ari(data_dir: Path, names: list[str], assignment: np.ndarray) -> float | None:
    from sklearn.metrics import adjusted_rand_score

    from .data import SUPERCLASSES_TRUE_JSON, load_superclass_truth

    truth = load_superclass_truth(data_dir)
    if truth is None:
        return None
    t_names, t_assign = truth.class_names, truth.assignment
    if sorted(t_names) == sorted(names):
        by_name = dict(zip(t_names, t_assign))
        t = [by_name[c] for c in names]
    elif len(t_assign) == len(names):
        t = list(t_assign)
    else:
        raise UserError(
            f"{data_dir / SUPERCLASSES_TRUE_JSON}: {len(t_assign)} classes, but the confusion "
            f"matrix has {len(names)}"
        )
    return float(adjusted_rand_score(t, assignment))


def _source(
    num_superclasses: int,
    checkpoint: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str] | None,
    confusion: str | os.PathLike[str] | np.ndarray | None,
    class_names: Sequence[str] | None,
    batch_size: int,
) -> Confusion:
    """The confusion matrix to partition: a given one (path or array) or the checkpoint's held-out one."""
    if confusion is None:
        from .checkpoint import read_meta

        n_meta = len(read_meta(checkpoint).class_names)  # E checked before the model runs
        check_num_superclasses(num_superclasses, n_meta or None)
        conf = heldout_confusion(checkpoint, data_dir, batch_size=batch_size)
        check_num_superclasses(num_superclasses, len(conf.class_names))
        return conf
    if isinstance(confusion, (str, os.PathLike)):
        C = load_counts(confusion, "--confusion")
    else:
        C = check_counts(confusion)
    n = C.shape[0]
    check_num_superclasses(num_superclasses, n)
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(n)]
    if len(names) != n:
        raise UserError(f"class_names: {len(names)} names for a {n} x {n} matrix")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data: dataset directory not found: {data_dir}")
    if class_names is None and data_dir is not None:
        from .data import load_superclass_truth

        truth = load_superclass_truth(data_dir)
        if truth is not None and len(truth.class_names) == n:
            names = list(truth.class_names)
    return Confusion(C, names, Path(data_dir) if data_dir is not None else None)


def _write_outputs(out_dir: Path, conf: Confusion, result: SuperclassMap, with_confusion: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if with_confusion:
        write_confusion(out_dir, conf)
    title = f"{result.num_superclasses} super-classes ({result.algorithm})" + (
        f", ARI vs truth {result.ari_vs_truth:.3f}" if result.ari_vs_truth is not None else ""
    )
    assignment = np.asarray(result.assignment)
    _write_plot(out_dir / "superclasses.png", conf.counts, assignment, conf.class_names, title)
    write_text_atomic(out_dir / "superclasses.md", _markdown(result))
    write_superclass_map(out_dir / SUPERCLASSES_JSON, result)  # last: its presence means the stage finished


def find_superclasses(
    out_dir: str | os.PathLike[str],
    num_superclasses: int,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    confusion: str | os.PathLike[str] | np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
    seed: int = 0,
    normalize: bool = True,
    batch_size: int = 256,
) -> SuperclassMap:
    """Discover super-classes and write superclasses.json / .png / .md (and the confusion matrix) to out_dir.

    Give either ``checkpoint`` (a dense model; its held-out split is run to get the confusion matrix) or
    ``confusion`` (an N x N count matrix or a .npy path). ``data_dir`` overrides the checkpoint's dataset
    directory; with ``confusion`` it is only used to find ``superclasses_true.json``. Returns what it wrote.
    """
    if (checkpoint is None) == (confusion is None):
        raise UserError(
            "give exactly one of --checkpoint (a dense model) or --confusion (an N x N .npy matrix)"
        )
    if algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    k = check_num_superclasses(num_superclasses)  # type and >= 1 before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")
    conf = _source(k, checkpoint, data_dir, confusion, class_names, batch_size)

    assignment = partition_confusion(conf.counts, k, algorithm=algorithm, seed=seed, normalize=normalize)
    result = SuperclassMap(
        assignment=[int(a) for a in assignment],
        class_names=conf.class_names,
        algorithm=algorithm,
        params={"seed": seed, "normalize": normalize, "epsilon": EPSILON, "balance": "linear_sum_assignment"},
        within_mass=within_mass(conf.counts, assignment),
        warnings=confusion_warnings(conf.counts, conf.class_names, k),
    )
    for w in result.warnings:
        log.warning("super-classes: %s", w)
    if checkpoint is not None:
        result.params["checkpoint"] = str(checkpoint)
    if conf.data_dir is not None:
        result.ari_vs_truth = _truth_ari(conf.data_dir, conf.class_names, assignment)
    _write_outputs(out_dir, conf, result, with_confusion=checkpoint is not None)
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    res = find_superclasses(
        args.out,
        args.num_superclasses,
        checkpoint=args.checkpoint,
        data_dir=args.data,
        confusion=args.confusion,
        algorithm=args.algorithm,
        seed=args.seed,
        normalize=not args.no_normalize,
        batch_size=args.batch_size,
    )
    wm = res.within_mass
    msg = f"{args.out}/{SUPERCLASSES_JSON}: sizes {res.sizes}, within-super-class confusion " + (
        "n/a" if wm is None else f"{wm:.3f}"
    )
    if res.ari_vs_truth is not None:
        msg += f", ARI vs truth {res.ari_vs_truth:.3f}"
    print(msg)
    for w in res.warnings:
        print(f"warning: {w}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "superclasses",
        help="group classes into E super-classes from the dense model's held-out confusion matrix",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="dense model (.safetensors or run dir); its held-out split is evaluated"
    )
    src.add_argument("--confusion", help="N x N count matrix (.npy; rows = true class, columns = predicted)")
    p.add_argument(
        "--data", default=None, help="dataset dir (default: the dataset the checkpoint was trained on)"
    )
    p.add_argument("--num-superclasses", "-E", type=int, required=True, help="E, the number of super-classes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=DEFAULT_ALGORITHM,
        help=f"graph partitioning algorithm (default: {DEFAULT_ALGORITHM})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-normalize", action="store_true", help="use raw confusion counts instead of per-class rates"
    )
    p.add_argument("--batch-size", type=int, default=256, help="inference batch size (--checkpoint)")
    p.set_defaults(func=_cli)
