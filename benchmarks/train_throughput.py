"""Training throughput (images/s) of the dense ViT, the Mobile V-MoE and timm's own ViT, under one loop.

    .venv/bin/python benchmarks/train_throughput.py [--device auto|cpu|cuda] [--batch-size 16] [--steps 5]
        [--rounds 3] [--quick] [--compile] [--json OUT]

All three models run the project's real training step (``mobile_vmoe.train.train_step``: forward, loss, backward,
AdamW step; the MoE with the 0.3 x super-class router loss on a random class -> super-class map) on random
tensors, so this measures the model step, not the data pipeline. Models are interleaved over rounds and the
median images/s of each is reported. Default: ViT-Tiny at 224 px (mobile_vit_tiny_patch16_224,
mobile_vmoe_tiny_patch16_224 with E=10, K=1, L=2, and timm's vit_tiny_patch16_224). ``--quick``: the 32 px nano
models (and a timm ViT of the same shape). On CUDA: bf16 autocast and a larger default batch.
Goal: MoE / dense >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import timm
import torch
from timm.optim import create_optimizer_v2

import mobile_vmoe.models  # noqa: F401  (registers the model names)
from mobile_vmoe.train import Objective, RoutedForward, train_step

GOAL = 0.9


def _models(quick: bool) -> dict[str, dict]:
    if quick:
        shape = dict(img_size=32, patch_size=4, embed_dim=64, depth=12, num_heads=2, num_classes=100)
        return {
            "dense": dict(name="mobile_vit_nano_patch4_32", kwargs={"num_classes": 100}),
            "moe": dict(name="mobile_vmoe_nano_patch4_32", kwargs={"num_classes": 100}),
            "timm": dict(name="vit_tiny_patch16_224", kwargs=shape),  # timm's VisionTransformer, same shape
        }
    return {
        "dense": dict(name="mobile_vit_tiny_patch16_224", kwargs={}),
        "moe": dict(name="mobile_vmoe_tiny_patch16_224", kwargs={}),
        "timm": dict(name="vit_tiny_patch16_224", kwargs={}),
    }


class _Runner:
    def __init__(
        self,
        name: str,
        kwargs: dict,
        device: torch.device,
        batch: int,
        amp: torch.dtype | None,
        compile_: bool,
    ):
        torch.manual_seed(0)
        self.model = timm.create_model(name, **kwargs).to(device).train()
        C = self.model.num_classes
        E = int(getattr(self.model, "num_experts", 0) or 0)
        size = self.model.patch_embed.img_size
        self.fwd = RoutedForward(self.model)
        if compile_:
            self.fwd = torch.compile(self.fwd)
        self.opt = create_optimizer_v2(self.model, opt="adamw", lr=1e-4, weight_decay=0.05)
        assignment = [c % E for c in range(C)] if E else None
        self.objective = Objective(C, E, assignment, router_loss_weight=0.3).to(device)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, *size, generator=g).to(device)
        self.y = torch.randint(0, C, (batch,), generator=g).to(device)
        self.device, self.amp, self.batch = device, amp, batch

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        """images/s over ``steps`` training steps."""
        self._sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            parts = train_step(self.fwd, self.opt, self.x, self.y, self.objective, amp_dtype=self.amp)
        float(parts["loss"])  # wait for the last step
        self._sync()
        return steps * self.batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument(
        "--batch-size", type=int, default=None, help="default 16 on CPU (64 with --quick), 256 on CUDA"
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="32 px nano models")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if device.type == "cuda" else None
    batch = args.batch_size or (256 if device.type == "cuda" else (64 if args.quick else 16))

    runners = {
        k: _Runner(v["name"], v["kwargs"], device, batch, amp, args.compile)
        for k, v in _models(args.quick).items()
    }
    for r in runners.values():
        r.run(args.warmup)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(args.rounds):
        for k, r in runners.items():  # interleaved: machine noise hits every model alike
            samples[k].append(r.run(args.steps))
        print(
            f"round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in samples.items()),
            flush=True,
        )

    med = {k: statistics.median(v) for k, v in samples.items()}
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\n{dev}, batch {batch}, {'bf16 autocast' if amp else 'fp32'}{', compiled' if args.compile else ''}"
    )
    print("| model | timm name | images/s (median) |\n|---|---|---:|")
    for k, spec in _models(args.quick).items():
        print(f"| {k} | {spec['name']} | {med[k]:.1f} |")
    ratio = med["moe"] / med["dense"]
    print(f"\nMoE / dense: {ratio:.3f} (goal >= {GOAL})   dense / timm ViT: {med['dense'] / med['timm']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": dev,
                    "batch": batch,
                    "images_per_s": samples,
                    "median": med,
                    "moe_over_dense": ratio,
                },
                f,
                indent=2,
            )
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
