"""Latency of exported models on this host, batch 1, measured side by side in one run.

Prints three ratios through the ExecuTorch runtime (XNNPACK), and (a), (b) again through ONNX Runtime:
    (a) MoE / dense at equal active width (ViT-Tiny, 224 px: mobile_vmoe_tiny vs mobile_vit_tiny)   goal <= 1.05
    (b) E=16 / E=4 experts (same MoE otherwise): sparse compute, latency must not grow with E         goal <= 1.05
    (c) int8 / fp32 (.pte, the E=10 MoE), for both int8 schemes (default dynamic, int8-static)          goal <= 0.70
and, for information, (d) what export's XNNPACK rewrite (export/rewrite.py) gains: the E=10 MoE lowered as it is
(SDPA, LayerNorm) against the rewritten model that every .pte export uses; (e) what the expert switch
(export/switch.py: experts as cond branches with constant weights) gains over the gather form, on both runtimes.
Weights are random (latency does not depend on them; int8-static's observers are calibrated on random inputs).
Models of one runtime run in interleaved rounds, each runtime in a process of its own (``_common.py``).

    python benchmarks/export_latency.py            # ViT-Tiny 224 px: lowering takes ~1 min per model
    python benchmarks/export_latency.py --quick    # nano models at 32 px, for a smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
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
from mobile_vmoe.export.onnx_export import export_onnx
from mobile_vmoe.export.pte import INT8_SCHEMES, lower_pte

GOAL = Goal(1.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Timing is ~1 min of the ~4 min run (lowering is the rest), and this host's per-round ratios spread by
    # several percent: 60 rounds keep the median ratio within about 1 %.
    timing_args(ap, rounds=60, quick_rounds=10)
    args = ap.parse_args()
    rounds = num_rounds(args)
    size = "nano_patch4_32" if args.quick else "tiny_patch16_224"
    dense_name, moe_name = f"mobile_vit_{size}", f"mobile_vmoe_{size}"

    models = {
        "dense": build(dense_name),
        "moe_e10": build(moe_name),  # the paper's E=10, K=1, L=2
        "moe_e4": build(moe_name, num_experts=4),
        "moe_e16": build(moe_name, num_experts=16),
    }
    H, W = models["dense"].patch_embed.img_size
    x = torch.randn(1, 3, H, W)
    calib = [torch.randn(1, 3, H, W) for _ in range(8)]

    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="export-latency-") as tmp:
        for key, m in models.items():
            for fmt in ("pte", "onnx"):
                paths[f"{fmt}/{key}"] = lower_artifact(fmt, Path(tmp) / f"{key}.{fmt}", m, x)
        # "int8" (dynamic, transformer linears), "int8-static" (calibrated, linear + conv), fp32 without the
        # XNNPACK rewrite, and fp32 with the gather form instead of the expert switch (export/switch.py).
        variants = [(f"moe_e10_{scheme}", scheme, True, True) for scheme in INT8_SCHEMES]
        variants += [("moe_e10_norewrite", None, False, True), ("moe_e10_gather", None, True, False)]
        for key, scheme, rewrite, switch in variants:
            t0 = time.perf_counter()
            path = paths[f"pte/{key}"] = Path(tmp) / f"{key}.pte"
            buf = lower_pte(
                models["moe_e10"], x, scheme, calib, xnnpack_rewrite=rewrite, expert_switch=switch
            )[0]
            path.write_bytes(buf)
            print(f"lowered pte {key} in {time.perf_counter() - t0:.0f} s", flush=True)
        path = paths["onnx/moe_e10_gather"] = Path(tmp) / "moe_e10_gather.onnx"
        export_onnx(models["moe_e10"], x, path, expert_switch=False)
        samples = time_runtimes(paths, x, rounds, args)

    print_medians(f"{dense_name} vs {moe_name}, batch 1, {rounds} rounds x {args.iters} runs", samples)
    int8 = Goal(0.70)
    print_ratios(
        [
            Ratio("a", "MoE(E=10) / dense", "pte", "moe_e10", "dense", GOAL),
            Ratio("b", "E=16 / E=4", "pte", "moe_e16", "moe_e4", GOAL),
            Ratio("c", "int8 / fp32 (MoE)", "pte", "moe_e10_int8", "moe_e10", int8),
            Ratio("c", "int8-static / fp32", "pte", "moe_e10_int8-static", "moe_e10", int8),
            Ratio("d", "rewrite / as is", "pte", "moe_e10", "moe_e10_norewrite"),
            Ratio("e", "switch / gather", "pte", "moe_e10", "moe_e10_gather"),
            Ratio("a", "MoE(E=10) / dense", "onnx", "moe_e10", "dense", GOAL),
            Ratio("b", "E=16 / E=4", "onnx", "moe_e16", "moe_e4", GOAL),
            Ratio("e", "switch / gather", "onnx", "moe_e10", "moe_e10_gather"),
        ],
        samples,
        args.iters,
    )


if __name__ == "__main__":
    main()
