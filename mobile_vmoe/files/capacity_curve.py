"""Accuracy against inference capacity of a per-token V-MoE (``mobile-vmoe eval --capacity-ratio ...``).

model, checkpoint   what was evaluated (relative to the file inside a moving directory: common.store_paths)
top_k               K at inference
source              the images (a val/ folder or a file list)
points              one per (priority, capacity ratio): top1, top5, and the fraction of choices dropped in
                    each MoE block
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common import UserError, load_paths, read_json, store_paths, write_json_atomic

__all__ = ["CapacityCurve", "CurvePoint", "PRIORITIES", "read_capacity_curve", "write_capacity_curve"]

PRIORITIES = ("bpr", "vanilla")  # Batch Priority Routing, or tokens in their order


@dataclass
class CurvePoint:
    priority: str
    capacity_ratio: float
    top1: float
    top5: float
    dropped_fraction: list[float]  # [L] per MoE block


@dataclass
class CapacityCurve:
    model: str
    checkpoint: str
    top_k: int
    source: str
    points: list[CurvePoint] = field(default_factory=list)

    def top1(self, priority: str, capacity_ratio: float) -> float | None:
        for p in self.points:
            if p.priority == priority and abs(p.capacity_ratio - capacity_ratio) < 1e-9:
                return p.top1
        return None


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
    """priority -> [(capacity ratio, top-1)], sorted by ratio (what the plot draws)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for p in curve.points:
        out.setdefault(p.priority, []).append((p.capacity_ratio, p.top1))
    return {k: sorted(v) for k, v in out.items()}
