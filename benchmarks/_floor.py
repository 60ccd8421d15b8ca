"""The part of a per-token MoE's latency that no routing can remove: its expert linears on their buffer rows.

At batch 1 each expert of a block runs its two linears on its P buffer rows, where the dense model runs one MLP
on all T tokens: the same multiply-adds, but E weight sets to read instead of one, and GEMMs of a few rows. The
probes below time exactly that, with no routing at all, in the same interleaved rounds as the models:

    experts probe   E expert MLPs, each on its own P rows (the model's inference capacity)
    mlp probe       the dense MLP on T rows

and a model's floor is ``base + L * (experts probe - mlp probe)``: the base model's latency plus what its L MoE
blocks' experts alone cost over the dense MLPs they replace. ``print_ratios`` prints each ratio's floor beside
it; a goal below its floor cannot be met with this runtime's GEMMs on this host, whatever the routing costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from mobile_vmoe.bench import latency_stats
from mobile_vmoe.models.token_moe import expert_capacity

__all__ = ["Floor", "MlpRows", "expert_probe", "floor_medians"]


class MlpRows(nn.Module):
    """MLPs each on its own slice of R rows of width D, the rows read from the values of the input image (tiled
    where it has fewer than len(mlps) * R * D: a nano model's), outputs summed so that none is dead code."""

    def __init__(self, mlps: Sequence[nn.Module], rows: int, dim: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(mlps)
        self.rows, self.dim = rows, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ...] -> [B, R, D] (any batch: ONNX export makes it dynamic)."""
        E, R, D = len(self.mlps), self.rows, self.dim
        flat = x.reshape(x.shape[0], -1)
        n, have = E * R * D, flat.shape[1]
        flat = flat if have >= n else flat.repeat(1, -(-n // have))
        h = flat[:, :n].reshape(-1, E, R, D)
        y = self.mlps[0](h[:, 0])
        for e in range(1, E):
            y = y + self.mlps[e](h[:, e])
        return y


def expert_probe(model: nn.Module, tokens: int) -> tuple[MlpRows, int]:
    """(experts probe, L) of a per-token model in its export form (``export/token.py``) that routes ``tokens``
    tokens per image: the first MoE block's experts, each on its inference capacity's P rows."""
    mlps = model.moe_mlps()
    experts = mlps[0].experts
    P = expert_capacity(tokens, mlps[0].router.top_k, mlps[0].eval_capacity_ratio, experts.num_experts)
    seq = [nn.Sequential(f1, experts.act, f2) for f1, f2 in zip(experts.fc1, experts.fc2)]
    return MlpRows(seq, P, experts.fc1[0].in_features).eval(), len(mlps)


class Floor(NamedTuple):
    """A model's floor (keys of one runtime's models): ``base + blocks * (probe - mlp)``."""

    base: str
    blocks: int
    probe: str
    mlp: str


def floor_medians(samples: dict[str, list[float]], floors: dict[str, Floor]) -> dict[str, float]:
    """The floor (median ms) of each model of ``floors`` in every runtime whose samples hold its probes; keys
    as ``samples``' ("<runtime>/<key>")."""
    med = {k: latency_stats(v)["p50"] for k, v in samples.items()}
    out = {}
    for rt in {k.split("/", 1)[0] for k in samples}:
        for key, f in floors.items():
            parts = [f"{rt}/{k}" for k in (f.base, f.probe, f.mlp)]
            if all(p in med for p in parts):
                base, probe, mlp = (med[p] for p in parts)
                out[f"{rt}/{key}"] = base + f.blocks * (probe - mlp)
    return out
