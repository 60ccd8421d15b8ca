"""Clustering a confusion matrix into E balanced super-classes (the super-class stage's maths).

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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import networkx as nx
import numpy as np

from .common import UserError
from .confusion import check_counts

log = logging.getLogger(__name__)

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "confusion_graph", "confusion_warnings", "partition_confusion",
           "within_mass"]  # fmt: skip

ALGORITHMS = ("spectral", "louvain", "greedy_modularity", "kernighan_lin")
DEFAULT_ALGORITHM = "spectral"
EPSILON = 1e-6  # uniform affinity added (relative to the largest edge) so the graph is connected
MAX_BALANCE_ROUNDS = 20


def check_num_superclasses(num_superclasses: Any, n: int | None = None) -> int:
    """E must be an integer in [1, n]; with n None (classes not known yet) only its type and E >= 1."""
    ok = not isinstance(num_superclasses, bool) and isinstance(num_superclasses, (int, np.integer))
    if not ok or num_superclasses < 1 or (n is not None and num_superclasses > n):
        classes = "number of classes" + ("" if n is None else f" = {n}")
        raise UserError(f"--num-superclasses must be an integer in [1, {classes}], got {num_superclasses!r}")
    return int(num_superclasses)


# ---------------------------------------------------------------------------------------------------------------
# Graph + partition
# ---------------------------------------------------------------------------------------------------------------


def affinity(C: np.ndarray, normalize: bool) -> np.ndarray:
    """Symmetric off-diagonal affinity P + P^T, P = C row-normalised (rate of true i predicted as j)."""
    P = np.array(C, dtype=np.float64)
    if normalize:
        rows = P.sum(axis=1, keepdims=True)
        P = np.divide(P, rows, out=np.zeros_like(P), where=rows > 0)
    np.fill_diagonal(P, 0.0)
    return P + P.T


def confusion_graph(C: np.ndarray, normalize: bool = True) -> nx.Graph:
    """Confusion graph: nodes 0..N-1 (classes), edge weight = symmetrised, optionally row-normalised confusion."""
    return nx.from_numpy_array(affinity(check_counts(C), normalize))


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
    k = check_num_superclasses(num_superclasses, n)
    if algorithm not in ALGORITHMS:
        raise UserError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    A = affinity(C, normalize)
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
