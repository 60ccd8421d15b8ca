"""V-MoE ViTs (per-token routing), registered with timm next to the dense and per-image families.

``TokenVMoE`` is a timm ``VisionTransformer`` whose MoE blocks (the last n, every n-th, or V-MoE's "Last n")
route every token (``token_moe.TokenMoEMlp`` in a timm ``Block``'s MLP slot). Each MoE block carries its own
router, so the blocks stay plain timm blocks in one ``nn.Sequential``, and timm's block-wise APIs
(intermediates, grad checkpointing, layer groups, features) apply unchanged.

    model = timm.create_model("mobile_vmoe_token_tiny_patch16_224", num_experts=10, top_k=1, capacity_ratio=1.05)
    model.set_routing(capacity_ratio=0.5, bpr=True)  # inference capacity, without retraining
    model.set_routing(bpr=True, cls_first=True)  # "bpr_cls": each image's class token ahead of its patches
"""

from typing import Any

import torch
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from .moe import expert_bias_names
from .token_moe import TokenMoEMlp, TokenMoEModel, TokenRouting, expert_capacity
from .vit import MODEL_SIZES, RESOLUTIONS, SMALL_IMAGE_SIZES, _cfg, base_args, build_variant, register_variant

__all__ = ["TokenVMoE", "TOKEN_VARIANTS", "moe_block_indices"]

PLACEMENTS = ("last", "every", "vmoe_last")


def moe_block_indices(depth: int, num_moe_layers: int, placement: str) -> list[int]:
    """Which blocks are MoE: the last n ("last", as in Mobile V-MoE), every n-th counting back from the last
    ("every"), or V-MoE's "Last n" ("vmoe_last": the last n of the odd blocks 1, 3, 5, ..., so every other
    block; ViT-B's "Last 2" is blocks 9 and 11)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"moe_placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "vmoe_last":
        odd = list(range(1, depth, 2))
        if not 1 <= num_moe_layers <= len(odd):
            raise ValueError(
                f"num_moe_layers must be in [1, {len(odd)}] (odd blocks of depth {depth}), got {num_moe_layers}"
            )
        return odd[-num_moe_layers:]
    if placement == "last":
        if not 1 <= num_moe_layers <= depth:
            raise ValueError(f"num_moe_layers must be in [1, depth={depth}], got {num_moe_layers}")
        return list(range(depth - num_moe_layers, depth))
    if not 1 <= num_moe_layers <= depth:
        raise ValueError(f"with moe_placement='every', num_moe_layers is the stride, in [1, {depth}]")
    return [i for i in range(depth) if (depth - 1 - i) % num_moe_layers == 0]


class TokenVMoE(TokenMoEModel, VisionTransformer):
    """Pre-norm ViT with per-token sparse MoE blocks (V-MoE).

    Args (beyond timm's VisionTransformer):
        num_experts: E experts per MoE block.
        top_k: K experts per token (V-MoE: 1 or 2).
        num_moe_layers, moe_placement: the last n blocks ("last"), every n-th block ("every", V-MoE's "Every
            2"), or V-MoE's "Last n" ("vmoe_last": the last n of every other block).
        capacity_ratio / eval_capacity_ratio: buffer size in training / inference (V-MoE trains at 1.05).
        bpr / eval_bpr: Batch Priority Routing in training / inference (V-MoE: off / on).
        cls_first / eval_cls_first: under BPR, each image's class token ahead of every patch ("bpr_cls"; ours,
            not V-MoE's: the head reads only that token, which plain BPR drops at low capacity like any other).
        noise_std: router noise in training is noise_std / E (V-MoE: 1.0).
        group_size / eval_group_size: images whose tokens are routed together in training (V-MoE: 8) / at
            inference (1: each image on its own, as on a phone).
    """

    moe_routing = "token"

    def __init__(
        self,
        *,
        num_experts: int = 10,
        top_k: int = 1,
        num_moe_layers: int = 2,
        moe_placement: str = "last",
        capacity_ratio: float = 1.05,
        eval_capacity_ratio: float = 1.05,
        bpr: bool = False,
        eval_bpr: bool = True,
        cls_first: bool = False,
        eval_cls_first: bool = False,
        noise_std: float = 1.0,
        group_size: int = 8,
        eval_group_size: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.moe_indices = moe_block_indices(len(self.blocks), num_moe_layers, moe_placement)
        for i in self.moe_indices:
            blk = self.blocks[i]
            blk.mlp = TokenMoEMlp.from_block_mlp(
                blk.mlp,
                num_experts,
                top_k=top_k,
                capacity_ratio=capacity_ratio,
                eval_capacity_ratio=eval_capacity_ratio,
                bpr=bpr,
                eval_bpr=eval_bpr,
                prefix_tokens=self.num_prefix_tokens,
                cls_first=cls_first,
                eval_cls_first=eval_cls_first,
                noise_std=noise_std,
                group_size=group_size,
                eval_group_size=eval_group_size,
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_moe_layers = len(self.moe_indices)
        # every expert an image's tokens can reach: all E as soon as T * K >= E (count_params reads this)
        self.active_experts_per_image = min(
            num_experts, (self.patch_embed.num_patches + self.num_prefix_tokens) * top_k
        )

    @property
    def is_moe(self) -> bool:
        return True

    @torch.jit.ignore
    def expert_capacity(self, capacity_ratio: float, group_size: int = 1) -> int:
        """P, the buffer slots per expert, for a group of ``group_size`` images at ``capacity_ratio``."""
        T = self.patch_embed.num_patches + self.num_prefix_tokens
        return expert_capacity(group_size * T, self.top_k, capacity_ratio, self.num_experts)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | expert_bias_names(self)

    @torch.jit.ignore
    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, list[TokenRouting]]:
        """(class logits [B, C], each MoE block's routing, in block order)."""
        logits = self.forward(x)
        return logits, [mlp.last_routing for mlp in self.moe_mlps()]


def _variants() -> dict[str, tuple[str, str]]:
    out = {}
    for res in RESOLUTIONS:
        for size in MODEL_SIZES:
            if res == "patch16_224" or size in SMALL_IMAGE_SIZES:
                out[f"mobile_vmoe_token_{size}_{res}"] = (size, res)
    return out


TOKEN_VARIANTS = _variants()
default_cfgs = generate_default_cfgs(
    {name: _cfg(RESOLUTIONS[res][0], RESOLUTIONS[res][2]) for name, (_, res) in TOKEN_VARIANTS.items()}
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> TokenVMoE:
    args = base_args(*TOKEN_VARIANTS[variant])
    args.update(kwargs)
    return build_variant(TokenVMoE, variant, pretrained, vit_checkpoint_filter_fn, args)


for _name in TOKEN_VARIANTS:
    register_variant(_name, _create, f"{_name}: V-MoE (per-token routing), see TokenVMoE.", globals())
