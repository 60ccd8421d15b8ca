"""LIMoE vs LIMoE without entropy losses vs dense one-tower vs dense two-tower (CLIP) on the built-in caption set,
over several seeds: zero-shot top-1 and, for the LIMoE variants, how each modality is routed.

    .venv/bin/python benchmarks/limoe_accuracy.py [--seeds 0 1 2] [--quick] [--work bench_runs/limoe_accuracy]
        [--models limoe limoe_no_entropy ...] [key=value ...]   # overrides, e.g. schedule.epochs=12

Every model trains with the ``limoe_synthetic`` preset (same data, recipe, batch, steps and seed) and is
evaluated with ``mobile-vmoe eval`` (``evaluate_image_text``) on the val split. Compute per example
(``flops_per_example``: one image and one full-length caption) is equal for the dense one- and two-tower models;
LIMoE adds its routers and the buffer slack of its capacity ratio (printed). Prints zero-shot top-1 / top-5 and
retrieval R@1 mean ± std per model, and for the LIMoE variants the routing success rate and the experts used
(>= 1 % of a block's tokens) per modality. ``--quick``: one seed, 2 epochs (a smoke run; the numbers mean
little). Finished runs are reused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.checkpoint import MODEL_FILE
from mobile_vmoe.cli import setup_logging
from mobile_vmoe.config import load_config, model_kwargs
from mobile_vmoe.evaluate_image_text import evaluate_image_text
from mobile_vmoe.files.image_text_eval import ImageTextEval
from mobile_vmoe.models.limoe import flops_per_example
from mobile_vmoe.train import train

PRESET = "limoe_synthetic"
# name -> (model, extra overrides)
MODELS = {
    "limoe": ("mobile_limoe_nano_patch8_32", []),
    "limoe_no_entropy": ("mobile_limoe_nano_patch8_32", ["image_text.entropy_losses=false"]),
    # V-MoE's importance/load over all routed tokens together, with and without the entropy losses: the setting
    # where the paper sees the minority modality collapse without them
    "limoe_joint": ("mobile_limoe_nano_patch8_32", ["image_text.classic_losses=joint"]),
    "limoe_joint_no_entropy": (
        "mobile_limoe_nano_patch8_32",
        ["image_text.classic_losses=joint", "image_text.entropy_losses=false"],
    ),
    # no auxiliary loss at all: whether this budget shows any collapse for the losses to prevent
    "limoe_no_aux": (
        "mobile_limoe_nano_patch8_32",
        ["image_text.entropy_losses=false", "moe.importance_loss_weight=0", "moe.load_loss_weight=0"],
    ),
    "limoe_entropy_only": (  # LIMoE's entropy losses alone: what they prevent without V-MoE's
        "mobile_limoe_nano_patch8_32",
        ["moe.importance_loss_weight=0", "moe.load_loss_weight=0"],
    ),
    "onetower": ("mobile_onetower_nano_patch8_32", []),
    "clip": ("mobile_clip_nano_patch8_32", []),
}


def _mean_std(xs: list[float], scale: float = 100.0) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):6.2f} ± {scale * sd:5.2f}"


def _gflops(model: str, overrides: list[str]) -> float:
    cfg = load_config(PRESET, [f"model={model}", *overrides])
    kwargs = model_kwargs(cfg)
    if cfg.data.image_size:
        kwargs.setdefault("img_size", cfg.data.image_size)
    return flops_per_example(timm.create_model(model, **kwargs)) / 1e9


def _run(name: str, seed: int, work: Path, overrides: list[str]) -> ImageTextEval:
    model, extra = MODELS[name]
    run = work / f"seed{seed}" / name
    if not (run / MODEL_FILE).is_file():
        cfg = load_config(PRESET, [f"model={model}", f"seed={seed}", f"out={run}",
                                   f"data.root={work / 'data'}", *extra, *overrides])  # fmt: skip
        t0 = time.perf_counter()
        train(cfg)
        print(f"  trained {name} seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return evaluate_image_text(run, json_out=run / "eval.json")


def _report(evals: dict[str, list[ImageTextEval]], flops: dict[str, float]) -> None:
    dense = flops["onetower"]
    print(f"\n{'model':18s} {'GFLOPs/pair':>11s} {'x dense':>7s} {'zero-shot top-1 %':>17s} "
          f"{'top-5 %':>15s} {'img->txt R@1 %':>15s} {'txt->img R@1 %':>15s}")  # fmt: skip
    for name, evs in evals.items():
        z = [e.zero_shot for e in evs if e.zero_shot is not None]
        print(
            f"{name:18s} {flops[name]:11.4f} {flops[name] / dense:7.2f} {_mean_std([x.top1 for x in z]):>17s} "
            f"{_mean_std([x.top5 for x in z]):>15s} {_mean_std([e.retrieval.image_to_text_r1 for e in evs]):>15s} "
            f"{_mean_std([e.retrieval.text_to_image_r1 for e in evs]):>15s}"
        )
    print(f"\n{'routing':18s} {'success image %':>15s} {'success text %':>15s} {'experts used image':>18s} "
          f"{'experts used text':>18s}   (of E, >= 1 % of a block's tokens; mean over blocks)")  # fmt: skip
    for name, evs in evals.items():
        rs = [e.routing for e in evs if e.routing is not None]
        if not rs:
            continue
        print(
            f"{name:18s} {_mean_std([r.image_success for r in rs]):>15s} {_mean_std([r.text_success for r in rs]):>15s} "
            f"{_mean_std([r.image_experts_used for r in rs], 1.0):>18s} "
            f"{_mean_std([r.text_experts_used for r in rs], 1.0):>18s}"
        )
    top1 = {n: statistics.mean(e.zero_shot.top1 for e in evs if e.zero_shot) for n, evs in evals.items()}
    if "onetower" in top1:
        print("\nzero-shot top-1 ratios: " + ", ".join(f"{n}/onetower {top1[n] / max(top1['onetower'], 1e-9):.2f}"
                                                      for n in top1 if n != "onetower"))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="one seed, 2 epochs: a smoke run")
    ap.add_argument("--work", default="bench_runs/limoe_accuracy")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="a subset")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = ap.parse_args()
    setup_logging()
    seeds, overrides, work = args.seeds, list(args.overrides), Path(args.work)
    if args.quick:
        seeds, overrides, work = seeds[:1], ["schedule.epochs=2", *overrides], work / "quick"
    names = [n for n in MODELS if n in args.models]
    flops = {name: _gflops(MODELS[name][0], [*MODELS[name][1], *overrides]) for name in [*names, "onetower"]}
    evals: dict[str, list[ImageTextEval]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            evals[name].append(_run(name, seed, work, overrides))
            z = evals[name][-1].zero_shot
            print(
                f"seed {seed} {name}: zero-shot top-1 {100 * z.top1 if z else float('nan'):.2f} %", flush=True
            )
    print(f"\n{PRESET}, seeds {seeds}, overrides {overrides or 'none'}")
    _report(evals, flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
