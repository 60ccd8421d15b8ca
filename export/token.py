"""Export form of a per-token V-MoE (``mobile_vmoe_token_*``).

Routing, buffer placement and the scatter / gather of tokens keep their eager form (static shapes, portable
kernels). The experts change form: in eager they are one batched matmul over stacked ``[E, D, H]`` weights; a
runtime would re-pack such weights on every call, so each expert becomes two ``nn.Linear`` with constant weights,
which XNNPACK packs once at load, like a dense model's MLP.
"""

import copy
from typing import Any

import torch
from torch import nn

from mobile_vmoe.models.token_moe import TokenExpertMlp, TokenRouting, from_buffers, to_buffers

__all__ = ["LinearTokenExperts", "for_export", "is_token_moe", "token_routing_info"]


class LinearTokenExperts(nn.Module):
    """``TokenExpertMlp`` with one pair of ``nn.Linear`` per expert (same maths)."""

    def __init__(self, mlp: TokenExpertMlp) -> None:
        super().__init__()
        E, D, H = mlp.fc1_weight.shape
        self.num_experts = E
        self.fc1 = nn.ModuleList(nn.Linear(D, H) for _ in range(E))
        self.fc2 = nn.ModuleList(nn.Linear(H, D) for _ in range(E))
        with torch.no_grad():
            for e in range(E):
                self.fc1[e].weight.copy_(mlp.fc1_weight[e].t())
                self.fc1[e].bias.copy_(mlp.fc1_bias[e])
                self.fc2[e].weight.copy_(mlp.fc2_weight[e].t())
                self.fc2[e].bias.copy_(mlp.fc2_bias[e])
        self.act = copy.deepcopy(mlp.act)

    def forward(self, x: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
        buf = to_buffers(x, routing, self.num_experts)  # [E, G * P, D]
        y = torch.stack([fc2(self.act(fc1(buf[e]))) for e, (fc1, fc2) in enumerate(zip(self.fc1, self.fc2))])
        return from_buffers(y, routing)


def is_token_moe(model: nn.Module) -> bool:
    return getattr(model, "moe_routing", None) == "token"


def for_export(model: nn.Module, capacity_ratio: float | None = None, bpr: bool | None = None) -> nn.Module:
    """A copy of a per-token V-MoE in eval mode with its inference routing set and per-expert linears."""
    m = copy.deepcopy(model).eval()
    m.set_routing(capacity_ratio=capacity_ratio, bpr=bpr)
    for mlp in m.moe_mlps():
        mlp.experts = LinearTokenExperts(mlp.experts)
    return m


def token_routing_info(model: nn.Module) -> dict[str, Any]:
    """What the sidecar records of a per-token model's routing (the bench result schema's E, K, L and more)."""
    mlp = model.moe_mlps()[0]
    return {
        "E": int(model.num_experts),
        "K": int(mlp.router.top_k),
        "L": int(model.num_moe_layers),
        "kind": "token",
        "capacity_ratio": float(mlp.eval_capacity_ratio),
        "priority": "bpr" if mlp.eval_bpr else "vanilla",
        "group_size": int(mlp.eval_group_size),  # images routed together at inference
        "moe_blocks": list(model.moe_indices),
    }
