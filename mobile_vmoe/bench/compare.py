"""`mobile-vmoe bench report RESULTS.json... [--eval EVAL.json ...] --out DIR`: one Markdown table and one PNG
comparing bench results (host and phones alike), with top-1 where an evaluation result matches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import UserError, atomic_path, load_paths, read_json, write_text_atomic
from .schema import ingest_result

__all__ = ["report"]

Doc = dict[str, Any]


def _name(doc: Doc) -> str:
    return doc["model"]["name"] or Path(doc["model"]["path"]).name


def _label(doc: Doc) -> str:
    backend = doc["backend"]["name"] + (
        f"/{doc['backend']['compute_units']}" if doc["backend"]["compute_units"] else ""
    )
    return f"{_name(doc)}\n{doc['runtime']['name']} {backend}\n{doc['device']['model']}"


def _eval_keys(ev: Doc) -> tuple[set[str], set[str]]:
    paths = {str(Path(ev[k]).resolve()) for k in ("checkpoint",) if isinstance(ev.get(k), str)}
    names = {ev[k] for k in ("model",) if isinstance(ev.get(k), str)}
    return paths, names


def _result_keys(doc: Doc) -> tuple[set[str], set[str]]:
    paths = set()
    if doc["model"]["format"] == "safetensors":
        paths.add(str(Path(doc["model"]["path"]).resolve()))
    sc = doc["model"].get("sidecar") or {}
    if isinstance(sc.get("checkpoint"), str):
        paths.add(str(Path(sc["checkpoint"]).resolve()))
    names = {n for n in (doc["model"].get("name"), sc.get("model")) if isinstance(n, str)}
    return paths, names


def _match_eval(doc: Doc, evals: list[Doc]) -> Doc | None:
    rp, rn = _result_keys(doc)
    by_path = [e for e in evals if _eval_keys(e)[0] & rp]
    if by_path:
        return by_path[0]
    by_name = [e for e in evals if _eval_keys(e)[1] & rn]
    return by_name[0] if len(by_name) == 1 else None


def _read_evals(evals: Sequence[str | os.PathLike[str]]) -> list[Doc]:
    out = []
    for e in evals:
        ev = read_json(e, "evaluation result")
        if not isinstance(ev, dict) or not isinstance(ev.get("top1"), (int, float)):
            raise UserError(f'{e}: evaluation JSON must be an object with a numeric "top1"')
        ev = load_paths(ev, e, ("checkpoint",))  # stored relative to the file when inside its directory
        if not isinstance(ev.get("checkpoint"), str) and not isinstance(ev.get("model"), str):
            raise UserError(f'{e}: evaluation JSON needs a "checkpoint" or "model" field to match results')
        out.append(ev)
    return out


def _fmt_thermal(t: Doc | None) -> str:
    if t is None:
        return "n/a"
    if t.get("state"):
        return str(t["state"])
    zones = t.get("zones_celsius") or {}
    return f"{max(zones.values()):.0f}°C" if zones else "n/a"


def _fmt_top1(ev: Doc | None) -> str:
    if ev is None:
        return ""
    return f"{100 * ev['top1']:.2f}%" if ev["top1"] <= 1 else f"{ev['top1']:.2f}%"  # a fraction or percent


def _main_table(docs: list[Doc], matched: list[Doc | None]) -> list[str]:
    rows = [
        "| model | runtime | backend | device | precision | threads | n | p50 ms | p90 ms | p99 ms | mean ms "
        "| std ms | cold load ms | first ms | peak MB (+load) | thermal before → after | top-1 |",
        "|" + "---|" * 4 + "---|" + "---:|" * 12,
    ]
    for d, ev in zip(docs, matched):
        s, mem = d["stats"], d["memory"]
        backend = d["backend"]["name"] + (
            f" ({d['backend']['compute_units']})" if d["backend"]["compute_units"] else ""
        )
        peak = f"{mem['peak_bytes'] / 2**20:.0f}" if mem.get("peak_bytes") is not None else "n/a"
        if mem.get("delta_bytes") is not None:  # the model's share of the process peak
            peak += f" (+{mem['delta_bytes'] / 2**20:.1f})"
        rows.append(
            f"| {_name(d)} | {d['runtime']['name']} {d['runtime']['version']} | {backend} | {d['device']['model']} "
            f"| {d['precision'] or 'n/a'} | {d['backend']['threads'] or 'n/a'} | {s['count']} | {s['p50']:.3f} "
            f"| {s['p90']:.3f} | {s['p99']:.3f} | {s['mean']:.3f} | {s['std']:.3f} | {d['cold_load_ms']:.1f} "
            f"| {d['first_inference_ms']:.2f} | {peak} | {_fmt_thermal(d['thermal_before'])} → "
            f"{_fmt_thermal(d['thermal_after'])} | {_fmt_top1(ev)} |"
        )
    return rows


def _expert_table(docs: list[Doc]) -> list[str]:
    experts = [(d, d["latency_per_expert"]) for d in docs if d["latency_per_expert"]]
    if not experts:
        return []
    md = [
        "",
        "## Latency per routed expert",
        "",
        "| model | runtime | backend | device | expert | count | p50 ms | mean ms |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for d, pe in experts:
        for e, v in sorted(pe.items(), key=lambda kv: int(kv[0])):
            md.append(
                f"| {_name(d)} | {d['runtime']['name']} | {d['backend']['name']} | {d['device']['model']} | {e} "
                f"| {v['count']} | {v['p50']:.3f} | {v['mean']:.3f} |"
            )
    return md


def _plot(docs: list[Doc], matched: list[Doc | None], png: Path) -> None:
    """Box plot of the samples per result; with evaluation results, top-1 against p50 latency beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_acc = any(ev is not None for ev in matched)
    fig, axes = plt.subplots(
        1, 2 if have_acc else 1, figsize=(max(6, 2.8 * len(docs)) + (5 if have_acc else 0), 5), squeeze=False
    )
    ax = axes[0, 0]
    ax.boxplot([d["samples_ms"] for d in docs], showfliers=True)
    ax.set_xticks(range(1, len(docs) + 1), [_label(d) for d in docs], fontsize=7, rotation=15, ha="right")
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title("latency distribution (timed runs)")
    if have_acc:
        ax2 = axes[0, 1]
        for d, ev in zip(docs, matched):
            if ev is None:
                continue
            ax2.scatter(d["stats"]["p50"], ev["top1"])
            ax2.annotate(f"{_name(d)} ({d['runtime']['name']})", (d["stats"]["p50"], ev["top1"]), fontsize=7)
        ax2.set_xlabel("p50 latency (ms)")
        ax2.set_ylabel("top-1")
        ax2.set_title("accuracy against latency")
    fig.tight_layout()
    with atomic_path(png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def report(
    results: Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str],
    evals: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Path]:
    """RESULTS.json... (+ optional evaluation JSONs with "top1") -> OUT/bench_report.md and OUT/bench_latency.png."""
    if not results:
        raise UserError("bench report: give at least one RESULTS.json")
    docs = [ingest_result(r) for r in results]  # validates every file before any plotting
    ev_docs = _read_evals(evals)
    matched = [_match_eval(d, ev_docs) for d in docs]
    md = [
        "# Latency report",
        "",
        f"{len(docs)} result(s); samples in ms, p50/p90/p99 over timed runs.",
        "",
        *_main_table(docs, matched),
        *_expert_table(docs),
        "",
        "![latency](bench_latency.png)",
        "",
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, md_path = out / "bench_latency.png", out / "bench_report.md"
    _plot(docs, matched, png)
    write_text_atomic(md_path, "\n".join(md))
    return {"markdown": md_path, "png": png}
