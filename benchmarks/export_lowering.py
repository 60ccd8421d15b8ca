"""How long lowering a MoE to a .pte takes, ExecuTorch's plain path against export's fast one, in one run.

The expert switch (export/switch.py) lowers every expert to its own XNNPACK delegate inside ``torch.cond``
branches. ``lower_pte(fast_lowering=False)`` does it as ExecuTorch alone would: every expert through the whole
pipeline, and every trace of a lowered module rebuilding its program; ``fast_lowering=True`` (what export
uses) lowers one expert per shape and hands the others' weights to the XNNPACK backend, and caches the rebuilt
programs while tracing (export/delegates.py). Both must give the same program: the script checks that the two
.pte files are byte-identical and, in the ExecuTorch runtime, give the same logits on random images. The gather
form (``expert_switch=False``) is timed too: what the switch costs over it is what the fast path cuts.
Weights are random (the lowering does not depend on them).

    python benchmarks/export_lowering.py             # the demo MoE (nano, 32 px, E=10) and ViT-Tiny 224 E=10
    python benchmarks/export_lowering.py --quick     # the demo MoE only
    python benchmarks/export_lowering.py --profile   # plus where the time goes (cProfile, cumulative seconds)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import timm
import torch
from mobile_vmoe.export.pte import PteRunner, lower_pte

import mobile_vmoe.models  # noqa: F401  (registers the model names)

MODELS = {
    "demo": ("mobile_vmoe_nano_patch8_32", {}),  # the default pipeline's MoE (E=10, K=1, L=2)
    "tiny224": ("mobile_vmoe_tiny_patch16_224", {}),  # ViT-Tiny, 224 px, E=10
}
# Functions whose cumulative time --profile reports (file name fragment, function name).
PROFILED = [
    ("export/switch.py", "splice_switches", "lowering the experts"),
    ("exported_program.py", "module", "ExportedProgram.module() (rebuilding programs)"),
    ("_program.py", "to_edge_transform_and_lower", "to_edge_transform_and_lower (all calls)"),
    ("_program.py", "to_executorch", "to_executorch"),
    ("torch/export/__init__.py", "export", "torch.export.export (all calls)"),
]


def lower(model: torch.nn.Module, x: torch.Tensor, mode: str, profile: bool) -> tuple[bytes, float, dict]:
    """(.pte bytes, seconds, {label: cumulative seconds} when profiled); mode: gather | plain | fast."""
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    buf = lower_pte(model, x, expert_switch=mode != "gather", fast_lowering=mode == "fast")[0]
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    spent: dict[str, float] = {}
    if prof is not None:
        for (file, _line, func), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
            for frag, name, label in PROFILED:
                if func == name and frag in file:
                    spent[label] = spent.get(label, 0.0) + row[3]
    return buf, seconds, spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the demo MoE only")
    ap.add_argument(
        "--profile", action="store_true", help="cProfile each lowering (slower; shows the breakdown)"
    )
    ap.add_argument("--images", type=int, default=8, help="random images the two programs are compared on")
    args = ap.parse_args()
    # Imports and ExecuTorch's one-time set-up (the XNNPACK partitioner builds its pattern graphs) before timing.
    lower_pte(timm.create_model("mobile_vit_nano_patch8_32", depth=1).eval(), torch.zeros(1, 3, 32, 32))
    rows = []
    for key in ["demo"] if args.quick else list(MODELS):
        name, kwargs = MODELS[key]
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).eval()
        H, W = model.patch_embed.img_size
        x = torch.randn(1, 3, H, W)
        results = {}
        for mode in ("gather", "plain", "fast"):
            buf, seconds, spent = lower(model, x, mode, args.profile)
            results[mode] = (buf, seconds)
            print(f"{name}: lowered in {seconds:.1f} s ({mode})", flush=True)
            for label, s in spent.items():
                print(f"    {label:50s} {s:8.1f} s")
        identical = results["plain"][0] == results["fast"][0]
        images = torch.randn(args.images, 3, H, W, generator=torch.Generator().manual_seed(1))
        with tempfile.TemporaryDirectory(prefix="export-lowering-") as tmp:
            outs = []
            for mode in ("plain", "fast"):
                path = Path(tmp) / f"{mode}.pte"
                path.write_bytes(results[mode][0])
                outs.append(PteRunner(path)(images))
        same = torch.equal(outs[0], outs[1])
        rows.append(
            (name, model.num_experts, *(results[m][1] for m in ("gather", "plain", "fast")), identical, same)
        )
    print(
        "\nswitch lowering: plain = ExecuTorch alone, fast = export's (gather: the gather form, for reference)"
        "\nmodel                           E  gather (s)  plain (s)  fast (s)  speed-up  switch cost cut"
        "  same bytes  same logits"
    )
    for name, E, gather, plain, fast, identical, same in rows:
        cut = 1 - (fast - gather) / (plain - gather)
        print(
            f"{name:30s} {E:3d}  {gather:10.1f}  {plain:9.1f}  {fast:8.1f}  {plain / fast:7.2f}x  {cut:14.0%}"
            f"  {'yes' if identical else 'NO':>10s}  {'yes' if same else 'NO':>11s}"
        )


if __name__ == "__main__":
    main()
