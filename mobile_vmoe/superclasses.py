"""Super-class discovery: the dense baseline's held-out confusion matrix -> confusion graph -> E super-classes.

Paper recipe (Mobile V-MoE, Sec. 3): classes that the dense model confuses with each other should go to the same
expert, so the classes are grouped by clustering the confusion graph into E balanced super-classes.

    mobile-vmoe superclasses --checkpoint RUN/model.safetensors --num-superclasses 10 --out OUT
    mobile-vmoe superclasses --confusion confusion.npy --num-superclasses 10 --out OUT

Graph: nodes are classes; edge weight between i and j = P[i, j] + P[j, i], where P is the confusion matrix
row-normalised by class frequency (the rate at which class i is predicted as j; ``normalize=False`` keeps raw
counts) with the diagonal removed. A tiny uniform epsilon keeps the graph connected, so classes that are never
confused (or all-zero rows) still get a valid assignment.

Algorithms (``--algorithm``), each followed by the same balancing step:
  spectral           (default) sklearn SpectralClustering on the precomputed affinity. It minimises a
                     normalised cut, which penalises unbalanced groups, takes E directly (modularity methods
                     pick their own number of groups), and needs one sparse eigen-decomposition.
  louvain            networkx louvain_communities, then merged / split to exactly E groups.
  greedy_modularity  networkx greedy_modularity_communities(cutoff=best_n=E); slow beyond a few hundred classes.
  kernighan_lin      recursive networkx kernighan_lin_bisection with sized initial halves (sizes preserved).
Balancing: super-class sizes are always floor(N/E) or ceil(N/E). Classes are assigned to size-limited "slots"
by a min-cost assignment (scipy linear_sum_assignment, cost = -mean affinity of the class to the cluster), so
the classes least attached to an oversized cluster are the ones that move; repeated while it raises the
within-cluster affinity.

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
from typing import Any

import networkx as nx
import numpy as np

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
]

ALGORITHMS = ("spectral", "louvain", "greedy_modularity", "kernighan_lin")
DEFAULT_ALGORITHM = "spectral"
EPSILON = 1e-6  # uniform affinity added (relative to the largest edge) so the graph is connected
MAX_BALANCE_ROUNDS = 20


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _check_num_superclasses(num_superclasses: Any, n: int | None = None) -> int:
    """E must be an integer in [1, n]; with n None (classes not known yet) only its type and E >= 1."""
    ok = not isinstance(num_superclasses, bool) and isinstance(num_superclasses, (int, np.integer))
    if not ok or num_superclasses < 1 or (n is not None and num_superclasses > n):
        classes = "number of classes" + ("" if n is None else f" = {n}")
        raise UserError(f"--num-superclasses must be an integer in [1, {classes}], got {num_superclasses!r}")
    return int(num_superclasses)


# ---------------------------------------------------------------------------------------------------------------
# Graph + partition
# ---------------------------------------------------------------------------------------------------------------


def _affinity(C: np.ndarray, normalize: bool) -> np.ndarray:
    """Symmetric off-diagonal affinity P + P^T, P = C row-normalised (rate of true i predicted as j)."""
    P = np.array(C, dtype=np.float64)
    if normalize:
        rows = P.sum(axis=1, keepdims=True)
        P = np.divide(P, rows, out=np.zeros_like(P), where=rows > 0)
    np.fill_diagonal(P, 0.0)
    return P + P.T


def confusion_graph(C: np.ndarray, normalize: bool = True) -> nx.Graph:
    """Confusion graph: nodes 0..N-1 (classes), edge weight = symmetrised, optionally row-normalised confusion."""
    return nx.from_numpy_array(_affinity(check_counts(C), normalize))


def _with_epsilon(A: np.ndarray) -> np.ndarray:
    """Dense affinity plus a tiny uniform off-diagonal epsilon: connected even for never-confused classes."""
    top = float(A.max())
    eps = EPSILON * top if top > 0 else 1.0
    out = A + eps
    np.fill_diagonal(out, 0.0)
    return out


def _target_sizes(n: int, k: int) -> list[int]:
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def _labels_from_groups(groups: Sequence[Sequence[int]], n: int) -> np.ndarray:
    labels = np.full(n, -1, dtype=np.int64)
    for c, g in enumerate(groups):
        labels[list(g)] = c
    assert (labels >= 0).all()
    return labels


def _within(A: np.ndarray, labels: np.ndarray) -> float:
    return float(A[labels[:, None] == labels[None, :]].sum())


def _kl_split(
    G: nx.Graph, nodes: Sequence[int], n1: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Bisect ``nodes`` into parts of sizes n1 and len(nodes) - n1 with Kernighan-Lin (its pair swaps keep sizes)."""
    nodes = sorted(nodes)
    perm = [nodes[i] for i in rng.permutation(len(nodes))]
    a, b = perm[:n1], perm[n1:]
    if not a or not b:
        return a, b
    p1, p2 = nx.community.kernighan_lin_bisection(
        G.subgraph(nodes), partition=(set(a), set(b)), weight="weight"
    )
    p1, p2 = sorted(p1), sorted(p2)
    return (p1, p2) if len(p1) == n1 else (p2, p1)


