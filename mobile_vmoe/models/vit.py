"""Dense ViT baselines and Mobile V-MoEs, registered with timm.

Both families are the same class, ``MobileVMoE`` (a timm ``VisionTransformer``): the dense model has
``num_moe_layers=0``; the MoE turns the MLPs of the last L blocks into E stacked expert MLPs and adds one
per-image router after the last dense block. Shape letters are documented in ``mobile_vmoe.models.moe``.

    model = timm.create_model("mobile_vmoe_tiny_patch16_224", num_classes=1000, num_experts=10, top_k=1)

Block i of the model is ``blocks.i`` for the dense blocks and ``moe_blocks.(i - len(blocks))`` for the MoE
blocks; ``feature_info``, ``forward_intermediates``, ``group_matcher`` and grad checkpointing count both kinds.
"""

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from .moe import MoEBlock, Router, Routing, expert_bias_names

__all__ = [
    "MobileVMoE",
    "MODEL_SIZES",
    "VARIANTS",
    "checkpoint_filter_fn",
    "remap_state_dict",
    "upcycle_dense_state_dict",
]


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
        self.router = None  # a Router when num_moe_layers > 0
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
                device=kwargs.get("device"),
                dtype=kwargs.get("dtype"),
            )
            nn.init.trunc_normal_(self.router.proj.weight, std=0.02)
            nn.init.zeros_(self.router.proj.bias)
        reduction = self.feature_info[0]["reduction"] if self.feature_info else kwargs.get("patch_size", 16)
        self.feature_info = [
            dict(module=name, num_chs=self.embed_dim, reduction=reduction) for name in self.block_names()
        ]

    @property
    def is_moe(self) -> bool:
        return self.router is not None

    @property
    def moe_routing(self) -> str | None:
        """ "image" (one router per image) for a MoE, None for a dense model; V-MoE models say "token"."""
        return "image" if self.router is not None else None

    @torch.jit.ignore
    def block_names(self) -> list[str]:
        """Module name of every block, in the order they run: the dense blocks, then the MoE blocks."""
        return [f"blocks.{i}" for i in range(len(self.blocks))] + [
            f"moe_blocks.{j}" for j in range(len(self.moe_blocks))
        ]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set(super().no_weight_decay()) | expert_bias_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for layer-wise LR decay: MoE block j is block ``len(blocks) + j``; the router joins the
        first MoE block, whose gates it makes."""
        n = len(self.blocks)
        moe = [(rf"^moe_blocks\.{j}\.", (n + j,)) for j in range(len(self.moe_blocks))]
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^router\.", (n,)), *moe, (r"^norm", (99999,))],
        )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    @torch.jit.ignore
    def _moe_block(
        self,
        blk: nn.Module,
        x: torch.Tensor,
        routing: Routing,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        if self.grad_checkpointing:
            return checkpoint(blk, x, routing, attn_mask, is_causal, use_reentrant=False)
        return blk(x, routing, attn_mask, is_causal)

    def forward_routed(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Routing | None]:
        """Images [B, 3, H, W] -> (features [B, T, D], routing or None for a dense model).

        ``expert_idx`` ([B] or [B, K]) forces the experts instead of the router's choice.
        """
        x = self._embed(x)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        routing: Routing | None = None
        router = self.router
        if router is not None:
            r = router(x, expert_idx)
            for blk in self.moe_blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    # non-reentrant: the gates inside the routing need their gradient too
                    x = checkpoint(blk, x, r, attn_mask, is_causal, use_reentrant=False)
                else:
                    x = blk(x, r, attn_mask, is_causal)
            routing = r
        return self.norm(x), routing

    def forward_features(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        return self.forward_routed(x, expert_idx, attn_mask, is_causal)[0]

    def forward_with_routing(
        self, x: torch.Tensor, expert_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing | None]:
        """(class logits [B, C], routing). The training loop takes the super-class loss on routing.logits."""
        feats, routing = self.forward_routed(x, expert_idx)
        return self.forward_head(feats), routing

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_routing(x, expert_idx)[0]

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        expert_idx: torch.Tensor | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """timm's ``VisionTransformer.forward_intermediates`` over every block, dense then MoE.

        ``indices`` count all ``len(blocks) + len(moe_blocks)`` blocks; the final features equal
        ``forward_features``. ``expert_idx`` forces the experts as in ``forward_routed``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n_dense = len(self.blocks)
        take_indices, max_index = feature_take_indices(n_dense + len(self.moe_blocks), indices)
        last = max_index if stop_early else n_dense + len(self.moe_blocks) - 1
        B, _, height, width = x.shape
        x = self._embed(x)
        intermediates: list[torch.Tensor] = []

        def take(i: int, y: torch.Tensor) -> None:
            if i in take_indices:
                intermediates.append(self.norm(y) if norm else y)

        for i, blk in enumerate(self.blocks[: min(last, n_dense - 1) + 1]):
            if attn_mask is not None or is_causal:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing:
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            take(i, x)
        if self.router is not None and last >= n_dense:
            routing = self.router(x, expert_idx)
            for j, blk in enumerate(self.moe_blocks[: last - n_dense + 1]):
                x = self._moe_block(blk, x, routing, attn_mask, is_causal)
                take(n_dense + j, x)

        prefix_tokens = None
        if self.num_prefix_tokens:
            # split prefix (class, register) and patch tokens
            prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        taken: list[Any] = intermediates
        if return_prefix_tokens and prefix_tokens is not None:
            taken = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return taken
        return self.norm(x), taken

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last one ``indices`` takes (the router too when no MoE block is left)."""
        n_dense = len(self.blocks)
        take_indices, max_index = feature_take_indices(n_dense + len(self.moe_blocks), indices)
        if max_index < n_dense:
            self.blocks = self.blocks[: max_index + 1]
            self.moe_blocks = nn.ModuleList()
            self.router = None
            self.num_experts = self.top_k = 0
        else:
            self.moe_blocks = self.moe_blocks[: max_index + 1 - n_dense]
        self.num_moe_layers = len(self.moe_blocks)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices


def remap_state_dict(state: dict[str, torch.Tensor], model: MobileVMoE) -> dict[str, torch.Tensor]:
    """A state dict in ``model``'s names: a dense (or timm ``vit_*``) one loaded into a MoE has its last blocks
    renamed to ``moe_blocks.j`` and each of their dense MLPs copied into every expert (upcycling).

    Keys that already match (a MoE's own checkpoint, a dense one into a dense model) pass through unchanged.
    """
    n_dense = len(model.blocks)
    if not model.moe_blocks or f"blocks.{n_dense}.norm1.weight" not in state:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    dense_mlp: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        parts = k.split(".", 2)
        if k.startswith("blocks.") and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) >= n_dense:
            j = int(parts[1]) - n_dense
            if parts[2].startswith("mlp."):
                dense_mlp.setdefault(j, {})[parts[2][4:]] = v
                continue
            k = f"moe_blocks.{j}.{parts[2]}"
        out[k] = v
    for j, mlp in dense_mlp.items():
        if j >= len(model.moe_blocks) or set(mlp) != {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}:
            # not an MLP this model can upcycle: keep the names, so that loading reports them
            out.update({f"blocks.{n_dense + j}.mlp.{name}": v for name, v in mlp.items()})
            continue
        E = model.moe_blocks[j].mlp.num_experts
        p = f"moe_blocks.{j}.mlp."
        out[p + "fc1_weight"] = mlp["fc1.weight"].t().unsqueeze(0).expand(E, -1, -1)  # [E, D, H]
        out[p + "fc1_bias"] = mlp["fc1.bias"].unsqueeze(0).expand(E, -1)  # [E, H]
        out[p + "fc2_weight"] = mlp["fc2.weight"].t().unsqueeze(0).expand(E, -1, -1)  # [E, H, D]
        out[p + "fc2_bias"] = mlp["fc2.bias"].unsqueeze(0).expand(E, -1)  # [E, D]
    return out


def checkpoint_filter_fn(state: dict[str, torch.Tensor], model: MobileVMoE) -> dict[str, torch.Tensor]:
    """timm's ViT checkpoint filter (unwrapping, position-embedding resampling), then ``remap_state_dict``.

    A dense checkpoint has no router: upcycled into a MoE, the router keeps the model's fresh weights (so that
    timm's strict load accepts it).
    """
    state = vit_checkpoint_filter_fn(state, model)
    dense_source = not any(k.startswith(("moe_blocks.", "router.")) for k in state)
    out = remap_state_dict(state, model)
    if model.router is not None and dense_source:
        out.update({f"router.{k}": v for k, v in model.router.state_dict().items()})
    return out


def upcycle_dense_state_dict(moe: MobileVMoE, dense_state: dict[str, torch.Tensor]) -> list[str]:
    """Load a dense checkpoint into a MoE of the same size, copying each MoE block's dense MLP into every expert.

    Returns the names of the MoE parameters that had no dense counterpart (the router's).
    """
    if not moe.is_moe:
        raise ValueError("upcycling needs a MoE model (num_moe_layers > 0)")
    n_dense = len(moe.blocks)
    for j in range(len(moe.moe_blocks)):
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            if f"blocks.{n_dense + j}.mlp.{name}" not in dense_state:
                raise ValueError(
                    f"dense checkpoint lacks 'blocks.{n_dense + j}.mlp.{name}': is it the same size as the MoE?"
                )
    missing, unexpected = moe.load_state_dict(remap_state_dict(dense_state, moe), strict=False)
    if unexpected:
        raise ValueError(f"dense checkpoint has tensors this MoE does not: {unexpected[:5]}")
    return list(missing)


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
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
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


def base_args(size: str, res: str) -> dict[str, Any]:
    """VisionTransformer kwargs of a size (width, heads; depth 12) at a resolution (image, patch, classes)."""
    dim, heads = MODEL_SIZES[size]
    img_size, patch, num_classes = RESOLUTIONS[res]
    return dict(
        img_size=img_size, patch_size=patch, embed_dim=dim, depth=12, num_heads=heads, num_classes=num_classes
    )


def build_variant(cls: type, variant: str, pretrained: bool, filter_fn: Any, args: dict[str, Any]) -> Any:
    """timm's factory: pretrained weights (``pretrained_cfg_overlay=dict(file=...)``, filtered by ``filter_fn``),
    ``features_only`` (the getter over ``forward_intermediates``), ``device`` and ``dtype``."""
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=filter_fn,
        pretrained_strict=args.pop("pretrained_strict", True),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **args,
    )


def register_variant(name: str, create: Any, doc: str, namespace: dict[str, Any]) -> None:
    """Register ``create(name, ...)`` with timm as ``name`` (as a function of the module owning ``namespace``)."""

    def fn(pretrained: bool = False, **kwargs: Any) -> Any:
        return create(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = namespace["__name__"]
    fn.__doc__ = doc
    register_model(fn)
    namespace[name] = fn


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileVMoE:
    size, res, moe = VARIANTS[variant]
    args = base_args(size, res)
    if moe:
        args.update(num_experts=10, top_k=1, num_moe_layers=2)
    elif kwargs.get("num_moe_layers"):
        raise ValueError(f"{variant} is a dense model; use mobile_vmoe_{size}_{res} for a MoE")
    args.update(kwargs)
    return build_variant(MobileVMoE, variant, pretrained, checkpoint_filter_fn, args)


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
        kind = "Mobile V-MoE" if VARIANTS[_name][2] else "dense ViT"
        register_variant(_name, _create, f"{_name}: {kind}, see MobileVMoE.", globals())
