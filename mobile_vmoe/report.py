"""The pipeline's last stage: OUT/report.md and OUT/report.html (plots in OUT/report_files/).

Everything is read back from the files the earlier stages wrote (stage markers and their summaries through
mobile_vmoe.pipeline_dir, run directories, eval JSONs, super-class map, export sidecars, bench results); no
number is computed from anything but those files and the checkpoints themselves (for params / FLOPs). One
function per report section; a section whose stage has not finished is left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .common import UserError, read_json, write_text_atomic
from .data import load_superclass_truth
from .files.stage_marker import read_marker
from .files.superclass_map import SUPERCLASSES_JSON, read_superclass_map
from .pipeline_dir import STAGES, read_summary
from .report_common import (
    FILES,
    ReportRun,
    artifacts_section,
    latency_section,
    pct,
    provenance_section,
    pyplot,
    save_figure,
    to_html,
)
from .report_pareto import pareto_section

__all__ = ["write_report"]


def _epochs(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in recs if r.get("kind") == "epoch"}  # a resumed run may repeat an epoch
    return [by_step[s] for s in sorted(by_step)]


def _dataset_grid(data_dir: Path, figdir: Path, superclasses: list[int] | None) -> str:
    """Up to 10 rows x 10 columns of training images, one per class, classes of a super-class on one row."""
    from PIL import Image

    from .data import scan_dataset

    index = scan_dataset(data_dir)
    first: dict[int, str] = {}
    for s in index.train:
        first.setdefault(s.target, s.path)
    C = len(index.class_names)
    if superclasses is not None and len(superclasses) == C:
        rows = [[c for c in range(C) if superclasses[c] == g] for g in sorted(set(superclasses))]
    else:
        rows = [list(range(i, min(i + 10, C))) for i in range(0, C, 10)]
    rows = [r[:10] for r in rows[:10]]
    ncol = max(len(r) for r in rows)
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.1 * ncol, 1.1 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(rows):
        for j, c in enumerate(row):
            with Image.open(data_dir / first[c]) as im:
                axes[i, j].imshow(np.asarray(im.convert("RGB")))
    fig.suptitle("one training image per class (rows: super-classes)" if superclasses else "training images")
    return save_figure(fig, figdir / "dataset.png")


def _accuracy_plot(runs: dict[str, list[dict[str, Any]]], figdir: Path) -> str | None:
    if not any(runs.values()):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, eps in runs.items():
        xs = [r["epoch"] for r in eps if "val_top1" in r]
        ys = [100 * r["val_top1"] for r in eps if "val_top1" in r]
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("validation top-1 during training")
    return save_figure(fig, figdir / "accuracy.png")


def _routing_plot(ev: dict[str, Any], assignment: list[int] | None, figdir: Path) -> str:
    counts = np.asarray(ev["class_expert_counts"], dtype=float)  # [C, E]
    order = np.argsort(np.asarray(assignment), kind="stable") if assignment else np.arange(len(counts))
    frac = counts[order] / np.maximum(counts[order].sum(axis=1, keepdims=True), 1)
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(frac, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("class (grouped by super-class)" if assignment else "class")
    ax.set_title("share of each class's images routed to each expert")
    fig.colorbar(im, ax=ax)
    load = np.asarray(ev["expert_load"], dtype=float)
    ax2.bar(np.arange(len(load)), load / max(load.sum(), 1))
    ax2.axhline(1 / len(load), color="k", ls="--", lw=1, label="uniform")
    ax2.set_xlabel("expert")
    ax2.set_ylabel("share of routed images")
    ax2.set_title("expert load (validation)")
    ax2.legend()
    return save_figure(fig, figdir / "routing.png")


def _read_run(out: Path) -> ReportRun:
    stages, seconds = {}, {}
    for stage in STAGES:
        m = read_marker(out, stage)
        if m is not None and (s := read_summary(out, stage)) is not None:
            stages[stage], seconds[stage] = s, m.seconds
    if "data" not in stages:
        raise UserError(f"{out}: the data stage has not finished; nothing to report")
    sc_file = out / "superclasses" / SUPERCLASSES_JSON
    sc = read_superclass_map(sc_file) if sc_file.is_file() else None
    return ReportRun(out, out / FILES, stages, seconds, sc)


def _dataset_section(r: ReportRun) -> list[str]:
    d = r.stages["data"]
    data_dir = Path(d.data_dir)
    ds_meta = read_json(data_dir / "dataset.json") if (data_dir / "dataset.json").is_file() else {}
    truth = load_superclass_truth(data_dir)
    heldout = r.stages["confusion"].heldout_images if "confusion" in r.stages else 0
    md = []
    if ds_meta.get("name") == "synthetic":
        md += [
            "> **Results on generated data.** The built-in synthetic hierarchical dataset stands in for ImageNet; "
            "these numbers say the pipeline works end to end, not how the method does on ImageNet-1k.",
            "",
        ]
    rows = truth.assignment if truth is not None else (r.sc.assignment if r.sc else None)
    md += ["## Dataset", ""]
    md += [
        f"`{data_dir}`" + (f" ({ds_meta.get('name')}, seed {ds_meta.get('seed')})" if ds_meta else ""),
        "",
        "| classes | train images | of which held out (confusion matrix) | val images |",
        "|---:|---:|---:|---:|",
        f"| {d.num_classes} | {d.train} | {heldout} | {d.val} |",
        "",
        f"![dataset]({_dataset_grid(data_dir, r.figdir, rows)})",
        "",
    ]
    return md


def _models_section(r: ReportRun) -> list[str]:
    from .checkpoint import load_model
    from .models import profile_model

    md = [
        "## Models",
        "",
        "| | model | routing | params | active params / image | FLOPs / image |",
        "|---|---|---|---:|---:|---:|",
    ]
    for w in _models(r):
        m, meta = load_model(r.stages[w].model_file)
        p = profile_model(m)
        kind = (
            f"per image: E={m.num_experts}, K={m.top_k}, last L={m.num_moe_layers} blocks"
            if m.is_moe
            else "dense"
        )
        if getattr(m, "moe_routing", None) == "token":
            mlp = m.moe_mlps()[0]
            kind = (
                f"per token: E={m.num_experts}, K={m.top_k}, MoE blocks {m.moe_indices}, capacity "
                f"{mlp.capacity_ratio:g} (train) / {mlp.eval_capacity_ratio:g} (eval)"
            )
        md.append(
            f"| {w} | `{meta.model}` ({meta.model_kwargs.get('depth', 12)} blocks) | {kind} | {p.params / 1e6:.3f} M "
            f"| {p.active_params / 1e6:.3f} M | {p.flops / 1e6:.2f} M |"
        )
    return [*md, ""]


def _accuracy_section(r: ReportRun, evals: dict[str, dict[str, Any]]) -> list[str]:
    if not evals:
        return []
    md = ["## Accuracy", "", "| | top-1 | top-5 | images |", "|---|---:|---:|---:|"]
    for w, ev in evals.items():
        md.append(f"| {w} | {pct(ev['top1'])} | {pct(ev['top5'])} | {ev['num_images']} |")
    for w in ("moe", "vmoe"):
        if w in evals and "dense" in evals:
            delta = 100 * (evals[w]["top1"] - evals["dense"]["top1"])
            md += ["", f"{w} − dense top-1: **{delta:+.2f} points** at (nearly) equal FLOPs per image."]
    plot = _accuracy_plot({w: _epochs(r.out / w) for w in _models(r)}, r.figdir)
    return [*md, "", f"![accuracy]({plot})" if plot else "", ""]


def _superclass_section(r: ReportRun) -> list[str]:
    sc = r.sc
    if sc is None:
        return []
    heldout = r.stages["confusion"].heldout_images if "confusion" in r.stages else "?"
    md = [
        "## Super-classes",
        "",
        f"{sc.num_superclasses} super-classes of sizes {sc.sizes} from the dense model's held-out confusion "
        f"matrix ({heldout} images), algorithm `{sc.algorithm}`; {pct(sc.within_mass)} of the off-diagonal "
        "confusion falls within a super-class.",
    ]
    md += ["", *(f"> **Warning:** {w}" for w in sc.warnings), ""] if sc.warnings else []
    if sc.ari_vs_truth is not None:
        md.append(
            f"Agreement with the generator's true super-classes: adjusted Rand index **{sc.ari_vs_truth:.3f}**."
        )
    md += ["", "![super-classes](superclasses/superclasses.png)", "", "Classes of each super-class: "
           "[superclasses/superclasses.md](superclasses/superclasses.md)", ""]  # fmt: skip
    return md


def _routing_section(r: ReportRun, ev: dict[str, Any] | None) -> list[str]:
    if not ev or not ev.get("class_expert_counts"):
        return []
    md = ["## Routing", ""]
    if ev.get("router_accuracy") is not None:
        md.append(
            f"Router accuracy against the super-classes (validation): **{pct(ev['router_accuracy'])}**."
        )
    acc = ", ".join(f"{e}: {pct(a)}" for e, a in enumerate(ev["expert_accuracy"]))
    md += [f"Top-1 of the images each expert was chosen for: {acc}.", ""]
    return [*md, f"![routing]({_routing_plot(ev, r.sc.assignment if r.sc else None, r.figdir)})", ""]


def _models(r: ReportRun) -> list[str]:
    """The models this run trained: dense, moe, and vmoe when the config named a per-token model."""
    return [w for w in ("dense", "moe", "vmoe") if w in r.stages and r.stages[w].model_file]


def _token_routing_plot(ev: dict[str, Any], assignment: list[int] | None, figdir: Path) -> str:
    """Per MoE block: each class's mean routing weight per expert (classes grouped by super-class)."""
    w = np.asarray(ev["class_expert_weight"], dtype=float)  # [L, C, E]
    order = np.argsort(np.asarray(assignment), kind="stable") if assignment else np.arange(w.shape[1])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(w), figsize=(4 * len(w), 4.5), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(w[i][order], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"MoE block {i}: {100 * ev['dropped_fraction'][i]:.1f} % dropped", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("class (grouped by super-class)" if assignment else "class")
    fig.colorbar(im, ax=axes[0].tolist())
    return save_figure(fig, figdir / "vmoe_routing.png")


def _token_routing_section(r: ReportRun, ev: dict[str, Any] | None) -> list[str]:
    if not ev or ev.get("routing") != "token":
        return []
    from .files.capacity_curve import read_capacity_curve

    truth = load_superclass_truth(r.stages["data"].data_dir)
    groups = truth.assignment if truth is not None else (r.sc.assignment if r.sc else None)
    md = ["## Per-token routing (V-MoE)", ""]
    md += ["| MoE block | dropped choices | tokens per expert |", "|---:|---:|---|"]
    for i, (d, load) in enumerate(zip(ev["dropped_fraction"], ev["expert_load"])):
        md.append(f"| {i} | {pct(d)} | {load} |")
    md += ["", f"![per-token routing]({_token_routing_plot(ev, groups, r.figdir)})", ""]
    if truth is not None:
        md += [
            "What the built-in data favours: each super-class of the generated set has its own cue, so a router "
            "that sends whole images by super-class (Mobile V-MoE) is suited to it by construction; per-token "
            "routing has to discover that grouping token by token.",
            "",
        ]
    curve_file = r.stages["eval"].capacity_curves.get("vmoe")
    if curve_file:
        curve = read_capacity_curve(curve_file)
        ratios = sorted({p.capacity_ratio for p in curve.points}, reverse=True)
        md += [
            "Top-1 against the inference capacity ratio (no retraining); P is the buffer slots per expert for "
            "the images routed together (1 image: what a phone runs at batch 1):",
            "",
            "| images per group | priority | " + " | ".join(f"{c:g}" for c in ratios) + " |",
            "|---:|---|" + "---:|" * len(ratios),
        ]
        for g in curve.group_sizes():
            for pr in curve.priorities():
                pts = [curve.point(pr, c, g) for c in ratios]
                cells = [
                    pct(p.top1) + (f" (P={p.capacity})" if p.capacity else "") if p else "–" for p in pts
                ]
                md.append(f"| {g} | {pr} | " + " | ".join(cells) + " |")
        for g, ratios, P in curve.same_routing():
            md.append(
                f"\nWith {g} image(s) per group, capacity ratios {', '.join(f'{r:g}' for r in ratios)} give the same "
                f"buffer (P={P}): one routing, measured {len(ratios)} times; more images per group (or more tokens "
                "per image) separate them."
            )
        png = Path(curve_file).with_suffix(".png")
        md += ["", f"![capacity]({png.relative_to(r.out).as_posix()})", ""]
    return md


def write_report(out: str | os.PathLike[str]) -> dict[str, Path]:
    """Build report.md / report.html for the pipeline directory ``out`` from the files its stages wrote."""
    r = _read_run(Path(out).absolute())  # stage summaries hold absolute paths
    r.figdir.mkdir(parents=True, exist_ok=True)
    evals = {
        w: read_json(r.out / "eval" / f"{w}.json")
        for w in _models(r)
        if "eval" in r.stages and (r.out / "eval" / f"{w}.json").is_file()
    }
    md = [f"# Mobile V-MoE pipeline report: {r.out.name}", ""]
    md += _dataset_section(r)
    md += _models_section(r)
    md += _accuracy_section(r, evals)
    md += _superclass_section(r)
    md += _routing_section(r, evals.get("moe"))
    md += _token_routing_section(r, evals.get("vmoe"))
    md += latency_section(r)
    md += pareto_section(r.out, r.figdir, r.stages)
    md += artifacts_section(r)
    md += provenance_section(r)
    text = "\n".join(md)
    md_path, html_path = r.out / "report.md", r.out / "report.html"
    write_text_atomic(md_path, text)
    write_text_atomic(html_path, to_html(text))
    return {"markdown": md_path, "html": html_path}
