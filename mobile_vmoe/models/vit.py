"""Dense ViT baselines and Mobile V-MoEs, registered with timm.

Both families are the same class, ``MobileVMoE`` (a timm ``VisionTransformer``): the dense model has
``num_moe_layers=0``; the MoE turns the MLPs of the last L blocks into E stacked expert MLPs and adds one
per-image router after the last dense block. Shape letters are documented in ``mobile_vmoe.models.moe``.

    model = timm.create_model("mobile_vmoe_tiny_patch16_224", num_classes=1000, num_experts=10, top_k=1)
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .moe import MoEBlock, Router, Routing

__all__ = ["MobileVMoE", "MODEL_SIZES", "upcycle_dense_state_dict"]


class MobileVMoE(VisionTransformer):
    """Pre-norm ViT whose last ``num_moe_layers`` blocks are per-image sparse MoE blocks.

    Args (beyond timm's VisionTransformer):
        num_experts: E, experts per MoE block (the paper: ~10 works best).
        top_k: K, experts run per image (the paper: 1 or 2).
        num_moe_layers: L, how many of the last blocks are MoE (the paper: 2 of 12). 0 gives a dense ViT.
        router_summary: "mean" (patch-token mean, default) or "cls" (class token); see ``Router``.
        renormalize_gates: rescale the K gates to sum to 1 (off by default; see ``Router``).
        moe_dispatch: "auto" | "gather" | "grouped"; see ``ExpertMlp``.
    """

    def __init__(
        self,
        *,
        num_experts: int = 10,
        top_k: int = 1,
        num_moe_layers: int = 0,
        router_summary: str = "mean",
        renormalize_gates: bool = False,
        moe_dispatch: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        depth = len(self.blocks)
        if not 0 <= num_moe_layers <= depth:
            raise ValueError(f"num_moe_layers must be in [0, depth={depth}], got {num_moe_layers}")
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts if num_moe_layers else 0
        self.top_k = top_k if num_moe_layers else 0
        self.router: Router | None = None
        self.moe_blocks = nn.ModuleList()
        if num_moe_layers:
            if num_experts < 1:
                raise ValueError(f"num_experts must be >= 1, got {num_experts}")
            blocks = list(self.blocks)
            self.blocks = nn.Sequential(*blocks[: depth - num_moe_layers])
            self.moe_blocks = nn.ModuleList(
                MoEBlock(b, num_experts=num_experts, dispatch=moe_dispatch)
                for b in blocks[depth - num_moe_layers :]
            )
            self.router = Router(
                self.embed_dim,
                num_experts,
                top_k=top_k,
                summary=router_summary,
                renormalize=renormalize_gates,
                num_prefix_tokens=self.num_prefix_tokens,
            )
            nn.init.trunc_normal_(self.router.proj.weight, std=0.02)
            nn.init.zeros_(self.router.proj.bias)

    @property
    def is_moe(self) -> bool:
        return self.router is not None

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Expert biases are stacked [E, H] tensors, so timm's "ndim <= 1 or *.bias" rule does not catch them.
        names = set(super().no_weight_decay())
        names.update(n for n, _ in self.named_parameters() if n.endswith(("fc1_bias", "fc2_bias")))
        return names

    def forward_routed(
        self, x: torch.Tensor, expert_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing | None]:
        """Images [B, 3, H, W] -> (features [B, T, D], routing or None for a dense model).

        ``expert_idx`` ([B] or [B, K]) forces the experts instead of the router's choice.
        """
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        routing = None
        if self.router is not None:
            routing = self.router(x, expert_idx)
            for blk in self.moe_blocks:
                x = blk(x, routing)
        return self.norm(x), routing

    def forward_features(
        self, x: torch.Tensor, expert_idx: torch.Tensor | None = None, **_: Any
    ) -> torch.Tensor:
        return self.forward_routed(x, expert_idx)[0]

    def forward_with_routing(
        self, x: torch.Tensor, expert_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing | None]:
        """(class logits [B, C], routing). The training loop takes the super-class loss on routing.logits."""
        feats, routing = self.forward_routed(x, expert_idx)
        return self.forward_head(feats), routing

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_routing(x, expert_idx)[0]


def upcycle_dense_state_dict(moe: MobileVMoE, dense_state: dict[str, torch.Tensor]) -> list[str]:
    """Load a dense checkpoint into a MoE of the same size, copying each MoE block's dense MLP into every expert.

    Returns the names of the MoE parameters that had no dense counterpart (the router's).
    """
    if not moe.is_moe:
        raise ValueError("upcycling needs a MoE model (num_moe_layers > 0)")
    n_dense = len(moe.blocks)
    mapped: dict[str, torch.Tensor] = {}
    for k, v in dense_state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i >= n_dense:
                rest = k.split(".", 2)[2]
                if rest.startswith("mlp."):
                    continue  # copied into the experts below
                k = f"moe_blocks.{i - n_dense}.{rest}"
        mapped[k] = v
    missing, unexpected = moe.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ValueError(f"dense checkpoint has tensors this MoE does not: {unexpected[:5]}")
    for j, blk in enumerate(moe.moe_blocks):
        p = f"blocks.{n_dense + j}.mlp."
        try:
            blk.mlp.load_dense(
                dense_state[p + "fc1.weight"],
                dense_state[p + "fc1.bias"],
                dense_state[p + "fc2.weight"],
                dense_state[p + "fc2.bias"],
            )
        except KeyError as e:
            raise ValueError(
                f"dense checkpoint lacks {e.args[0]!r}: is it the same size as the MoE?"
            ) from None
    return [m for m in missing if not m.startswith("moe_blocks.") or ".mlp." not in m]


# name -> (embed_dim, num_heads). Depth is 12 for all; head width 64 down to ViT-Tiny, 32 below it.
MODEL_SIZES: dict[str, tuple[int, int]] = {
    "small": (384, 6),
    "tiny": (192, 3),
    "mini": (128, 4),
    "micro": (96, 3),
    "nano": (64, 2),
}
# name suffix -> (img_size, patch_size, default num_classes). 32 px is for the built-in datasets (10 x 10 classes).
# patch8_32 (16 tokens) trains 4x faster than patch4_32 (64 tokens): the built-in demo's choice on 2 CPU cores.
RESOLUTIONS: dict[str, tuple[int, int, int]] = {
    "patch16_224": (224, 16, 1000),
    "patch4_32": (32, 4, 100),
    "patch8_32": (32, 8, 100),
}
SMALL_IMAGE_SIZES = ("tiny", "mini", "micro", "nano")


def _cfg(img_size: int, num_classes: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (3, img_size, img_size),
        "pool_size": None,
        "crop_pct": 0.875 if img_size >= 224 else 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def _variants() -> dict[str, tuple[str, str, bool]]:
    out = {}
    for res in RESOLUTIONS:
        for size in MODEL_SIZES:
            if res != "patch16_224" and size not in SMALL_IMAGE_SIZES:
                continue
            out[f"mobile_vit_{size}_{res}"] = (size, res, False)
            out[f"mobile_vmoe_{size}_{res}"] = (size, res, True)
    return out


VARIANTS = _variants()
default_cfgs = generate_default_cfgs(
    {name: _cfg(RESOLUTIONS[res][0], RESOLUTIONS[res][2]) for name, (_, res, _) in VARIANTS.items()}
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileVMoE:
    size, res, moe = VARIANTS[variant]
    dim, heads = MODEL_SIZES[size]
    img_size, patch, num_classes = RESOLUTIONS[res]
    args: dict[str, Any] = dict(
        img_size=img_size, patch_size=patch, embed_dim=dim, depth=12, num_heads=heads, num_classes=num_classes
    )
    if moe:
        args.update(num_experts=10, top_k=1, num_moe_layers=2)
    elif kwargs.get("num_moe_layers"):
        raise ValueError(f"{variant} is a dense model; use mobile_vmoe_{size}_{res} for a MoE")
    args.update(kwargs)
    if pretrained:
        raise ValueError(f"{variant} has no published weights; train one with `mobile-vmoe train`")
    return build_model_with_cfg(MobileVMoE, variant, pretrained=False, **args)


def _register(name: str) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> MobileVMoE:
        return _create(name, pretrained=pretrained, **kwargs)

    fn.__name__ = name
    fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = f"{name}: {'Mobile V-MoE' if VARIANTS[name][2] else 'dense ViT'}, see MobileVMoE."
    register_model(fn)
    globals()[name] = fn


# The two names the paper's headline pair is known by, written out as timm does.
@register_model
def mobile_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> MobileVMoE:
    """Dense ViT-Tiny (12 x 192, 3 heads, patch 16, 224 px): the paper's baseline."""
    return _create("mobile_vit_tiny_patch16_224", pretrained=pretrained, **kwargs)


@register_model
def mobile_vmoe_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> MobileVMoE:
    """Mobile V-MoE-Tiny: ViT-Tiny with E=10 experts in the last L=2 blocks, top-k=1 per-image routing."""
    return _create("mobile_vmoe_tiny_patch16_224", pretrained=pretrained, **kwargs)


for _name in VARIANTS:
    if _name not in globals():
        _register(_name)
