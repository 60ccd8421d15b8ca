"""The image-text pipeline's last stage (``pipeline_limoe``): OUT/report.md and OUT/report.html.

As for the classifier report (``report.py``, whose latency, artifact and provenance sections are shared), every
number is read back from the files the stages wrote: stage summaries (``pipeline_dir`` with the plan
``LIMOE_PLAN``), the evaluations (``files.image_text_eval``), export sidecars, bench results, and the model files
themselves for params and FLOPs. Sections: the caption set, the four models side by side (zero-shot, retrieval,
params, FLOPs per pair, latency), the routing analysis of LIMoE with and without its entropy losses (per MoE block
and expert: the image / text share of its tokens, as a stacked bar plot like the LIMoE paper's), and what the
data favours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .common import UserError, read_json, write_text_atomic
from .files.image_text_eval import ImageTextEval, RoutingAnalysis, read_image_text_eval
from .files.stage_marker import read_marker
from .pipeline_dir import read_summary
from .pipeline_limoe import LIMOE_PLAN, MODELS, STAGES
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

__all__ = ["write_limoe_report"]

LABELS = {"limoe": "LIMoE", "limoe_no_entropy": "LIMoE, no entropy losses", "onetower": "dense one-tower",
          "clip": "dense two-tower (CLIP)"}  # fmt: skip
ROUTED = ("limoe", "limoe_no_entropy")  # the MoE models, whose routing is analysed


def _read_run(out: Path) -> ReportRun:
    stages, seconds = {}, {}
    for stage in STAGES:
        m = read_marker(out, stage)
        if m is not None and (s := read_summary(out, stage, LIMOE_PLAN)) is not None:
            stages[stage], seconds[stage] = s, m.seconds
    if "data" not in stages:
        raise UserError(f"{out}: the data stage has not finished; nothing to report")
    return ReportRun(out, out / FILES, stages, seconds, None)


def _is_builtin(data_dir: Path) -> bool:
    f = data_dir / "dataset.json"
    return f.is_file() and read_json(f).get("name") == "synthetic-captions"


def _dataset_section(r: ReportRun, evals: dict[str, ImageTextEval]) -> list[str]:
    d = r.stages["data"]
    md = []
    if _is_builtin(Path(d.data_dir)):
        md += ["> **Results on generated data.** The built-in synthetic caption set stands in for web-scale "
               "image-text pairs; these numbers say the pipeline works end to end, not how LIMoE does on real "
               "data.", ""]  # fmt: skip
    md += ["## Caption set", "", f"`{d.data_dir}`", "", "| classes (zero-shot) | train pairs | val pairs |",
           "|---:|---:|---:|", f"| {d.num_classes} | {d.train} | {d.val} |", ""]  # fmt: skip
    sources = sorted({ev.source for ev in evals.values()})
    if sources:
        md += [f"Evaluation pairs: `{'`, `'.join(sources)}`.", ""]
    if not d.val:
        md += ["> **No val split:** the models are evaluated on the pairs they were trained on; the numbers "
               "below measure fit, not generalisation (a folder with `train/` and `val/` caption sets has both).",
               ""]  # fmt: skip
    return md


def _latencies(r: ReportRun) -> dict[str, float]:
    """Artifact file name -> host p50 ms (bench results)."""
    from .bench.schema import ingest_result

    if "bench" not in r.stages:
        return {}
    return {
        name: float(ingest_result(res)["stats"]["p50"]) for name, res in r.stages["bench"].results.items()
    }


def _models_section(r: ReportRun, evals: dict[str, ImageTextEval]) -> list[str]:
    from .checkpoint import load_model
    from .models import profile_model

    lat = _latencies(r)
    md = [
        "## Models", "",
        "Same caption set, training recipe, batch, steps and seed; the dense two-tower model is sized for the "
        "one-tower models' compute per pair. Zero-shot and retrieval on the evaluation pairs (above); FLOPs per "
        "pair: one image and one full-length caption; latency: the zero-shot classifier (image path) at batch 1 "
        "on this host.", "",
        "| model | params | MFLOPs / pair | zero-shot top-1 | top-5 | image→text R@1 | R@5 "
        "| text→image R@1 | R@5 | p50 ms .pte | p50 ms .onnx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for w in MODELS:
        if w not in r.stages:
            continue
        m, meta = load_model(r.stages[w].model_file)
        p = profile_model(m)  # at the trained size (count_flops), not the name's
        ev = evals.get(w)
        zs, rt = (ev.zero_shot, ev.retrieval) if ev is not None else (None, None)
        cells = [pct(zs.top1) if zs else "n/a", pct(zs.top5) if zs else "n/a"]
        cells += [pct(x) for x in (rt.image_to_text_r1, rt.image_to_text_r5, rt.text_to_image_r1,
                                    rt.text_to_image_r5)] if rt else ["n/a"] * 4  # fmt: skip
        cells += [f"{lat[f]:.3f}" if f in lat else "n/a" for f in (f"{w}.pte", f"{w}.onnx")]
        md.append(f"| {LABELS[w]} (`{meta.model}`) | {p.params / 1e6:.3f} M | "
                  f"{p.flops / 1e6:.2f} | " + " | ".join(cells) + " |")  # fmt: skip
    if "limoe_text.pte" in lat:
        md += ["", f"LIMoE's text encoder (`export/limoe_text.pte`, tokens → embedding): p50 "
                   f"{lat['limoe_text.pte']:.3f} ms."]  # fmt: skip
    return [*md, ""]


def _image_fraction(g: RoutingAnalysis) -> float:
    """Image tokens' share of all kept tokens: the share an expert blind to modality would get."""
    img = sum(sum(b.image_tokens) for b in g.blocks)
    txt = sum(sum(b.text_tokens) for b in g.blocks)
    return img / max(img + txt, 1)


