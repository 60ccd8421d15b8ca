"""Training objective of the image-text models: symmetric contrastive loss plus LIMoE's auxiliary losses.

LIMoE (Mustafa et al. 2022, Sec. 3) regularises each modality m's routing distributions p (softmax over E, one
per routed token of m) with two entropies, H(q) = -sum_e q_e log q_e:
    local  = mean over m's tokens of H(p)                  minimised: each token routes confidently
    global = max(0, log S - H(mean over m's tokens of p))  minimised: m as a whole spreads over at least ~S
                                                           experts; past that, nothing (the hinge)
V-MoE's importance and load losses (``token_moe.TokenRouter.balance_losses``) stay available: per modality (our
default: the minority modality is balanced on its own) or, as V-MoE defines them, over all routed tokens together
(``classic_losses="joint"``, where only the entropy losses keep text from collapsing onto a few experts).
Each auxiliary loss is summed over the MoE blocks. The contrastive loss is open_clip's ``ClipLoss`` with local
loss and gradient-carrying gathers, so that negatives come from every DDP rank.

The default weights are ours (the paper sweeps them per setting): 0.01 for each entropy, S = E (the global
hinge then never clips: plain global-entropy maximisation), V-MoE's 0.005 for importance and load.
"""

import math

import torch
from open_clip.loss import ClipLoss

from .limoe import ImageTextOutput, ModalityRouting
from .token_moe import TokenRouting, routing_stats

__all__ = ["CLASSIC_LOSSES", "ContrastiveObjective", "global_entropy", "local_entropy", "MODALITIES"]

CLASSIC_LOSSES = ("per_modality", "joint")  # where V-MoE's importance/load losses balance the experts

MODALITIES = ("image", "text")


def _masked(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """probs [..., E] -> [M, E], the rows of the routed tokens (``mask`` with the shape of probs[..., 0])."""
    probs = probs.float().reshape(-1, probs.shape[-1])
    return probs if mask is None else probs[mask.reshape(-1)]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(p).sum(dim=-1)  # entr(0) = 0: no log of zero


def local_entropy(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the routed tokens of H(p): probs [..., E], mask [...] (True = routed) -> scalar."""
    p = _masked(probs, mask)
    return _entropy(p).mean() if p.shape[0] else p.new_zeros(())


def global_entropy(probs: torch.Tensor, mask: torch.Tensor | None, num_experts_S: float) -> torch.Tensor:
    """max(0, log S - H(mean over the routed tokens of p)): probs [..., E], mask [...] -> scalar."""
    if not num_experts_S >= 1:
        raise ValueError(f"num_experts_S must be >= 1, got {num_experts_S}")
    p = _masked(probs, mask)
    if not p.shape[0]:
        return p.new_zeros(())
    return (math.log(num_experts_S) - _entropy(p.mean(dim=0))).clamp_min(0.0)


def _pair(v: float | tuple[float, float], name: str) -> tuple[float, float]:
    pair = (float(v), float(v)) if isinstance(v, int | float) else tuple(float(x) for x in v)
    if len(pair) != 2 or any(x < 0 for x in pair):
        raise ValueError(f"{name} must be a number or an (image, text) pair of numbers >= 0, got {v!r}")
    return pair  # type: ignore[return-value]


class ContrastiveObjective:
    """L = ClipLoss + sum over modalities m and MoE blocks of
    w_local[m] * local + w_global[m] * global(S[m]) + w_importance * importance + w_load * load.

    Per-modality weights are a number (both) or an (image, text) pair. ``rank`` / ``world_size``: this process
    in DDP (negatives are gathered from every rank; 0 / 1 without DDP).
    """

    def __init__(
        self,
        num_experts: int = 0,
        local_weight: float | tuple[float, float] = 0.01,
        global_weight: float | tuple[float, float] = 0.01,
        global_experts_S: float | tuple[float, float] | None = None,
        importance_weight: float = 0.005,
        load_weight: float = 0.005,
        rank: int = 0,
        world_size: int = 1,
        classic_losses: str = "per_modality",
    ) -> None:
        if classic_losses not in CLASSIC_LOSSES:
            raise ValueError(f"classic_losses must be one of {CLASSIC_LOSSES}, got {classic_losses!r}")
        self.classic = classic_losses
        self.E = num_experts
        self.local_w = _pair(local_weight, "local_weight")
        self.global_w = _pair(global_weight, "global_weight")
        self.S = _pair(
            global_experts_S if global_experts_S is not None else max(1, num_experts), "global_experts_S"
        )
        if num_experts and any(not 1 <= s <= num_experts for s in self.S):
            raise ValueError(f"global_experts_S must be in [1, num_experts={num_experts}], got {self.S}")
        self.importance_w, self.load_w = importance_weight, load_weight
        self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)

    def __call__(
        self, output: ImageTextOutput, routings: list[ModalityRouting]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached scalar parts): contrastive_loss, logit_scale, loss, and for a MoE, per modality m:
        m_local_entropy, m_global_entropy, m_importance_loss, m_load_loss (summed over blocks) and m_dropped
        (fraction of m's routed tokens past a full buffer, mean over blocks)."""
        contrastive = self.clip_loss(
            output.image_embeds.float(), output.text_embeds.float(), output.logit_scale.float()
        )
        loss = contrastive
        parts = {"contrastive_loss": contrastive.detach(), "logit_scale": output.logit_scale.detach().float()}
        if routings:
            loss = loss + self._routing_losses(routings, parts)
        parts["loss"] = loss.detach()
        return loss, parts

    def _routing_losses(
        self, routings: list[ModalityRouting], parts: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        total = torch.zeros((), device=routings[0].image.probs.device)
        for m, name in enumerate(MODALITIES):
            halves: list[tuple[TokenRouting, torch.Tensor | None]] = [
                (r.image, None) if m == 0 else (r.text, r.text_mask) for r in routings
            ]
            local = torch.stack([local_entropy(r.probs, mask) for r, mask in halves]).sum()
            glob = torch.stack([global_entropy(r.probs, mask, self.S[m]) for r, mask in halves]).sum()
            importance = torch.stack([r.importance_loss for r, _ in halves]).sum()
            load = torch.stack([r.load_loss for r, _ in halves]).sum()
            total = total + self.local_w[m] * local + self.global_w[m] * glob
            if self.classic == "per_modality":
                total = total + self.importance_w * importance + self.load_w * load
            dropped = torch.stack([routing_stats(r, r.probs.shape[-1], mask)[1] for r, mask in halves]).mean()
            for key, v in (
                ("local_entropy", local),
                ("global_entropy", glob),
                ("importance_loss", importance),
                ("load_loss", load),
                ("dropped", dropped),
            ):
                parts[f"{name}_{key}"] = v.detach().float()
        if self.classic == "joint":  # V-MoE's: one balance over all routed tokens, whatever their modality
            importance = torch.stack([r.joint.importance_loss for r in routings]).sum()
            load = torch.stack([r.joint.load_loss for r in routings]).sum()
            total = total + self.importance_w * importance + self.load_w * load
            parts["joint_importance_loss"], parts["joint_load_loss"] = importance.detach(), load.detach()
        return total
