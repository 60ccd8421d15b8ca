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
                     pick their own number of groups), and needs one sparse eigen-decomposition: 1000 classes
                     take about a second. It recovered planted partitions best in tests/test_superclasses.py.
  louvain            networkx louvain_communities, then merged / split to exactly E groups.
  greedy_modularity  networkx greedy_modularity_communities(cutoff=best_n=E); slow beyond a few hundred classes.
  kernighan_lin      recursive networkx kernighan_lin_bisection with sized initial halves (sizes preserved).
Balancing: super-class sizes are always floor(N/E) or ceil(N/E). Classes are assigned to size-limited "slots"
by a min-cost assignment (scipy linear_sum_assignment, cost = -mean affinity of the class to the cluster), so
the classes least attached to an oversized cluster are the ones that move; repeated while it raises the
within-cluster affinity.

Outputs in --out: superclasses.json (docs/FILES.md), superclasses.png, superclasses.md and, with --checkpoint,
confusion.npy + confusion.csv.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from .common import UserError, atomic_path, write_text_atomic
from .files.superclass_map import SUPERCLASSES_JSON, SuperclassMap, write_superclass_map

log = logging.getLogger(__name__)

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "confusion_graph", "find_superclasses", "partition_confusion"]

ALGORITHMS = ("spectral", "louvain", "greedy_modularity", "kernighan_lin")
DEFAULT_ALGORITHM = "spectral"
EPSILON = 1e-6  # uniform affinity added (relative to the largest edge) so the graph is connected
MAX_BALANCE_ROUNDS = 20


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _check_confusion(C: Any, what: str = "confusion matrix") -> np.ndarray:
    """A finite, non-negative, numeric square matrix as float64, else UserError naming ``what``."""
    C = np.asarray(C)
    if C.dtype.kind not in "iuf":
        raise UserError(f"{what}: expected a numeric (integer or float) matrix, got dtype {C.dtype}")
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
        raise UserError(f"{what}: expected a square N x N matrix (rows = true class), got shape {C.shape}")
    C = C.astype(np.float64)
    if not np.isfinite(C).all():
        raise UserError(f"{what}: holds NaN or infinite values")
    if (C < 0).any():
        raise UserError(f"{what}: holds negative counts (e.g. {C.min():g}); expected counts >= 0")
    return C


def _check_num_superclasses(num_superclasses: Any, n: int) -> int:
    if isinstance(num_superclasses, bool) or not isinstance(num_superclasses, (int, np.integer)):
        raise UserError(f"num_superclasses: expected an integer, got {num_superclasses!r}")
    if not 1 <= num_superclasses <= n:
        raise UserError(
            f"num_superclasses: must be between 1 and the number of classes N={n}, got {num_superclasses}"
        )
    return int(num_superclasses)


def load_confusion(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an N x N count matrix from a .npy file (no pickles)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--confusion: file not found: {p}")
    try:
        C = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"--confusion {p}: not a readable numeric .npy file ({e})") from None
    if not isinstance(C, np.ndarray):  # an .npz archive
        raise UserError(f"--confusion {p}: expected a single .npy array, got an archive")
    return _check_confusion(C, f"--confusion {p}")


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


