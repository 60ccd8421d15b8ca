"""Inference routing of a per-token V-MoE: capacity ratio, priority (BPR, vanilla, BPR with the class token
first), K and the images routed together, changed without retraining, and the accuracy vs capacity curve
(``mobile-vmoe eval --capacity-ratio 1 0.5 0.25 --group-size 1 8 --json C.json``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .common import UserError, atomic_path
from .files.capacity_curve import PRIORITIES, CapacityCurve, CurvePoint, plot_rows, write_capacity_curve
from .models.token_moe import PRIORITY_FLAGS, priority_flags

log = logging.getLogger(__name__)

__all__ = ["EVAL_BATCH_SIZE", "InferenceRouting", "apply_routing", "capacity_curve", "plot_capacity_curve"]

# Images per evaluation batch unless told otherwise (``evaluate``, ``capacity_curve``, ``mobile-vmoe eval``):
# with per-token routing a batch routes whole groups, so a group size must divide it
EVAL_BATCH_SIZE = 256


class InferenceRouting(NamedTuple):
    """A per-token V-MoE's inference routing; None keeps the model's own value."""

    capacity_ratio: float | None = None
    priority: str | None = None  # one of PRIORITIES
    top_k: int | None = None
    group_size: int | None = None  # images whose tokens are routed together (eval_group_size)


def apply_routing(model: torch.nn.Module, routing: InferenceRouting, where: Path) -> None:
    if getattr(model, "moe_routing", None) != "token":
        if any(v is not None for v in routing):
            raise UserError(
                f"{where}: --capacity-ratio, --priority, --top-k and --group-size apply to per-token V-MoE models "
                f"(mobile_vmoe_token_*), not to {type(model).__name__}"
            )
        return
    ratio, priority, top_k, group = routing
    if priority is not None and priority not in PRIORITY_FLAGS:
        raise UserError(f"{where}: --priority must be one of {PRIORITIES}, got {priority!r}")
    bpr, cls_first = priority_flags(priority)
    try:
        model.set_routing(ratio, bpr, top_k, group, cls_first)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def capacity_curve(
    checkpoint: str | os.PathLike[str],
    capacity_ratios: list[float],
    priorities: Sequence[str] | None = None,
    top_k: int | None = None,
    json_out: str | os.PathLike[str] | None = None,
    group_sizes: Sequence[int] = (1,),
    **data: Any,
) -> CapacityCurve:
    """Top-1 of a per-token V-MoE at each inference capacity ratio and priority (``PRIORITIES``; None: each
    that applies to the model), for each number of images routed together, on one set of images loaded once;
    writes the curve (JSON) and its plot (PNG beside it) to ``json_out``."""
    bad = [p for p in priorities or () if p not in PRIORITIES]
    if bad or (priorities is not None and not priorities):
        raise UserError(f"--priority must be among {PRIORITIES}, got {priorities}")
    if not capacity_ratios or any(not r > 0 for r in capacity_ratios):
        raise UserError(f"--capacity-ratio needs values > 0, got {capacity_ratios}")
    if not group_sizes or any(g < 1 for g in group_sizes):
        raise UserError(f"--group-size needs values >= 1, got {list(group_sizes)}")
    batch = int(data.get("batch_size", EVAL_BATCH_SIZE))
    bad_groups = [g for g in group_sizes if batch % g]
    if bad_groups:  # checked here for all of them, before any image is read
        raise UserError(f"--group-size {bad_groups[0]} must divide --batch-size {batch}")
    from .evaluate import prepare_evaluation, run_counts, summarize_counts

    ev = prepare_evaluation(checkpoint, routing=InferenceRouting(top_k=top_k), **data)
    if priorities is None:  # bpr_cls needs a class token
        has_cls = all(mlp.prefix_tokens for mlp in ev.model.moe_mlps())
        priorities = [p for p in PRIORITIES if has_cls or not PRIORITY_FLAGS[p][1]]
    curve = CapacityCurve(ev.meta.model, str(ev.ckpt), int(top_k or ev.model.top_k), ev.images.source)
    for group in group_sizes:
        for priority in priorities:
            for ratio in capacity_ratios:
                apply_routing(ev.model, InferenceRouting(ratio, priority, top_k, group), ev.ckpt)
                s = summarize_counts(run_counts(ev))
                P = ev.model.expert_capacity(ratio, group)
                curve.points.append(
                    CurvePoint(priority, float(ratio), s["top1"], s["top5"], s["dropped_fraction"], group, P)
                )
                log.info("%d image(s)/group, %s, capacity %g (P=%d): top-1 %.4f", group, priority, ratio, P,
                         s["top1"])  # fmt: skip
    for group, ratios, P in curve.same_routing():
        log.warning(
            "capacity ratios %s give the same buffer with %d image(s) per group (P=%d slots per expert): one "
            "routing measured %d times; route more images together (--group-size) or use more tokens per image",
            ", ".join(f"{r:g}" for r in ratios), group, P, len(ratios),
        )  # fmt: skip
    if json_out is not None:
        write_capacity_curve(json_out, curve)
        plot_capacity_curve(curve, Path(json_out).with_suffix(".png"))
    return curve


def plot_capacity_curve(curve: CapacityCurve, path: Path) -> Path:
    """Top-1 against capacity ratio, one line per priority."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for priority, pts in plot_rows(curve).items():
        ax.plot([r for r, _ in pts], [100 * t for _, t in pts], marker="o", label=priority)
    ax.set_xscale("log")
    ax.set_xlabel("inference capacity ratio")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{curve.model}, K={curve.top_k}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
