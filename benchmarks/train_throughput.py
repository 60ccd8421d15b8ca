"""Training throughput (images/s) of the dense ViT, the Mobile V-MoE and timm's own ViT under one loop.

    .venv/bin/python benchmarks/train_throughput.py --quick                 # nano models, 32 px, ~1 min on CPU
    .venv/bin/python benchmarks/train_throughput.py --device cpu --batch-size 16 --steps 3 --rounds 5
    python benchmarks/train_throughput.py --device cuda [--compile]         # bf16 autocast, batch 256

All three models run the project's real training step, ``mobile_vmoe.train.train_step`` (forward through
``RoutedForward``, ``Objective`` loss, backward, AdamW from ``timm.optim.create_optimizer_v2``). The MoE gets a
super-class map (C classes in E contiguous groups), so its loss includes the 0.3 x router CE, as in real
training. Inputs are fixed random tensors: this measures the model step, not the data pipeline.

Models (same active width): mobile_vit_tiny_patch16_224 (dense) vs mobile_vmoe_tiny_patch16_224 (E=10, K=1, L=2)
next to timm's vit_tiny_patch16_224; ``--quick``: the 32 px patch-4 nano pair and timm's VisionTransformer built
with the same shape. Models run interleaved, round by round in rotating order, so that the drift of a shared
machine hits all of them alike; medians per model and their ratios are printed.
Goal: MoE / dense >= 0.9. dense / timm shows what the project's ViT costs over timm's own (ideally ~1.0).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

import timm
import torch
from timm.optim import create_optimizer_v2

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.common import UserError, write_json_atomic
from mobile_vmoe.models import count_params
from mobile_vmoe.train import Objective, RoutedForward, train_step

GOAL = 0.9
LABELS = ("dense", "moe", "timm")


def model_specs(quick: bool, img_size: int | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (timm name, create_model kwargs); the timm ViT gets the shape of the project's dense ViT."""
    if quick:
        size = img_size or 32
        shape = dict(img_size=size, patch_size=4, embed_dim=64, depth=12, num_heads=2, num_classes=100)
        return {
            "dense": ("mobile_vit_nano_patch4_32", {"img_size": size}),
            "moe": ("mobile_vmoe_nano_patch4_32", {"img_size": size}),
            "timm": ("vit_tiny_patch16_224", shape),
        }
    size_kw = {"img_size": img_size} if img_size else {}
    return {
        "dense": ("mobile_vit_tiny_patch16_224", dict(size_kw)),
        "moe": ("mobile_vmoe_tiny_patch16_224", dict(size_kw)),
        "timm": ("vit_tiny_patch16_224", dict(size_kw)),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model with its optimizer, objective and fixed random batch; ``run(n)`` -> images/s over n steps."""

    def __init__(
        self,
        name: str,
        kwargs: dict[str, Any],
        device: torch.device,
        batch: int,
        amp: torch.dtype | None,
        compile_: bool,
    ) -> None:
        torch.manual_seed(0)
        self.model = timm.create_model(name, **kwargs).to(device).train()
        self.name, self.device, self.amp, self.batch = name, device, amp, batch
        C = self.model.num_classes
        E = int(getattr(self.model, "num_experts", 0) or 0)
        # Contiguous super-classes (C classes into E groups), so the MoE pays for the router CE as in training.
        assignment = [c * E // C for c in range(C)] if E else None
        self.objective = Objective(C, E, assignment, router_loss_weight=0.3).to(device)
        self.fwd: torch.nn.Module = RoutedForward(self.model)
        if compile_:
            self.fwd = torch.compile(self.fwd)
        self.opt = create_optimizer_v2(self.model, opt="adamw", lr=1e-4, weight_decay=0.05)
        self.params, self.active_params = count_params(self.model)
        g = torch.Generator().manual_seed(0)
        H, W = self.model.patch_embed.img_size
        self.x = torch.randn(batch, 3, H, W, generator=g).to(device)  # [B, 3, H, W]
        self.y = torch.randint(0, C, (batch,), generator=g).to(device)  # [B]

    def run(self, steps: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        loss = 0.0
        for _ in range(steps):
            parts = train_step(self.fwd, self.opt, self.x, self.y, self.objective, amp_dtype=self.amp)
            loss = parts["loss"]
        loss = float(loss)  # host sync on the last step's loss
        _sync(self.device)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise RuntimeError(f"{self.name}: loss is {loss}")
        return steps * self.batch / dt if steps else 0.0


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(choice)


def run_benchmark(
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    rounds: int,
    quick: bool = False,
    img_size: int | None = None,
    compile_: bool = False,
) -> dict[str, Any]:
    """Interleaved rounds of ``steps`` training steps per model; returns samples, medians and ratios."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    specs = model_specs(quick, img_size)
    runners = {k: Runner(n, kw, device, batch, amp, compile_) for k, (n, kw) in specs.items()}
    for r in runners.values():
        r.run(warmup)  # also pays for torch.compile and the CUDA allocator's first growth
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(rounds):
        order = LABELS[i % 3 :] + LABELS[: i % 3]  # rotate: no model always runs right after another
        for k in order:
            samples[k].append(runners[k].run(steps))
        print(
            f"round {i + 1}/{rounds}: " + ", ".join(f"{k} {samples[k][-1]:.1f}" for k in LABELS), flush=True
        )
    med = {k: statistics.median(v) for k, v in samples.items()}
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, bf16 autocast"
    else:
        where = f"CPU, {torch.get_num_threads()} threads, fp32"
    return {
        "device": where,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "batch_size": batch,
        "img_size": runners["dense"].x.shape[-1],
        "steps_per_round": steps,
        "warmup": warmup,
        "rounds": rounds,
        "compile": compile_,
        "models": {
            k: {"name": r.name, "kwargs": specs[k][1], "params": r.params, "active_params": r.active_params}
            for k, r in runners.items()
        },
        "images_per_s": samples,
        "median_images_per_s": med,
        "moe_over_dense": med["moe"] / med["dense"],
        "dense_over_timm": med["dense"] / med["timm"],
        "goal_moe_over_dense": GOAL,
        "input": "synthetic random tensors (model step only, no data pipeline)",
    }


def print_table(res: dict[str, Any]) -> None:
    print(
        f"\n{res['device']}, batch {res['batch_size']}, {res['img_size']} px, {res['rounds']} rounds x "
        f"{res['steps_per_round']} steps{', torch.compile' if res['compile'] else ''}; synthetic inputs"
    )
    print("| model | timm name | params | active params | images/s (median) | min | max |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for k in LABELS:
        m, s = res["models"][k], res["images_per_s"][k]
        print(
            f"| {k} | {m['name']} | {m['params'] / 1e6:.2f}M | {m['active_params'] / 1e6:.2f}M | "
            f"{res['median_images_per_s'][k]:.1f} | {min(s):.1f} | {max(s):.1f} |"
        )
    ok = "meets" if res["moe_over_dense"] >= GOAL else "BELOW"
    print(f"\nMoE / dense:  {res['moe_over_dense']:.3f}  ({ok} goal >= {GOAL})")
    print(
        f"dense / timm: {res['dense_over_timm']:.3f}  (the project's ViT vs timm's own under the same step)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument(
        "--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU (64 --quick)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per model per round (CPU 3, --quick 10, CUDA 20)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (CPU 1, CUDA 5)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=None, help="default 224 (32 with --quick)")
    ap.add_argument("--quick", action="store_true", help="32 px patch-4 nano models, a ~1 min CPU run")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op CPU threads (0: torch's default)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)

    try:
        device = _device(args.device)
        cuda = device.type == "cuda"
        batch = args.batch_size if args.batch_size is not None else 256 if cuda else 64 if args.quick else 16
        steps = args.steps if args.steps is not None else 20 if cuda else 10 if args.quick else 3
        warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
        for flag, v, lo in (("--batch-size", batch, 1), ("--steps", steps, 1), ("--rounds", args.rounds, 1)):
            if v < lo:
                raise UserError(f"{flag} must be >= {lo}, got {v}")
        if warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {warmup}")
        patch = 4 if args.quick else 16
        if args.img_size is not None and (args.img_size < patch or args.img_size % patch):
            raise UserError(
                f"--img-size must be a positive multiple of the patch size {patch}, got {args.img_size}"
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    res = run_benchmark(device, batch, steps, warmup, args.rounds, args.quick, args.img_size, args.compile)
    print_table(res)
    if args.json:
        write_json_atomic(args.json, res)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