def _routing_plot(routings: dict[str, RoutingAnalysis], figdir: Path) -> str:
    """Rows: MoE blocks; columns: models (with and without entropy losses side by side); per expert (sorted by
    image share) the image and text shares of its tokens, stacked."""
    plt = pyplot()
    nblocks = max(len(g.blocks) for g in routings.values())
    fig, axes = plt.subplots(
        nblocks, len(routings), figsize=(3.8 * len(routings), 2.8 * nblocks), squeeze=False
    )
    for col, (w, g) in enumerate(routings.items()):
        for row, b in enumerate(g.blocks):
            ax = axes[row, col]
            img, txt = np.asarray(b.image_tokens, float), np.asarray(b.text_tokens, float)
            share = img / np.maximum(img + txt, 1)
            order = np.argsort(-share, kind="stable")
            x = np.arange(len(order))
            ax.bar(x, share[order], color="tab:blue", label="image")
            ax.bar(x, np.where(img + txt > 0, 1 - share, 0)[order], bottom=share[order], color="tab:orange",
                   label="text")  # fmt: skip
            ax.axhline(_image_fraction(g), color="k", ls="--", lw=1)
            ax.set_xticks(x, [str(e) for e in order], fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_title(f"{LABELS[w]}: block {b.block}", fontsize=9)
            ax.set_xlabel("expert (sorted by image share)", fontsize=8)
            if col == 0:
                ax.set_ylabel("share of the expert's tokens", fontsize=8)
        for ax in axes[len(g.blocks) :, col]:
            ax.axis("off")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "image (blue) vs text (orange) tokens per expert; dashed: image share of all tokens", fontsize=10
    )
    fig.tight_layout()
    return save_figure(fig, figdir / "limoe_routing.png")