def planted_confusion(
    sizes: Sequence[int],
    seed: int = 0,
    within: float = 0.25,
    between: float = 0.15,
    lo: int = 20,
    hi: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic confusion matrix with known super-classes (for tests and benchmarks): (C [N, N], truth [N]).

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


def confusion_graph(C: np.ndarray, normalize: bool = True) -> nx.Graph:
    """Confusion graph: nodes 0..N-1 (classes), edge weight = symmetrised, optionally row-normalised confusion."""
    return nx.from_numpy_array(_affinity(_check_confusion(C), normalize))


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
    C = _check_confusion(C)
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


# ---------------------------------------------------------------------------------------------------------------
# Confusion matrix from a dense checkpoint
# ---------------------------------------------------------------------------------------------------------------


def heldout_confusion(
    checkpoint: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[np.ndarray, list[str], Path]:
    """Run the dense model on its held-out split: ``(C [N, N] counts, class_names, data_dir)``."""
    import torch
    from sklearn.metrics import confusion_matrix

    from .checkpoint import load_model, resolve_model_file
    from .data import ImageListDataset, collate_skip_bad
    from .files.file_list import read_file_list

    ckpt_file = resolve_model_file(checkpoint)
    model, meta = load_model(ckpt_file, expect_moe=False)
    if data_dir is None:
        if not meta.train.data_dir:
            raise UserError(f"{ckpt_file}: metadata train.data_dir is missing; pass --data DIR")
        data_dir = meta.train.data_dir
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"dataset directory not found: {data_dir} (from --data or the dataset the checkpoint was trained on)"
        )
    if not meta.train.heldout_list or not Path(meta.train.heldout_list).is_file():
        raise UserError(
            f"{ckpt_file}: held-out list not found ({meta.train.heldout_list}); the super-class stage needs "
            f"the held-out split written by training"
        )
    samples = read_file_list(meta.train.heldout_list, data_dir)
    names = list(meta.class_names) or [f"class_{i}" for i in range(model.num_classes)]
    n = len(names)
    if n != model.num_classes:
        raise UserError(f"{ckpt_file}: {n} class_names but the model has {model.num_classes} outputs")
    if not samples:
        raise UserError(f"{ckpt_file}: the held-out list is empty")
    bad = [s for s in samples if s.target >= n]
    if bad:
        raise UserError(
            f"held-out list: class index {bad[0].target} ({bad[0].path}) >= number of classes {n}"
        )

    loader = torch.utils.data.DataLoader(
        ImageListDataset(data_dir, samples, meta.preprocess.transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
    )
    y_true, y_pred, skipped = [], [], 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(device)
    with torch.inference_mode():
        for images, targets, n_bad in loader:
            skipped += n_bad
            if len(targets) == 0:
                continue
            y_pred.append(model(images.to(device)).argmax(dim=1).cpu().numpy())
            y_true.append(targets.numpy())
    if skipped:
        log.warning("skipped %d unreadable held-out image(s)", skipped)
    if not y_true:
        raise UserError(f"none of the {len(samples)} held-out images could be read under {data_dir}")
    yt, yp = np.concatenate(y_true), np.concatenate(y_pred)
    C = confusion_matrix(yt, yp, labels=list(range(n)))
    log.info("held-out accuracy %.4f on %d images", float((yt == yp).mean()), len(yt))
    return C, names, data_dir


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _write_confusion(out_dir: Path, C: np.ndarray, names: list[str]) -> None:
    with atomic_path(out_dir / "confusion.npy", suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, C, allow_pickle=False)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true \\ predicted", *names])
    for name, row in zip(names, C):
        w.writerow([name, *(int(v) if float(v).is_integer() else float(v) for v in row)])
    write_text_atomic(out_dir / "confusion.csv", buf.getvalue())


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
    """Discover super-classes and write superclasses.json / .png / .md (and confusion.npy / .csv) to out_dir.

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
    _check_num_superclasses(num_superclasses, 1 << 62)  # type and >= 1 before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a directory")

    if confusion is not None:
        C = (
            load_confusion(confusion)
            if isinstance(confusion, (str, os.PathLike))
            else _check_confusion(confusion)
        )
        _check_num_superclasses(num_superclasses, C.shape[0])
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(C.shape[0])]
        if len(names) != C.shape[0]:
            raise UserError(f"class_names: {len(names)} names for a {C.shape[0]} x {C.shape[0]} matrix")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise UserError(f"--data: dataset directory not found: {data_dir}")
        if class_names is None and data_dir is not None:
            from .data import load_superclass_truth

            truth = load_superclass_truth(data_dir)
            if truth is not None and len(truth.class_names) == C.shape[0]:
                names = list(truth.class_names)
        write_conf = False
    else:
        from .checkpoint import read_meta

        n_meta = len(read_meta(checkpoint).class_names)
        if n_meta:
            _check_num_superclasses(num_superclasses, n_meta)
        C, names, data_dir = heldout_confusion(checkpoint, data_dir, batch_size=batch_size)
        C = np.asarray(C)
        write_conf = True

    assignment = partition_confusion(C, num_superclasses, algorithm=algorithm, seed=seed, normalize=normalize)
    k = int(num_superclasses)
    result = SuperclassMap(
        assignment=[int(a) for a in assignment],
        class_names=names,
        algorithm=algorithm,
        params={"seed": seed, "normalize": normalize, "epsilon": EPSILON, "balance": "linear_sum_assignment"},
        within_mass=within_mass(C, assignment),
    )
    if checkpoint is not None:
        result.params["checkpoint"] = str(checkpoint)
    if data_dir is not None:
        result.ari_vs_truth = _truth_ari(Path(data_dir), names, assignment)

    out_dir.mkdir(parents=True, exist_ok=True)
    if write_conf:
        _write_confusion(out_dir, C, names)
    title = f"{k} super-classes ({algorithm})" + (
        f", ARI vs truth {result.ari_vs_truth:.3f}" if result.ari_vs_truth is not None else ""
    )
    _write_plot(out_dir / "superclasses.png", C, assignment, names, title)
    write_text_atomic(out_dir / "superclasses.md", _markdown(result))
    write_superclass_map(out_dir / SUPERCLASSES_JSON, result)  # last: its presence means the stage finished
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
    p.add_argument("--data", default=None, help="dataset dir (default: the checkpoint's extra.data_dir)")
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
