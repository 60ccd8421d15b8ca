"""A per-token MoE's latency floor: the same model with its routing taken out.

``static_form`` replaces each MoE block's routed experts by the same experts on fixed slices of the tokens (the
first P tokens to expert 0, the next P to expert 1, ...; past E * P, none): the same weights read per image, the
same multiply-adds and the same few-row GEMMs as the routed block at its inference capacity, and no router, no
buffer placement, no gathers. Timed in the same interleaved rounds as the models, it splits a MoE's excess over
dense into what the experts cost (static form / dense) and what the routing costs (MoE / static form). No routing
can make a MoE faster than its static form.
"""

from __future__ import annotations

import copy

import torch
from mobile_vmoe.export.token import LinearTokenExperts
from torch import nn

from mobile_vmoe.bench import latency_stats
from mobile_vmoe.models.token_moe import TokenMoEMlp, expert_capacity

__all__ = ["STATIC", "StaticExperts", "floor_medians", "static_form"]

MAX_CAT = 5  # XNNPACK's concatenate takes 2 to 5 inputs: more would run as a portable kernel


class StaticExperts(nn.Module):
    """The experts of a ``TokenMoEMlp`` in export form on fixed token slices: x [B, T, D] -> [B, T, D]."""

    def __init__(self, mlp: TokenMoEMlp) -> None:
        super().__init__()
        if not isinstance(mlp.experts, LinearTokenExperts):
            raise TypeError("static_form takes a model in export form (export.token.for_export)")
        self.experts = mlp.experts
        self.top_k, self.ratio = mlp.router.top_k, mlp.eval_capacity_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        ex = self.experts
        E = ex.num_experts
        P = expert_capacity(T, self.top_k, self.ratio, E)
        n = E * P  # buffer rows: tokens past them are dropped, as a full buffer drops them
        h = torch.cat([x, x.new_zeros(B, n - T, D)], dim=1) if n > T else x[:, :n]
        ys = [ex.fc2[e](ex.act(ex.fc1[e](h[:, e * P : (e + 1) * P]))) for e in range(E)]
        while len(ys) > 1:
            ys = [torch.cat(ys[i : i + MAX_CAT], dim=1) if len(ys[i : i + MAX_CAT]) > 1 else ys[i]
                  for i in range(0, len(ys), MAX_CAT)]  # fmt: skip
        y = ys[0]
        return y[:, :T] if n >= T else torch.cat([y, x.new_zeros(B, T - n, D)], dim=1)


def static_form(model: nn.Module) -> nn.Module:
    """A copy of a per-token model in export form with every ``TokenMoEMlp`` replaced by ``StaticExperts``."""
    m = copy.deepcopy(model).eval()
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TokenMoEMlp):
                setattr(parent, name, StaticExperts(child))
    return m


STATIC = "_static"  # the key suffix of a model's static form in a benchmark's samples


def floor_medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """ "<runtime>/<key>" -> the median ms of "<runtime>/<key>_static", for ``print_ratios``' floor column."""
    return {k[: -len(STATIC)]: latency_stats(v)["p50"] for k, v in samples.items() if k.endswith(STATIC)}
