"""Accuracy-aware choice of the linears that the dynamic int8 .pte scheme quantises.

Dynamic int8 (``--quantize int8``) makes every transformer linear int8 by default: on ViT-Tiny 224 that is what
brings the .pte to 0.60x fp32 latency (benchmarks/export_latency.py). A small, low-confidence model can lose too
many top-1 decisions that way. The built-in demo models (D=64, ~45 % top-1, many near-tied logits) agree with
fp32 on 98.2-99.2 % of images, around the 99 % bar, and weights alone or activations alone each flip ~0.8 %.
So before lowering, export simulates the int8 model in eager PyTorch on held-out images that verification does
not use (training images are fitted and flip far less), and returns the most damaging linears to fp32, one at a
time, until the simulated agreement clears the bar by a margin. The real .pte is then verified as usual.

The simulation is what XNNPACK's qd8-f32-qc8w kernels compute: int8 weights with one symmetric scale per output
channel (max |w| / 127) and int8 activations with an asymmetric scale per token, chosen at run time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mobile_vmoe.models.moe import ExpertMlp

__all__ = ["FP32_MODULES", "eager_logits", "int8_candidates", "simulated_int8", "select_fp32_layers"]

# Linears that stay fp32 whatever the images say. The head: at D=64 its int8 logits flip near-tied classes
# (the demo dense model's agreement fell from 99.2 to 97.8 %). The router: an int8 flip changes the experts.
# Both are one token's matmul, so keeping them fp32 costs nothing measurable.
FP32_MODULES = ("head", "router")

# Agreement margin over the bar when choosing layers on the tuning images. Near 99 %, 500 images estimate an
# agreement to ~0.45 points (one standard error), so the tuning and verification estimates differ by ~0.63
# points; 0.5 was too little: the default pipeline's dense model reached 99.5 % on its tuning images and
# exactly 99.0 % on the verification ones.
TUNE_MARGIN = 0.007
# Images used to rank the layers by their own damage. On the demo MoE, ranking on 64 images returned 17 of 20
# linears to fp32 and ranking on 500 returned 13; 256 bounds the cost on large models (one pass per linear).
RANK_IMAGES = 256


def int8_candidates(model: nn.Module) -> list[str]:
    """Names of the linears the dynamic scheme may quantise: every ``nn.Linear`` outside FP32_MODULES."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, ExpertMlp)) and not set(name.split(".")) & set(FP32_MODULES)
    ]  # not set(...): a per-token MoE's router is "router" inside the block's mlp


def _fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127  # [..., out, 1]
    return (w / scale).round().clamp(-127, 127) * scale


class _FakeInt8Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fake_int8_tokens(x)


def _fake_int8_tokens(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = (-lo / scale).round() - 128
    return ((x / scale + zero).round().clamp(-128, 127) - zero) * scale


@contextlib.contextmanager
def simulated_int8(model: nn.Module, layers: Collection[str]) -> Iterator[None]:
    """Inside the block, the named linears of ``model`` compute with int8 weights and per-token int8 inputs.

    A named ``ExpertMlp`` (per-image MoE) stands for its experts' two linears: int8 weights per expert and
    output channel, int8 tokens into fc1 and, after the activation, into fc2 (exact for K=1; with K > 1 the
    gather form scales the hidden units by the gates after that point).
    """
    modules = dict(model.named_modules())
    undo: list[Callable[[], None]] = []
    try:
        for name in layers:
            m = modules[name]
            hook = m.register_forward_pre_hook(lambda _m, a: (_fake_int8_tokens(a[0]), *a[1:]))
            undo.append(hook.remove)
            params = (m.fc1_weight, m.fc2_weight) if isinstance(m, ExpertMlp) else (m.weight,)
            for p in params:
                undo.append(functools.partial(setattr, p, "data", p.data))
                # stacked expert weights are [E, in, out]: one scale per expert and output channel
                w = p.data.transpose(-1, -2) if isinstance(m, ExpertMlp) else p.data
                p.data = (
                    _fake_int8_weight(w).transpose(-1, -2)
                    if isinstance(m, ExpertMlp)
                    else _fake_int8_weight(w)
                )
            if isinstance(m, ExpertMlp):
                undo.append(functools.partial(setattr, m, "act", m.act))
                m.act = nn.Sequential(m.act, _FakeInt8Tokens())
        yield
    finally:
        for f in reversed(undo):
            f()


def eager_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] of images [N, 3, H, W], 64 at a time."""
    with torch.no_grad():  # no grad: the MoE takes its gather path, the one that is exported
        return torch.cat([model(x[i : i + 64]) for i in range(0, x.shape[0], 64)])


def select_fp32_layers(
    model: nn.Module, images: torch.Tensor, min_agreement: float
) -> tuple[list[str], dict[str, Any]]:
    """(linears to keep fp32, a report) so that simulated int8 top-1 agreement on ``images`` >= the bar + margin.

    Returns every candidate when even that does not reach the target (the caller's verification then fails
    with the real figures). ``images``: [N, 3, H, W], normalised, disjoint from the verification images.
    """
    target = min(1.0, min_agreement + TUNE_MARGIN)
    candidates = int8_candidates(model)
    ref = eager_logits(model, images)
    top1 = ref.argmax(-1)

    def agreement(fp32: Collection[str]) -> float:
        with simulated_int8(model, [n for n in candidates if n not in fp32]):
            return float((eager_logits(model, images).argmax(-1) == top1).float().mean())

    report: dict[str, Any] = {"images": int(images.shape[0]), "target_agreement": target}
    fp32: list[str] = []
    agree = agreement(fp32)
    report["simulated_agreement_all_int8"] = agree
    if agree < target:
        # Rank by each layer's own damage: KL(fp32 || only this layer int8) on a subset.
        sub = images[:RANK_IMAGES]
        logp_ref = F.log_softmax(ref[: sub.shape[0]], dim=-1)
        damage = {}
        for name in candidates:
            with simulated_int8(model, [name]):
                logp = F.log_softmax(eager_logits(model, sub), dim=-1)
            damage[name] = float(F.kl_div(logp, logp_ref, log_target=True, reduction="batchmean"))
        for name in sorted(candidates, key=damage.__getitem__, reverse=True):
            fp32.append(name)
            agree = agreement(fp32)
            if agree >= target:
                break
    report["simulated_agreement"] = agree
    report["fp32_layers"] = fp32
    return fp32, report
