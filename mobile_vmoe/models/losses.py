"""Training objective of the dense ViT and the Mobile V-MoE: classification loss plus the router's loss.

The per-image router learns either the super-class of each image (with a super-class map, the Mobile V-MoE
paper) or, without a map, only to spread images over the experts (V-MoE's importance loss,
``load_balancing_loss``). A per-token V-MoE adds its routers' importance and load losses, summed over blocks.
Shape letters as in ``moe.py``; S is the number of super-classes (S == E when the router learns them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import Routing, expert_load, load_balancing_loss
from .token_moe import TokenRouting, routing_stats

__all__ = ["Objective", "soft_cross_entropy", "superclass_router_loss", "load_balancing_loss"]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE against a soft target [B, N] (timm's SoftTargetCrossEntropy), averaged over the batch."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def superclass_router_loss(
    router_logits: torch.Tensor, target: torch.Tensor, assignment: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE of the router logits [B, E] against the super-class of the target; returns (loss, hard super-class [B]).

    ``target``: [B] class indices, or [B, C] soft targets (mixup/cutmix), whose super-class target is the mixed
    class target mapped through the one-hot assignment matrix [C, S]: ``soft_super = target @ A``.
    """
    if target.ndim == 2:
        A = F.one_hot(assignment, router_logits.shape[-1]).to(target.dtype)  # [C, S]
        super_t = target @ A  # [B, S]
        return soft_cross_entropy(router_logits, super_t), super_t.argmax(dim=1)
    super_hard = assignment[target]
    return F.cross_entropy(router_logits, super_hard), super_hard


class Objective:
    """Classification loss plus the router's loss: super-class CE with a map, load balancing without.

    L = CE(logits, y) + router_loss_weight * CE(router logits, super-class of y)   (with a map)
    L = CE(logits, y) + balance_loss_weight * importance loss                     (without)
    """

    def __init__(
        self,
        num_classes: int,
        num_experts: int = 0,
        assignment: list[int] | None = None,
        router_loss_weight: float = 0.3,
        balance_loss_weight: float = 0.01,
        label_smoothing: float = 0.0,
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
    ) -> None:
        self.C, self.E = num_classes, num_experts
        self.router_w, self.balance_w = router_loss_weight, balance_loss_weight
        self.importance_w, self.load_w = importance_loss_weight, load_loss_weight
        self.label_smoothing = label_smoothing
        # [C]: super-class of each class, or None (no map)
        self.super_of = torch.tensor(assignment, dtype=torch.long) if assignment is not None else None

    def to(self, device: torch.device) -> Objective:
        if self.super_of is not None:
            self.super_of = self.super_of.to(device)
        return self

    def __call__(
        self, logits: torch.Tensor, routing: Routing | list[TokenRouting] | None, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """target: [B] class indices, or [B, C] soft targets (mixup/cutmix, already label-smoothed).

        Returns (loss, detached parts): cls_loss, loss, and for a MoE router_loss + router_correct (with a map)
        or balance_loss (without), and expert_load [E].
        """
        logits = logits.float()
        if target.ndim == 2:
            cls = soft_cross_entropy(logits, target)
        else:
            cls = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        loss = cls
        parts = {"cls_loss": cls.detach()}
        if isinstance(routing, list):
            loss = loss + self._token_losses(routing, parts)
        elif routing is not None:
            r_logits = routing.logits.float()  # [B, E]
            if self.super_of is not None:
                r_loss, super_hard = superclass_router_loss(r_logits, target, self.super_of)
                loss = loss + self.router_w * r_loss
                parts["router_loss"] = r_loss.detach()
                parts["router_correct"] = (r_logits.argmax(dim=1) == super_hard).sum()
            else:
                b_loss = load_balancing_loss(routing)
                loss = loss + self.balance_w * b_loss
                parts["balance_loss"] = b_loss.detach()
            parts["expert_load"] = expert_load(routing, self.E)
        parts["loss"] = loss.detach()
        return loss, parts

    def _token_losses(self, routing: list[TokenRouting], parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """V-MoE: w_i * importance + w_l * load, each summed over the MoE blocks; per-block load and drops."""
        importance = torch.stack([r.importance_loss for r in routing]).sum()
        load = torch.stack([r.load_loss for r in routing]).sum()
        stats = [routing_stats(r, self.E) for r in routing]
        parts["importance_loss"], parts["load_loss"] = importance.detach(), load.detach()
        parts["expert_load"] = torch.stack([s[0] for s in stats])  # [L, E] choices each expert processed
        parts["dropped"] = (
            torch.stack([s[1] for s in stats]).detach().double()
        )  # [L] fraction of choices dropped
        return self.importance_w * importance + self.load_w * load