def _kernighan_lin(G: nx.Graph, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Recursive bisection into k groups with floor/ceil sizes: halves sized for ceil(k/2) and floor(k/2) groups."""

    def rec(nodes: list[int], k: int) -> list[list[int]]:
        if k == 1:
            return [nodes]
        k1 = (k + 1) // 2
        q, r = divmod(len(nodes), k)
        n1 = k1 * q + min(k1, r)
        a, b = _kl_split(G, nodes, n1, rng)
        return rec(a, k1) + rec(b, k - k1)

    return rec(sorted(G.nodes), k)


def _to_k_groups(
    groups: list[list[int]], k: int, A: np.ndarray, G: nx.Graph, rng: np.random.Generator
) -> list[list[int]]:
    """Merge (average linkage on A) or split (Kernighan-Lin halves of the largest) communities until exactly k."""
    groups = [sorted(g) for g in groups if g]
    if len(groups) > k:
        H = np.zeros((A.shape[0], len(groups)))
        for c, g in enumerate(groups):
            H[g, c] = 1.0
        between = H.T @ A @ H  # summed affinity between communities, updated in place as they merge
        n = H.sum(axis=0)
        while len(groups) > k:
            link = between / np.outer(n, n)  # average linkage
            np.fill_diagonal(link, -np.inf)
            a, b = sorted(np.unravel_index(np.argmax(link), link.shape))
            groups[a] = sorted(groups[a] + groups[b])
            between[a] += between[b]
            between[:, a] += between[:, b]
            n[a] += n[b]
            del groups[b]
            between = np.delete(np.delete(between, b, axis=0), b, axis=1)
            n = np.delete(n, b)
    while len(groups) < k:
        big = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
        g = groups.pop(big)
        groups += list(_kl_split(G, g, len(g) // 2, rng))
    return groups


def _balance(A: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Make sizes floor/ceil(N/k) by min-cost assignment of classes to cluster slots, moving the least-attached.

    Repeated (like balanced k-means) while the within-cluster affinity grows; the first round alone already
    guarantees the sizes.
    """
    from scipy.optimize import linear_sum_assignment

    n = len(labels)
    best, best_score = None, -np.inf
    for _ in range(MAX_BALANCE_ROUNDS):
        sizes = np.bincount(labels, minlength=k)
        onehot = np.zeros((n, k))
        onehot[np.arange(n), labels] = 1.0
        # mean affinity of class i to cluster c (i itself excluded: A has a zero diagonal)
        members = sizes[None, :] - onehot
        aff = (A @ onehot) / np.maximum(members, 1)
        # the currently largest clusters get the ceil(N/k) slots, so the fewest classes move
        order = sorted(range(k), key=lambda c: (-sizes[c], c))
        slot_cluster = np.repeat(order, [s for s in _target_sizes(n, k)])
        rows, cols = linear_sum_assignment(-aff[:, slot_cluster])
        new = np.empty(n, dtype=np.int64)
        new[rows] = slot_cluster[cols]
        score = _within(A, new)
        if score <= best_score + 1e-12 * max(1.0, abs(best_score)):
            break
        best, best_score = new, score
        if np.array_equal(new, labels):
            break
        labels = new
    assert best is not None
    return best


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber super-classes in order of their first class, so equal partitions give equal labels."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[np.searchsorted(np.unique(labels), labels)]


def partition_confusion(
    C: np.ndarray,
    num_superclasses: int,
    algorithm: str = DEFAULT_ALGORITHM,
    seed: int = 0,
    normalize: bool = True,
) -> np.ndarray:
    """Assign each of the N classes of confusion matrix ``C`` (rows = true class) to one of E super-classes.

    Returns int64 [N] with values 0..E-1, sizes floor(N/E) or ceil(N/E), numbered in order of each super-class's
    first class. Deterministic for a fixed seed.
    """
    C = check_counts(C)
    n = C.shape[0]
    k = _check_num_superclasses(num_superclasses, n)
    if algorithm not in ALGORITHMS:
        raise UserError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    A = _affinity(C, normalize)
    A_eps = _with_epsilon(A)
    rng = np.random.default_rng(seed)

    if algorithm == "spectral":
        from sklearn.cluster import SpectralClustering

        # the networkx graph is not needed here: the dense affinity is the graph's weighted adjacency
        sc = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
        )
        labels = sc.fit_predict(A_eps).astype(np.int64)
        groups = [np.flatnonzero(labels == c).tolist() for c in range(k)]
        G = None
    else:
        G = nx.from_numpy_array(A)  # real confusions only: the epsilon would make it complete (N^2/2 edges)
        if algorithm == "louvain":
            groups = [sorted(c) for c in nx.community.louvain_communities(G, weight="weight", seed=seed)]
        elif algorithm == "greedy_modularity":
            groups = [
                sorted(c)
                for c in nx.community.greedy_modularity_communities(G, weight="weight", cutoff=k, best_n=k)
            ]
        else:
            groups = _kernighan_lin(G, k, rng)
    if sum(1 for g in groups if g) != k:
        G = G if G is not None else nx.from_numpy_array(A)
        groups = _to_k_groups(groups, k, A_eps, G, rng)
    labels = _labels_from_groups(groups, n)
    labels = _balance(A_eps, labels, k)
    return _canonical(labels)


