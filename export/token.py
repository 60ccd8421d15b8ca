"""Export form of a per-token V-MoE (``mobile_vmoe_token_*``).

Routing keeps its eager form (static shapes, portable kernels); the dispatch and the experts change form, same
maths:

* Dispatch by rows. Eager scatters every token into [E, G * P, D] buffers and gathers the outputs back, both
  over [G, N * K, D] index tensors expanded along D (an int64 index per float moved). Here one small scatter of
  token numbers says which token fills each buffer row ([E * G * P] int64), and the buffers and the outputs are
  each one ``index_select`` of whole rows.
* Experts as linears. In eager they are one batched matmul over stacked ``[E, D, H]`` weights; a runtime would
  re-pack such weights on every call, so each expert becomes two ``nn.Linear`` with constant weights, which
  XNNPACK packs once at load, like a dense model's MLP, and each runs on its own P rows only.
"""

import copy
from typing import Any

import torch
from torch import nn

from mobile_vmoe.models.token_moe import TokenExpertMlp, TokenRouting, priority_flags, priority_name

__all__ = ["LinearTokenExperts", "buffer_rows", "for_export", "is_token_moe", "token_routing_info"]


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
        """x: [G, N, D] -> [G, N, D], as ``TokenExpertMlp.forward``."""
        G, N, D = x.shape
        E, P, K = self.num_experts, routing.capacity, routing.slot.shape[-1]
        rows = buffer_rows(routing.slot, routing.expert_idx, E, P)  # [G * N * K] in [0, E * G * P]
        # Token of each buffer row; G * N (a zero row) for an empty slot. Row E * G * P takes the dropped
        # choices and is never read.
        token = torch.arange(G * N, device=x.device)
        token = token if K == 1 else token.repeat_interleave(K)
        src = torch.full((E * G * P + 1,), G * N, dtype=token.dtype, device=x.device).scatter(0, rows, token)
        tokens = torch.cat([x.reshape(G * N, D), x.new_zeros(1, D)])
        buf = tokens.index_select(0, src[: E * G * P])  # [E * G * P, D], expert e's rows contiguous
        M = G * P
        ys = [
            fc2(self.act(fc1(buf[e * M : (e + 1) * M])))
            for e, (fc1, fc2) in enumerate(zip(self.fc1, self.fc2))
        ]
        y = torch.cat([*ys, x.new_zeros(1, D)])  # a dropped choice reads the zero row
        out = y.index_select(0, rows)
        if K == 1:  # no sum over choices: one portable kernel call fewer, and the product stays delegated
            return (out * routing.gates.reshape(G * N, 1)).reshape(G, N, D)
        return (out.reshape(G, N, K, D) * routing.gates.unsqueeze(-1)).sum(dim=2)


def buffer_rows(
    slot: torch.Tensor, expert_idx: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Routing slots [G, N, K] (e * P + p, or E * P: dropped) -> rows of [E, G, P] buffers, flat [G * N * K].

    Expert e's rows of all groups are contiguous (e * G * P + g * P + p), so that each expert runs one linear
    on one slice; a dropped choice gets row E * G * P. e comes from ``expert_idx``, not ``slot // P``: Core ML
    divides integers in fp16.
    """
    G = slot.shape[0]
    E, P = num_experts, capacity
    if G == 1:  # one group (a phone's batch of 1): the slots are the rows, dropped choices included
        return slot.reshape(-1)
    g = torch.arange(G, device=slot.device).reshape(G, 1, 1)
    rows = slot + expert_idx * ((G - 1) * P) + g * P
    return torch.where(slot < E * P, rows, torch.full_like(rows, E * G * P)).reshape(-1)


def is_token_moe(model: nn.Module) -> bool:
    return getattr(model, "moe_routing", None) == "token"


def for_export(
    model: nn.Module, capacity_ratio: float | None = None, priority: str | None = None
) -> nn.Module:
    """A copy of a per-token V-MoE in eval mode with its inference routing (``PRIORITY_FLAGS``) set and
    per-expert linears."""
    m = copy.deepcopy(model).eval()
    bpr, cls_first = priority_flags(priority)
    m.set_routing(capacity_ratio=capacity_ratio, bpr=bpr, cls_first=cls_first)
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
        "priority": priority_name(mlp.eval_bpr, mlp.eval_cls_first),
        "group_size": int(mlp.eval_group_size),  # images routed together at inference
        "moe_blocks": list(model.moe_indices),
    }
