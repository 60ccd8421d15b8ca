"""Accuracy against inference capacity of a per-token V-MoE (``mobile-vmoe eval --capacity-ratio ...``).

model, checkpoint   what was evaluated (relative to the file inside a moving directory: common.store_paths)
top_k               K at inference
source              the images (a val/ folder or a file list)
points              one per (images per routing group, priority, capacity ratio): top1, top5, the fraction of
                    choices dropped in each MoE block, and P, the buffer slots per expert (``capacity``); files
                    written before groups were swept have neither group_size nor capacity (read: 1 image, 0)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common import UserError, load_paths, read_json, store_paths, write_json_atomic
from ..models.token_moe import PRIORITY_FLAGS

__all__ = ["CapacityCurve", "CurvePoint", "PRIORITIES", "read_capacity_curve", "write_capacity_curve"]

# Batch Priority Routing, tokens in their order, BPR with the class tokens first
PRIORITIES = tuple(PRIORITY_FLAGS)


@dataclass
class CurvePoint:
    priority: str
    capacity_ratio: float
    top1: float
    top5: float
    dropped_fraction: list[float]  # [L] per MoE block
    group_size: int = 1  # images whose tokens are routed together (1: each image alone, as on a phone)
    capacity: int = 0  # P buffer slots per expert for that group; two ratios with one P are one routing


@dataclass
class CapacityCurve:
    model: str
    checkpoint: str
    top_k: int
    source: str
    points: list[CurvePoint] = field(default_factory=list)

    def point(self, priority: str, capacity_ratio: float, group_size: int = 1) -> CurvePoint | None:
        for p in self.points:
            if (
                p.priority == priority
                and p.group_size == group_size
                and abs(p.capacity_ratio - capacity_ratio) < 1e-9
            ):
                return p
        return None

    def top1(self, priority: str, capacity_ratio: float, group_size: int = 1) -> float | None:
        p = self.point(priority, capacity_ratio, group_size)
        return None if p is None else p.top1

    def priorities(self) -> list[str]:
        """The priorities swept, in ``PRIORITIES`` order."""
        return [pr for pr in PRIORITIES if any(p.priority == pr for p in self.points)]

    def group_sizes(self) -> list[int]:
        return sorted({p.group_size for p in self.points})

    def same_routing(self) -> list[tuple[int, list[float], int]]:
        """(group size, ratios from the largest, P) for each buffer that several ratios give: one routing,
        measured once per ratio."""
        ratios: dict[tuple[int, int], list[float]] = {}
        for p in sorted(self.points, key=lambda p: (p.group_size, -p.capacity_ratio)):
            if p.capacity > 0 and p.priority == self.points[0].priority:
                ratios.setdefault((p.group_size, p.capacity), []).append(p.capacity_ratio)
        return [(g, rs, P) for (g, P), rs in ratios.items() if len(rs) > 1]


_PATHS = ("checkpoint", "source")


def write_capacity_curve(path: str | os.PathLike[str], curve: CapacityCurve) -> Path:
    write_json_atomic(path, store_paths(asdict(curve), path, _PATHS))  # relative inside a moving directory
    return Path(path)


def read_capacity_curve(path: str | os.PathLike[str]) -> CapacityCurve:
    obj = read_json(path, "capacity curve")
    obj = load_paths(obj, path, _PATHS) if isinstance(obj, dict) else obj
    try:
        points = [CurvePoint(**p) for p in obj["points"]]
        curve = CapacityCurve(
            model=str(obj["model"]), checkpoint=str(obj["checkpoint"]), top_k=int(obj["top_k"]),
            source=str(obj["source"]), points=points,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{path}: not a capacity curve (expected model, checkpoint, top_k, source, points: {e})"
        ) from None
    bad = [p.priority for p in points if p.priority not in PRIORITIES]
    if bad:
        raise UserError(f"{path}: priority must be one of {PRIORITIES}, got {bad[0]!r}")
    return curve


def plot_rows(curve: CapacityCurve) -> dict[str, list[tuple[float, float]]]:
    """line label -> [(capacity ratio, top-1)], sorted by ratio (what the plot draws): one line per priority,
    and per group size when several were swept."""
    several = len(curve.group_sizes()) > 1
    out: dict[str, list[tuple[float, float]]] = {}
    for p in curve.points:
        label = f"{p.priority}, {p.group_size} image(s)/group" if several else p.priority
        out.setdefault(label, []).append((p.capacity_ratio, p.top1))
    return {k: sorted(v) for k, v in out.items()}