def within_mass(C: np.ndarray, assignment: np.ndarray) -> float | None:
    """Share of the off-diagonal confusion mass that stays inside super-classes (None if there is none)."""
    C = np.asarray(C, dtype=np.float64)
    off = C.copy()
    np.fill_diagonal(off, 0.0)
    total = off.sum()
    if total <= 0:
        return None
    a = np.asarray(assignment)
    return float(off[a[:, None] == a[None, :]].sum() / total)


def confusion_warnings(C: np.ndarray, class_names: Sequence[str], num_superclasses: int) -> list[str]:
    """What a partition of ``C`` cannot vouch for: classes without held-out images, a matrix with no confusions."""
    C = np.asarray(C)
    n = C.shape[0]
    if num_superclasses in (1, n):
        return []  # one super-class, or one per class: nothing was chosen
    if not C.any():
        return ["the confusion matrix is all zero (no held-out image was classified): the super-classes are an "
                "arbitrary balanced partition"]  # fmt: skip
    out = []
    empty = [class_names[i] for i in np.flatnonzero(C.sum(axis=1) == 0)]
    if empty:
        shown = ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else "")
        out.append(
            f"{len(empty)} class(es) had no held-out images (too few images to hold any out, or unreadable), "
            f"so their super-class rests on little or no evidence: {shown}"
        )
    if not (C - np.diag(np.diag(C))).any():
        out.append("no held-out image was misclassified (the confusion matrix is diagonal): the super-classes "
                   "are an arbitrary balanced partition")  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _write_plot(path: Path, C: np.ndarray, assignment: np.ndarray, names: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(assignment)
    order = np.lexsort((np.arange(n), assignment))  # by super-class, then class index
    P = _affinity(C, normalize=True) / 2  # off-diagonal rates, symmetric: blocks show on the diagonal
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
        _check_num_superclasses(num_superclasses, n_meta or None)
        conf = heldout_confusion(checkpoint, data_dir, batch_size=batch_size)
        _check_num_superclasses(num_superclasses, len(conf.class_names))
        return conf
    if isinstance(confusion, (str, os.PathLike)):
        C = load_counts(confusion, "--confusion")
    else:
        C = check_counts(confusion)
    n = C.shape[0]
    _check_num_superclasses(num_superclasses, n)
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
    k = _check_num_superclasses(num_superclasses)  # type and >= 1 before any work
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
