"""Latency of exported per-token V-MoE models against dense on this host, batch 1, measured side by side in one run.

Per-token MoE (``mobile_vmoe_token_*``, ViT-Tiny 224 px, K=1, last 2 blocks MoE, BPR, in their export form
``export/token.py``) against the dense ViT-Tiny, through the ExecuTorch runtime (XNNPACK) and ONNX Runtime:
    (a) per-token MoE (E=10, capacity ratio 1.0) / dense                                    goal <= 1.10
    (b) E=16 / E=4, both at capacity ratio 1.0                                              goal <= 1.05
    (c) capacity ratio 0.5 / 1.0 (E=10)                                                     goal <  1
and through ExecuTorch only (dynamic int8, ``--quantize int8``):
    (d) per-token MoE int8 / dense int8, and per-image MoE (``mobile_vmoe_*``, E=10) int8 / dense int8   goal <= 1.05
Weights are random (latency does not depend on them, nor does the routing's cost: buffers have a fixed size).
Models of one runtime run in interleaved rounds, each runtime in a process of its own (``_common.py``). Beside
each ratio, its floor: the same ratio of the per-token models' static forms, timed in the same rounds: the same
experts on fixed token slices, with no routing (``_floor.py``).

    python benchmarks/token_export_latency.py            # ViT-Tiny 224 px: lowering takes ~1 min per model
    python benchmarks/token_export_latency.py --quick    # nano models at 32 px, for a smoke run
    python benchmarks/token_export_latency.py --profile  # also where the time goes (``_profile.py``)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import (
    Goal,
    Ratio,
    build,
    lower_artifact,
    num_rounds,
    print_medians,
    print_ratios,
    time_runtimes,
    timing_args,
)
from _floor import STATIC, floor_medians, static_form
from _profile import print_profiles, profile_ptes
from mobile_vmoe.export.token import for_export

TOKEN = {  # key -> (experts, inference capacity ratio)
    "token_e10": (10, 1.0),
    "token_e4": (4, 1.0),
    "token_e16": (16, 1.0),
    "token_e10_c05": (10, 0.5),
}


def names(quick: bool) -> tuple[str, str, str]:
    """(dense, per-token, per-image) model names at the benchmark's size: ViT-Tiny 224, or nano 32 px."""
    size = "nano_patch4_32" if quick else "tiny_patch16_224"
    return f"mobile_vit_{size}", f"mobile_vmoe_token_{size}", f"mobile_vmoe_{size}"


def export_models(quick: bool) -> dict[str, torch.nn.Module]:
    """The fp32 models the script lowers, by key: dense, the per-token MoEs of ``TOKEN`` in export form with
    BPR, and their static forms (the floors, ``_floor.py``)."""
    dense_name, token_name, _ = names(quick)
    models = {"dense": build(dense_name)}
    for key, (E, ratio) in TOKEN.items():
        models[key] = for_export(build(token_name, num_experts=E), capacity_ratio=ratio, priority="bpr")
    return models | {key + STATIC: static_form(models[key]) for key in TOKEN}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing_args(ap, rounds=60, quick_rounds=10)
    args = ap.parse_args()
    rounds = num_rounds(args)
    dense_name, token_name, image_name = names(args.quick)
    models = export_models(args.quick)
    dense = models["dense"]
    H, W = dense.patch_embed.img_size
    x = torch.randn(1, 3, H, W)

    paths: dict[str, Path] = {}

    def lower(fmt: str, key: str, model: torch.nn.Module, quantize: str | None = None) -> None:
        paths[f"{fmt}/{key}"] = lower_artifact(fmt, Path(tmp) / f"{key}.{fmt}", model, x, quantize=quantize)

    with tempfile.TemporaryDirectory(prefix="token-export-latency-") as tmp:
        for key, m in models.items():  # the static forms too
            for fmt in ("pte", "onnx"):
                lower(fmt, key, m)
        lower("pte", "dense_int8", dense, "int8")
        lower("pte", "token_e10_int8", models["token_e10"], "int8")
        lower("pte", "image_e10_int8", build(image_name), "int8")  # the paper's E=10, K=1, L=2
        lower("pte", "token_e10_int8" + STATIC, models["token_e10" + STATIC], "int8")
        samples = time_runtimes(paths, x, rounds, args)
        fp32 = {k: p for k, p in paths.items() if not k.endswith(("_int8", STATIC))}
        prof = profile_ptes(fp32, x, args) if args.profile else None

    print_medians(f"{dense_name} vs {token_name}, batch 1, {rounds} rounds x {args.iters} runs", samples)
    rows = []
    for rt in ("pte", "onnx"):
        rows += [
            Ratio("a", "token MoE(E=10, c=1.0) / dense", rt, "token_e10", "dense", Goal(1.10)),
            Ratio("b", "token E=16 / E=4 (c=1.0)", rt, "token_e16", "token_e4", Goal(1.05)),
            Ratio(
                "c", "token c=0.5 / c=1.0 (E=10)", rt, "token_e10_c05", "token_e10", Goal(1.0, strict=True)
            ),
        ]
    rows += [
        Ratio("d", "token MoE int8 / dense int8", "pte", "token_e10_int8", "dense_int8", Goal(1.05)),
        Ratio("d", "image MoE int8 / dense int8", "pte", "image_e10_int8", "dense_int8", Goal(1.05)),
    ]
    print_ratios(rows, samples, args.iters, floor_medians(samples))
    if prof:
        print_profiles(prof, "dense")


if __name__ == "__main__":
    main()
