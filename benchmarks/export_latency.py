"""Latency of exported models on this host, batch 1, measured side by side in one run.

Prints three ratios through the ExecuTorch runtime (XNNPACK), and (a), (b) again through ONNX Runtime:
    (a) MoE / dense at equal active width (ViT-Tiny, 224 px: mobile_vmoe_tiny vs mobile_vit_tiny)   goal <= 1.05
    (b) E=16 / E=4 experts (same MoE otherwise): sparse compute, latency must not grow with E         goal <= 1.05
    (c) int8 / fp32 (.pte, the E=10 MoE), for both int8 schemes (default dynamic, int8-static)          goal <= 0.70
and, for information, what export's XNNPACK rewrite (export/rewrite.py) gains: the E=10 MoE lowered as it is
(SDPA, LayerNorm) against the rewritten model that every .pte export uses.
Weights are random (latency does not depend on them; int8-static's observers are calibrated on random inputs).
Models run in interleaved rounds (every model once per round, in rotating order) so that load on this shared
machine hits all of them alike; ratios are of the medians over all rounds.

    python benchmarks/export_latency.py            # ViT-Tiny 224 px: lowering takes ~1 min per model
    python benchmarks/export_latency.py --quick    # nano models at 32 px, for a smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from mobile_vmoe.export.formats import INT8_SCHEMES, OnnxRunner, PteRunner, export_onnx, lower_pte

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.bench import latency_stats

GOALS = {"a": 1.05, "b": 1.05, "c": 0.70, "d": None}  # (d): information, no goal


def build(name: str, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="nano models at 32 px instead of ViT-Tiny at 224 px")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 20, quick 10)")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per model per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per model before the first round")
    ap.add_argument("--threads", type=int, default=None, help="ExecuTorch / ONNX Runtime threads")
    args = ap.parse_args()
    rounds = args.rounds or (10 if args.quick else 20)
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

    if args.threads:
        # Before any program is loaded: resetting the pool under loaded XNNPACK programs hangs the next run.
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(args.threads)
    runners: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="export-latency-") as tmp:
        for key, m in models.items():
            for fmt in ("pte", "onnx"):
                t0 = time.perf_counter()
                path = Path(tmp) / f"{key}.{fmt}"
                if fmt == "pte":
                    buf, _ = lower_pte(m, x)
                    path.write_bytes(buf)
                    runners[f"pte/{key}"] = PteRunner(path)
                else:
                    export_onnx(m, x, path)
                    runners[f"onnx/{key}"] = OnnxRunner(path, threads=args.threads)
                print(f"lowered {fmt} {key} in {time.perf_counter() - t0:.0f} s", flush=True)
        # "int8" (dynamic, transformer linears), "int8-static" (calibrated, linear + conv), and fp32 without
        # the XNNPACK rewrite.
        variants = [(f"moe_e10_{scheme}", scheme, True) for scheme in INT8_SCHEMES]
        variants.append(("moe_e10_norewrite", None, False))
        for key, scheme, rewrite in variants:
            t0 = time.perf_counter()
            buf, _ = lower_pte(models["moe_e10"], x, scheme, calib, xnnpack_rewrite=rewrite)
            (Path(tmp) / f"{key}.pte").write_bytes(buf)
            runners[f"pte/{key}"] = PteRunner(Path(tmp) / f"{key}.pte")
            print(f"lowered pte {key} in {time.perf_counter() - t0:.0f} s", flush=True)
        keys = list(runners)
        for k in keys:
            for _ in range(args.warmup):
                runners[k](x)
        samples: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order every round
                for _ in range(args.iters):
                    t0 = time.perf_counter_ns()
                    runners[k](x)
                    samples[k].append((time.perf_counter_ns() - t0) / 1e6)

    med = {k: latency_stats(v)["p50"] for k, v in samples.items()}
    print(f"\n{dense_name} vs {moe_name}, batch 1, {rounds} rounds x {args.iters} runs, median ms:")
    for k in keys:
        print(f"  {k:26s} {med[k]:8.2f}")
    rows = [
        ("a", "MoE(E=10) / dense  ", "pte", "moe_e10", "dense"),
        ("b", "E=16 / E=4         ", "pte", "moe_e16", "moe_e4"),
        ("c", "int8 / fp32 (MoE)  ", "pte", "moe_e10_int8", "moe_e10"),
        ("c", "int8-static / fp32 ", "pte", "moe_e10_int8-static", "moe_e10"),
        ("d", "rewrite / as is    ", "pte", "moe_e10", "moe_e10_norewrite"),
        ("a", "MoE(E=10) / dense  ", "onnx", "moe_e10", "dense"),
        ("b", "E=16 / E=4         ", "onnx", "moe_e16", "moe_e4"),
    ]
    print("\nratio                        runtime        value  goal   met")
    for tag, label, rt, num, den in rows:
        v = med[f"{rt}/{num}"] / med[f"{rt}/{den}"]
        name = "executorch" if rt == "pte" else "onnxruntime"
        goal = GOALS[tag]
        verdict = "  -       -" if goal is None else f"<={goal:.2f}  {'yes' if v <= goal else 'NO'}"
        print(f"({tag}) {label}      {name:12s} {v:6.3f}  {verdict}")


if __name__ == "__main__":
    main()