def _routing_section(r: ReportRun, evals: dict[str, ImageTextEval]) -> list[str]:
    routings = {w: evals[w].routing for w in ROUTED if w in evals and evals[w].routing is not None}
    if not routings:
        return []
    g0 = next(iter(routings.values()))
    md = [
        "## Routing", "",
        f"Measured on the evaluation pairs with both modalities routed together, as in training (capacity ratio "
        f"{g0.capacity_ratio:g}, BPR {'on' if g0.bpr else 'off'}, E={g0.num_experts}). Routing success: share of "
        "routed token choices not dropped at a full expert buffer. Experts used: experts with at least "
        f"{100 * g0.used_threshold:g} % of the modality's kept tokens in a block (mean over blocks).", "",
        "| model | success image | success text | experts used image | experts used text "
        "| image share of tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for w, g in routings.items():
        md.append(f"| {LABELS[w]} | {pct(g.image_success)} | {pct(g.text_success)} | "
                  f"{g.image_experts_used:.1f} / {g.num_experts} | {g.text_experts_used:.1f} / {g.num_experts} | "
                  f"{pct(_image_fraction(g))} |")  # fmt: skip
    md += ["", "Per MoE block (with vs without entropy losses side by side):", "",
           "| block | " + " | ".join(f"{LABELS[w]}: success image / text, experts image / text" for w in routings)
           + " |", "|---:|" + "---|" * len(routings)]  # fmt: skip
    for i, b in enumerate(g0.blocks):
        cells = []
        for g in routings.values():
            x = g.blocks[i]
            cells.append(f"{pct(x.image_success)} / {pct(x.text_success)}, {x.image_experts_used} / "
                         f"{x.text_experts_used}")  # fmt: skip
        md.append(f"| {b.block} | " + " | ".join(cells) + " |")
    md += ["", f"![routing]({_routing_plot(routings, r.figdir)})", ""]
    return md


def _favours_section(r: ReportRun, evals: dict[str, ImageTextEval]) -> list[str]:
    d = r.stages["data"]
    g = next((evals[w].routing for w in ROUTED if w in evals and evals[w].routing is not None), None)
    frac = f" here {pct(_image_fraction(g))}" if g is not None else ""
    md = ["## What the data favours", ""]
    if _is_builtin(Path(d.data_dir)):
        md.append(
            f"The built-in caption set is small ({d.train} training pairs, {d.num_classes} classes), and its "
            "captions come from a few sentence templates over a closed vocabulary that names exactly what the "
            "generator draws (a colour, a shape family, a fine attribute, some nuisances), with each zero-shot "
            "class name word for word in the captions. It rewards binding a handful of words to simple visual "
            "cues, which every one of the four models can learn in minutes; it does not test open-vocabulary "
            "transfer or scale, the regime LIMoE was built for. Differences of a few points between the models "
            "are within the spread over seeds of one run (`benchmarks/limoe_accuracy.py` repeats the "
            "comparison over seeds): read the routing analysis, not the accuracy ranking."
        )
    else:
        md.append(
            f"A user's caption set ({d.train} training pairs): the comparison holds for this data only."
        )
    md += ["", "Reading the routing: every pair routes its image patches and its real caption tokens (image "
           f"tokens are{frac} of all routed tokens); an expert whose image share is near that fraction serves "
           "both modalities, one near 0 or 1 is a modality specialist. The LIMoE paper reports that without "
           "its entropy losses the text tokens (the minority modality) collapse onto one or two experts, and that "
           "with them some experts specialise in a modality while both keep routing successfully.", ""]  # fmt: skip
    return md


def write_limoe_report(out: str | os.PathLike[str]) -> dict[str, Path]:
    """Build report.md / report.html for the image-text pipeline directory ``out`` from its stages' files."""
    r = _read_run(Path(out).absolute())  # stage summaries hold absolute paths
    r.figdir.mkdir(parents=True, exist_ok=True)
    evals = (
        {w: read_image_text_eval(f) for w, f in r.stages["eval"].files.items()} if "eval" in r.stages else {}
    )
    md = [f"# LIMoE pipeline report: {r.out.name}", ""]
    md += _dataset_section(r, evals)
    md += _models_section(r, evals)
    md += _routing_section(r, evals)
    md += _favours_section(r, evals)
    md += latency_section(r)
    md += artifacts_section(r)
    md += provenance_section(r)
    text = "\n".join(md)
    md_path, html_path = r.out / "report.md", r.out / "report.html"
    write_text_atomic(md_path, text)
    write_text_atomic(html_path, to_html(text))
    return {"markdown": md_path, "html": html_path}
