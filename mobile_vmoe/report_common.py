"""What both pipeline reports (classifier ``report``, image-text ``report_limoe``) share: the figure folder,
plot and number helpers, the record of a pipeline directory's finished stages, and the sections that read only
bench results, export sidecars and stage markers (host latency, artifacts, stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .common import atomic_path
from .files.superclass_map import SuperclassMap

__all__ = [
    "FILES", "ReportRun", "artifacts_section", "latency_section", "pct", "provenance_section", "pyplot",
    "save_figure", "to_html",
]  # fmt: skip

FILES = "report_files"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> str:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return f"{FILES}/{path.name}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _latency_plot(rows: list[dict[str, Any]], figdir: Path) -> str | None:
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["p50"] for r in rows], 0.4, label="p50")
    ax.bar(x + 0.2, [r["p90"] for r in rows], 0.4, label="p90")
    ax.set_xticks(x, [r["artifact"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ms per image (batch 1)")
    ax.set_title("host latency")
    ax.legend()
    return save_figure(fig, figdir / "latency.png")


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


class ReportRun(NamedTuple):
    """What every section reads: the pipeline directory and its stages' summaries."""

    out: Path
    figdir: Path
    stages: dict[str, Any]  # stage -> its summary record (pipeline_dir), finished stages only
    seconds: dict[str, float]
    sc: SuperclassMap | None


def latency_section(r: ReportRun) -> list[str]:
    if "bench" not in r.stages:
        return []
    rows, device = [], ""
    from .bench.schema import ingest_result

    for name, res in sorted(r.stages["bench"].results.items()):
        doc = ingest_result(res)
        s = doc["stats"]
        device = doc["device"]["model"]
        rows.append({
            "artifact": name, "runtime": f"{doc['runtime']['name']} {doc['runtime']['version']}",
            "backend": doc["backend"]["name"], "precision": doc.get("precision") or "n/a",
            "p50": s["p50"], "p90": s["p90"], "n": s["count"],
        })  # fmt: skip
    if not rows:
        return []
    md = ["## Host latency (batch 1)", "", f"Device: {device}.", ""]
    md += [
        "| artifact | runtime | backend | precision | runs | p50 ms | p90 ms |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        md.append(
            f"| {row['artifact']} | {row['runtime']} | {row['backend']} | {row['precision']} | {row['n']} | "
            f"{row['p50']:.3f} | {row['p90']:.3f} |"
        )
    by = {row["artifact"]: row for row in rows}
    ratios = [
        f"{a.replace('dense', '')}: {by[a.replace('dense', 'moe')]['p50'] / by[a]['p50']:.3f}"
        for a in by
        if a.startswith("dense") and a.replace("dense", "moe") in by
    ]
    if ratios:
        md += ["", "MoE / dense p50 latency per artifact kind — " + ", ".join(ratios) + "."]
    return [*md, "", f"![latency]({_latency_plot(rows, r.figdir)})", ""]


def artifacts_section(r: ReportRun) -> list[str]:
    from .files.sidecar import find_sidecar

    if "export" not in r.stages:
        return []
    exp = r.stages["export"]
    md = ["## Artifacts", "", "| file | size | precision | verified on | images | max abs diff | top-1 agreement |",
          "|---|---:|---|---|---:|---:|---:|"]  # fmt: skip
    for name, path in sorted(exp.artifacts.items()):
        a = Path(path)
        _, side = find_sidecar(a)
        details = side.details if side is not None else {}
        par = details.get("parity", {})
        where = par.get("runtime") or par.get("status", "")
        if a.suffix == ".mlpackage" and details.get("mil_structure"):
            where = "MIL structure checked here; numerics pending on macOS"
        diff, agree = par.get("max_abs_diff"), par.get("top1_agreement")
        md.append(
            f"| `export/{name}` | {_size(a) / 1e6:.2f} MB | {side.precision if side else '?'} | {where} | "
            f"{par.get('n_images', 0)} | {'' if diff is None else f'{diff:.2e}'} | "
            f"{'' if agree is None else pct(agree)} |"
        )
    for name, why in exp.failed_verification.items():
        md.append(f"\n`{name}` was not written: {why}")
    return [*md, ""]


def provenance_section(r: ReportRun) -> list[str]:
    md = ["## Stages", "", "| stage | seconds |", "|---|---:|"]
    md += [f"| {k} | {v} |" for k, v in r.seconds.items() if k != "report"]
    md += ["", "Every number above was read from the files of this run directory.", ""]
    cfg = r.out / "pipeline.yaml"
    if cfg.is_file():
        md += ["<details><summary>pipeline.yaml</summary>", "", "```yaml", cfg.read_text().rstrip(), "```", "",
               "</details>", ""]  # fmt: skip
    return md


def to_html(text: str) -> str:
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Mobile V-MoE report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}"
        "blockquote{background:#fff4d6;margin:0;padding:.5em 1em}</style></head><body>"
        + body
        + "</body></html>"
    )
