"""MoE / dense time ratio of the forward pass and of a training step, measured side by side in one run (CPU).

    .venv/bin/python benchmarks/moe_overhead.py [--rounds 7] [--threads 2] [--only token]

Goals: per-image Mobile V-MoE forward <= 1.05 and training step <= 1.10; per-token V-MoE training step <= 1.3
(every token routed into capacity buffers, noisy top-k, importance + load losses). The step uses the training
objective (``models.losses.Objective``). Models are interleaved round by round and the median of each is
compared, because a shared machine's speed drifts between rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import mobile_vmoe.models  # noqa: F401
from mobile_vmoe.models.losses import Objective

PAIRS = {
    # name: (dense, moe, forward batch, train batch, forward goal, step goal)
    "per-image, tiny 224px": (
        "mobile_vit_tiny_patch16_224",
        "mobile_vmoe_tiny_patch16_224",
        1,
        16,
        1.05,
        1.10,
    ),
    "per-image, tiny 32px": ("mobile_vit_tiny_patch4_32", "mobile_vmoe_tiny_patch4_32", 1, 64, 1.05, 1.10),
    "per-token, tiny 224px": (
        "mobile_vit_tiny_patch16_224",
        "mobile_vmoe_token_tiny_patch16_224",
        1,
        16,
        None,
        1.3,
    ),
    "per-token, tiny 32px": (
        "mobile_vit_tiny_patch8_32",
        "mobile_vmoe_token_tiny_patch8_32",
        1,
        64,
        None,
        1.3,
    ),
}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model(x)
        return time.perf_counter() - t


def _train_step(
    model: torch.nn.Module, objective: Objective, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    t = time.perf_counter()
    logits, routing = model.forward_with_routing(x)
    loss, _ = objective(logits, routing, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def measure(
    dense_name: str, moe_name: str, fwd_batch: int, train_batch: int, rounds: int
) -> dict[str, float]:
    torch.manual_seed(0)
    models = {k: timm.create_model(n, num_classes=100) for k, n in (("dense", dense_name), ("moe", moe_name))}
    size = models["dense"].pretrained_cfg["input_size"]
    xf = torch.randn(fwd_batch, *size)
    xt, yt = torch.randn(train_batch, *size), torch.randint(0, 100, (train_batch,))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    E = getattr(models["moe"], "num_experts", 0)
    super_of = None if getattr(models["moe"], "moe_routing", None) == "token" else [c % E for c in range(100)]
    objectives = {"dense": Objective(100), "moe": Objective(100, E, super_of)}
    fwd: dict[str, list[float]] = {"dense": [], "moe": []}
    step: dict[str, list[float]] = {"dense": [], "moe": []}
    for r in range(rounds + 1):  # round 0 warms up allocator and kernels
        for k, m in models.items():
            m.eval()
            f = min(_forward(m, xf) for _ in range(5))
            m.train()
            s = _train_step(m, objectives[k], opts[k], xt, yt)
            if r:
                fwd[k].append(f)
                step[k].append(s)
    med = {f"{k}_{w}": statistics.median(v) for w, d in (("fwd", fwd), ("step", step)) for k, v in d.items()}
    med["fwd_ratio"] = med["moe_fwd"] / med["dense_fwd"]
    med["step_ratio"] = med["moe_step"] / med["dense_step"]
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["image", "token"], help="only the per-image or the per-token pairs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, medians")
    print(
        "| pair | dense fwd ms | MoE fwd ms | fwd ratio (goal) | dense step ms | MoE step ms | step ratio (goal) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, (d, m, fb, tb, fwd_goal, step_goal) in PAIRS.items():
        if args.only and not label.startswith(f"per-{args.only}"):
            continue
        r = measure(d, m, fb, tb, args.rounds)
        fg = f" (<= {fwd_goal})" if fwd_goal else ""
        print(
            f"| {label} (fwd batch {fb}, train batch {tb}) | {r['dense_fwd'] * 1e3:.1f} | {r['moe_fwd'] * 1e3:.1f} | "
            f"{r['fwd_ratio']:.3f}{fg} | {r['dense_step'] * 1e3:.0f} | {r['moe_step'] * 1e3:.0f} | "
            f"{r['step_ratio']:.3f} (<= {step_goal}) |"
        )


if __name__ == "__main__":
    main()
