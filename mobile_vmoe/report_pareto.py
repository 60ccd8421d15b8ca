"""The report's "Accuracy vs latency" section: every model's fp32 ``.pte`` as a point (x: host latency p50, y: top-1),
the per-token V-MoE once per exported inference capacity, and the points on the Pareto front marked.

Top-1 is the eager model's on the validation split: the eval stage's for a model as exported with its own
routing, the eval capacity curve's (``files.capacity_curve``) at the export's capacity ratio and priority (its
sidecar, ``files.sidecar``) for the pipeline's ``vmoe_c<ratio>.pte``. Latency is the bench stage's result
(``bench.schema``). Nothing here is measured: every number comes from those files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .bench.schema import ingest_result
from .common import atomic_path
from .files.capacity_curve import CapacityCurve, read_capacity_curve
from .files.sidecar import find_sidecar
from .pipeline_dir import capacity_export_name

__all__ = ["ParetoPoint", "pareto_front", "pareto_points", "pareto_section"]

LABELS = {"dense": "dense", "moe": "per-image MoE", "vmoe": "per-token V-MoE"}
MARKERS = {"dense": "s", "moe": "^", "vmoe": "o"}


class ParetoPoint(NamedTuple):
    model: str  # dense | moe | vmoe
    artifact: str  # the .pte's file name under OUT/export/
    capacity_ratio: float | None  # a per-token model's inference capacity (its sidecar); None otherwise
    priority: str | None  # a per-token model's priority (token_moe.PRIORITY_FLAGS)
    p50_ms: float
    top1: float
    on_front: bool = False


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """(latency, top-1) pairs -> True where no other point is at least as fast and as accurate and strictly
    better in one of the two."""

    def dominated(i: int) -> bool:
        (t, a) = points[i]
        return any(t2 <= t and a2 >= a and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i)

    return [not dominated(i) for i in range(len(points))]


def _routing(export_path: str) -> tuple[float | None, str | None]:
    """A per-token export's inference capacity ratio and priority, from its sidecar."""
    _, side = find_sidecar(export_path)
    r = side.routing if side is not None else None
    if not r or r.get("kind") != "token":
        return None, None
    return float(r["capacity_ratio"]), str(r["priority"])


def _candidates(which: str, curve: CapacityCurve | None) -> list[str]:
    """The model's own fp32 .pte, then (per-token) one per ratio of its capacity curve, as the pipeline names them."""
    names = [f"{which}.pte"]
    if curve is not None:
        ratios = sorted({p.capacity_ratio for p in curve.points}, reverse=True)
        names += [capacity_export_name(which, r) for r in ratios]
    return names


def pareto_points(stages: Mapping[str, Any]) -> tuple[list[ParetoPoint], list[str]]:
    """The points of the plot from the eval, export and bench stages' summaries (``pipeline_dir``), and a note for
    each benched export left out (no top-1 for its capacity)."""
    ev, exp, bench = (stages.get(s) for s in ("eval", "export", "bench"))
    if ev is None or exp is None or bench is None:
        return [], []
    points, notes = [], []
    for which in (w for w in LABELS if w in ev.top1):
        curve_file = ev.capacity_curves.get(which)
        curve = read_capacity_curve(curve_file) if curve_file else None
        for name in _candidates(which, curve):
            if name not in bench.results or name not in exp.artifacts:
                continue
            ratio, priority = _routing(exp.artifacts[name])
            # the eval stage ran the model with its own routing, as its own .pte was exported
            top1 = ev.top1[which] if name == f"{which}.pte" else None
            if top1 is None and curve is not None and ratio is not None and priority is not None:
                top1 = curve.top1(priority, ratio)
            if top1 is None:
                notes.append(f"`{name}` left out: its capacity curve has no top-1 at its capacity {ratio}")
                continue
            p50 = float(ingest_result(bench.results[name])["stats"]["p50"])
            points.append(ParetoPoint(which, name, ratio, priority, p50, float(top1)))
    front = pareto_front([(p.p50_ms, p.top1) for p in points])
    return [p._replace(on_front=f) for p, f in zip(points, front)], notes


def _plot(points: list[ParetoPoint], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for which, label in LABELS.items():
        mine = sorted((p for p in points if p.model == which), key=lambda p: p.p50_ms)
        if not mine:
            continue
        ax.plot([p.p50_ms for p in mine], [100 * p.top1 for p in mine], marker=MARKERS[which], label=label,
                ls="-" if len(mine) > 1 else "none")  # fmt: skip
        for p in mine:
            if p.capacity_ratio is not None:
                ax.annotate(f"C={p.capacity_ratio:g}", (p.p50_ms, 100 * p.top1), fontsize=8,
                            textcoords="offset points", xytext=(4, 4))  # fmt: skip
    front = sorted((p for p in points if p.on_front), key=lambda p: p.p50_ms)
    ax.step([p.p50_ms for p in front], [100 * p.top1 for p in front], where="post", color="k", ls="--",
            lw=1, label="Pareto front")  # fmt: skip
    ax.set_xlabel("host latency p50 (ms, batch 1, .pte fp32)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("accuracy vs latency (per-token V-MoE at each inference capacity C)")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def pareto_section(out: Path, figdir: Path, stages: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the section (its plot written to ``figdir/pareto.png``); none without benched .pte files."""
    points, notes = pareto_points(stages)
    if not points:
        return []
    png = _plot(points, figdir / "pareto.png")
    md = [
        "## Accuracy vs latency",
        "",
        "Each fp32 `.pte`: top-1 of the eager model on the validation split (a per-token V-MoE's at the "
        "inference capacity ratio C it was exported with, from its capacity curve), host latency p50 of the "
        "`.pte` (bench stage). On the Pareto front: no other point is both as fast and as accurate.",
        "",
        "| model | capacity C | artifact | p50 ms | top-1 | Pareto front |",
        "|---|---:|---|---:|---:|:---:|",
    ]
    for p in points:
        cap = "" if p.capacity_ratio is None else f"{p.capacity_ratio:g} ({p.priority})"
        md.append(
            f"| {LABELS[p.model]} | {cap} | `export/{p.artifact}` | {p.p50_ms:.3f} | {100 * p.top1:.2f} % | "
            f"{'yes' if p.on_front else ''} |"
        )
    md += ["", *notes] if notes else []
    return [*md, "", f"![accuracy vs latency]({png.relative_to(out).as_posix()})", ""]
