"""Image-text contrastive models: LIMoE (Mustafa et al. 2022, "Multimodal Contrastive Learning with LIMoE"),
its dense one-tower twin and a dense two-tower CLIP, registered with timm. Shape letters as in ``moe.py``, plus
    L  text tokens per caption (context length)    Ti image tokens per image (patches)    P  joint embedding width
(inside the routing, P stays the buffer slots of ``token_moe.py``).

One tower: a patch embedding and a token embedding map each modality into width D, each with its own position
embedding; the same blocks then run both sequences. Attention stays within a sequence (the caption's causal, as
CLIP's, which also hides the padding after EOT from every real token). In each MoE block the image tokens and the
real caption tokens of the routing group go through ONE router and ONE set of expert buffers (``LIMoEMlp``); text
padding takes no slot. Pooling: the mean of the patch tokens (our choice; no class token), and the EOT token of
the caption (CLIP). Each modality has its own LayerNorm and projection to P, and one learned temperature.

Variants (our sizes): nano 32 px / patch 8 (16 image tokens) and tiny 224 px / patch 16, depth 12, P = D, captions
of up to 32 tokens; LIMoE has E=8 experts in every other block (6 of 12, the last included), top-1. The two-tower
CLIP runs the same blocks over the same tokens, one tower per modality: equal FLOPs per example to the dense
one-tower model (``flops_per_example``); LIMoE adds its routers and the buffer slack of the capacity ratio.

    model = timm.create_model("mobile_limoe_nano_patch8_32")
    out, routings = model.forward_with_routing(images, tokens)   # ImageTextOutput, [ModalityRouting] per MoE block
    model.encode_image(images)  # [B, P], the image path alone (what the phone runs)
"""

import math
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..text import text_mask
from .moe import expert_bias_names
from .profile import count_flops
from .token_moe import TokenMoEMlp, TokenMoEModel, TokenRouting
from .vit import MODEL_SIZES, register_variant
from .vmoe import moe_block_indices

__all__ = [
    "IMAGE_TEXT_VARIANTS",
    "ImageTextOutput",
    "ImageTextTransformer",
    "LIMoEMlp",
    "ModalityRouting",
    "flops_per_example",
]


class ImageTextOutput(NamedTuple):
    image_embeds: torch.Tensor  # [B, P], L2-normalised
    text_embeds: torch.Tensor  # [B, P], L2-normalised
    logit_scale: torch.Tensor  # scalar: exp of the learned log-temperature, at most max_logit_scale


class ModalityRouting(NamedTuple):
    """One MoE block's joint routing, split by modality. Each half keeps the group layout of the joint routing
    ([G, g * Ti, ...] and [G, g * L, ...], g examples per group) and the joint buffers (same slots, capacity);
    its importance/load losses are V-MoE's over that modality's routed tokens only."""

    image: TokenRouting
    text: TokenRouting
    text_mask: torch.Tensor  # [B, L] True at real caption tokens (the text half's routed tokens)
    joint: TokenRouting  # both modalities; its importance/load losses are V-MoE's over all routed tokens


def _split(t: torch.Tensor, g: int, num_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, g * (Ti + L), ...] -> ([G, g * Ti, ...], [G, g * L, ...])."""
    G, N = t.shape[:2]
    t = t.reshape(G, g, N // g, *t.shape[2:])
    return t[:, :, :num_image].flatten(1, 2), t[:, :, num_image:].flatten(1, 2)


# Kept outside the modules, as token_moe's last routing (deepcopy cannot copy graph tensors).
_LAST_MODALITY_ROUTING: "weakref.WeakKeyDictionary[nn.Module, ModalityRouting]" = weakref.WeakKeyDictionary()


class LIMoEMlp(TokenMoEMlp):
    """A ``TokenMoEMlp`` that also routes an image and a caption sequence together and splits the routing by
    modality. Called with one modality it is exactly ``TokenMoEMlp`` (what ``encode_image`` exports)."""

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, num_image_tokens: int | None = None
    ) -> torch.Tensor:
        """x [B, Ti + L, D] (the image tokens, then the caption's) -> [B, Ti + L, D]; ``token_mask`` [B, Ti + L]."""
        if num_image_tokens is None:
            return super().forward(x, token_mask)
        if token_mask is None:
            raise ValueError("routing two modalities needs the token mask of the caption padding")
        B, T, D = x.shape
        y, mask, capacity, bpr = self.grouped(x, token_mask)
        logits, noisy = self.router.scores(y)
        routing = self.router.route(logits, noisy, capacity, bpr, mask, y.dtype)
        g = y.shape[1] // T
        halves = [_split(t, g, num_image_tokens) for t in (logits, noisy, mask)]
        fields = [_split(t, g, num_image_tokens) for t in routing[1:5]]  # probs, expert_idx, gates, slot
        parts = []
        for m in (0, 1):  # image, text
            importance, load = self.router.balance_losses(*(h[m] for h in halves))
            parts.append(TokenRouting(halves[0][m], *(f[m] for f in fields), importance, load, capacity))
        self._keep(routing)  # the joint routing, in ``last_routing``
        _LAST_MODALITY_ROUTING[self] = ModalityRouting(
            parts[0], parts[1], token_mask[:, num_image_tokens:], routing
        )
        return self.experts(y, routing).reshape(B, T, D)

    @property
    def last_modality_routing(self) -> ModalityRouting | None:
        """The split routing of the last two-modality forward (with its autograd graph, for the losses)."""
        return _LAST_MODALITY_ROUTING.get(self)


def _attend(blk: Block, x: torch.Tensor, is_causal: bool) -> torch.Tensor:
    return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), is_causal=is_causal)))


def _feed_forward(
    blk: Block, x: torch.Tensor, token_mask: torch.Tensor | None = None, num_image_tokens: int | None = None
) -> torch.Tensor:
    h = blk.norm2(x)
    h = blk.mlp(h, token_mask, num_image_tokens) if isinstance(blk.mlp, LIMoEMlp) else blk.mlp(h)
    return x + blk.drop_path2(blk.ls2(h))


def _block(
    blk: Block, img: torch.Tensor | None, txt: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One pre-norm block over an image sequence, a caption sequence, or both (one joint MLP/MoE step)."""
    img = None if img is None else _attend(blk, img, False)
    txt = None if txt is None else _attend(blk, txt, True)
    if img is not None and txt is not None and isinstance(blk.mlp, LIMoEMlp):
        Ti = img.shape[1]
        token_mask = torch.cat([mask.new_ones(img.shape[:2]), mask], dim=1)  # type: ignore[union-attr]
        x = _feed_forward(blk, torch.cat([img, txt], dim=1), token_mask, Ti)
        return x[:, :Ti], x[:, Ti:]
    img = None if img is None else _feed_forward(blk, img)
    txt = None if txt is None else _feed_forward(blk, txt, mask)
    return img, txt


class ImageTextTransformer(TokenMoEModel, nn.Module):
    """LIMoE (``num_experts`` > 0), a dense one-tower model (0), or a dense two-tower CLIP (``two_tower``).

    Args:
        img_size, patch_size, in_chans: the image input. width, depth, num_heads, mlp_ratio: each tower.
        embed_dim: P, the joint embedding width. vocab_size, context_length: the caption input (open_clip BPE).
        two_tower: a separate text transformer of the same size (dense only): equal compute per example to the
            one-tower model, twice its transformer parameters.
        num_experts, top_k, moe_every: E experts in every ``moe_every``-th block counting back from the last.
        capacity_ratio / eval_capacity_ratio, bpr / eval_bpr, noise_std, group_size / eval_group_size: the
            per-token routing of ``TokenMoEMlp`` (LIMoE: BPR in training too). A group is ``group_size`` image-
            caption pairs, all their image tokens and real caption tokens.
        init_logit_scale, max_logit_scale: the temperature (CLIP: log(1 / 0.07), at most 100).
        num_classes: 0 only (timm passes it); zero-shot classification compares with class-prompt embeddings.
    """

    is_image_text = True

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 8,
        in_chans: int = 3,
        width: int = 64,
        depth: int = 12,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        embed_dim: int = 64,
        vocab_size: int = 49408,
        context_length: int = 32,
        two_tower: bool = False,
        num_experts: int = 8,
        top_k: int = 1,
        moe_every: int = 2,
        capacity_ratio: float = 1.05,
        eval_capacity_ratio: float = 1.05,
        bpr: bool = True,
        eval_bpr: bool = True,
        noise_std: float = 1.0,
        group_size: int = 8,
        eval_group_size: int = 1,
        drop_path_rate: float = 0.0,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        num_classes: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_classes:
            raise ValueError(
                f"an image-text model has no classifier (zero-shot uses class prompts): num_classes={num_classes}"
            )
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0: dense), got {num_experts}")
        if two_tower and num_experts:
            raise ValueError("two_tower models are dense here: pass num_experts=0")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        dd: dict[str, Any] = dict(device=device, dtype=dtype)
        self.patch_embed = PatchEmbed(to_2tuple(img_size), patch_size, in_chans, width, **dd)
        self.num_image_tokens = self.patch_embed.num_patches
        self.image_size = self.patch_embed.img_size[0]
        self.image_pos_embed = nn.Parameter(torch.empty(1, self.num_image_tokens, width, **dd))
        self.token_embed = nn.Embedding(vocab_size, width, **dd)
        self.text_pos_embed = nn.Parameter(torch.empty(1, context_length, width, **dd))
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]

        def tower() -> nn.Sequential:
            return nn.Sequential(
                *[
                    Block(width, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], **dd)
                    for i in range(depth)
                ]
            )

        self.blocks = tower()
        self.text_blocks = tower() if two_tower else None
        self.moe_indices = moe_block_indices(depth, moe_every, "every") if num_experts else []
        self.num_moe_layers = len(self.moe_indices)
        for i in self.moe_indices:
            self.blocks[i].mlp = LIMoEMlp.from_block_mlp(
                self.blocks[i].mlp,
                num_experts,
                top_k=top_k,
                capacity_ratio=capacity_ratio,
                eval_capacity_ratio=eval_capacity_ratio,
                bpr=bpr,
                eval_bpr=eval_bpr,
                noise_std=noise_std,
                group_size=group_size,
                eval_group_size=eval_group_size,
            )
        self.image_norm = nn.LayerNorm(width, **dd)
        self.image_proj = nn.Linear(width, embed_dim, bias=False, **dd)
        self.text_norm = nn.LayerNorm(width, **dd)
        self.text_proj = nn.Linear(width, embed_dim, bias=False, **dd)
        self.logit_scale = nn.Parameter(torch.full((), init_logit_scale, **dd))
        self.max_logit_scale = max_logit_scale
        self.width, self.embed_dim, self.depth = width, embed_dim, depth
        self.vocab_size, self.context_length = vocab_size, context_length
        self.two_tower = two_tower
        self.num_experts = num_experts
        self.top_k = top_k if num_experts else 0
        # per-token routing: an example's tokens reach every expert (count_params reads this)
        self.active_experts_per_image = min(num_experts, (self.num_image_tokens + context_length) * top_k)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.image_pos_embed, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.text_pos_embed, std=0.01)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_indices)

    @property
    def moe_routing(self) -> str | None:
        return "token" if self.moe_indices else None

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"image_pos_embed", "text_pos_embed", "logit_scale"} | expert_bias_names(self)

    def _embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(images) + self.image_pos_embed

    def _embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must be [B, L] with L <= {self.context_length}, got {tuple(tokens.shape)}"
            )
        return self.token_embed(tokens) + self.text_pos_embed[:, : tokens.shape[1]]

    def _towers(
        self, img: torch.Tensor | None, txt: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token sequences through the transformer: shared blocks (one tower) or one tower each."""
        if self.text_blocks is not None:
            img = None if img is None else self._run(self.blocks, img, None, None)[0]
            txt = None if txt is None else self._run(self.text_blocks, None, txt, mask)[1]
            return img, txt
        return self._run(self.blocks, img, txt, mask)

    def _run(
        self,
        blocks: nn.Sequential,
        img: torch.Tensor | None,
        txt: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        for blk in blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                # non-reentrant: the routing's gates need their gradient too
                img, txt = checkpoint(_block, blk, img, txt, mask, use_reentrant=False)
            else:
                img, txt = _block(blk, img, txt, mask)
        return img, txt

    def _image_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_norm(x.mean(dim=1))), dim=-1)

    def _text_head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        eot = tokens.argmax(dim=-1)  # EOT has the largest id of the vocabulary
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return F.normalize(self.text_proj(self.text_norm(x)), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, P] normalised; each image routed on its own at inference."""
        return self._image_head(self._towers(self._embed_image(images), None, None)[0])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (``Tokenizer``) -> [B, P] normalised; padding is routed nowhere."""
        mask = text_mask(tokens)
        return self._text_head(self._towers(None, self._embed_text(tokens), mask)[1], tokens)

    def scale(self) -> torch.Tensor:
        """exp of the learned log-temperature, clamped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> ImageTextOutput:
        """A batch of image-caption pairs, both modalities in one pass (routed together in the MoE blocks)."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"images and tokens must pair up: batch {images.shape[0]} vs {tokens.shape[0]}")
        mask = text_mask(tokens)
        img, txt = self._towers(self._embed_image(images), self._embed_text(tokens), mask)
        return ImageTextOutput(self._image_head(img), self._text_head(txt, tokens), self.scale())

    @torch.jit.ignore
    def forward_with_routing(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[ImageTextOutput, list[ModalityRouting]]:
        """(the output, each MoE block's routing split by modality, in block order; [] for a dense model)."""
        out = self.forward(images, tokens)
        routings = [mlp.last_modality_routing for mlp in self.moe_mlps()]
        return out, routings  # type: ignore[return-value]


def flops_per_example(model: nn.Module) -> int:
    """Forward FLOPs of one image-caption pair (full-length caption), batch 1, eval mode: both modalities, at the
    image size the model was built for (its name's size may differ: ``img_size=``)."""
    return count_flops(model)


# name -> (size, patch resolution, family); family: "limoe" (one tower, E=8), "onetower" (dense), "clip"
_FAMILIES = {
    "limoe": dict(num_experts=8),
    "onetower": dict(num_experts=0),
    "clip": dict(num_experts=0, two_tower=True),
}
_RES = {"patch8_32": (32, 8), "patch16_224": (224, 16)}
_SIZES = {"nano": "patch8_32", "tiny": "patch16_224"}
IMAGE_TEXT_VARIANTS: dict[str, tuple[str, str, str]] = {
    f"mobile_{fam}_{size}_{res}": (size, res, fam) for fam in _FAMILIES for size, res in _SIZES.items()
}


def _cfg(img_size: int) -> dict[str, Any]:
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, img_size, img_size),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "image_proj",
        "license": "apache-2.0",
    }


default_cfgs = generate_default_cfgs(
    {name: _cfg(_RES[res][0]) for name, (_, res, _) in IMAGE_TEXT_VARIANTS.items()}
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ImageTextTransformer:
    size, res, fam = IMAGE_TEXT_VARIANTS[variant]
    width, heads = MODEL_SIZES[size]
    args: dict[str, Any] = dict(
        img_size=_RES[res][0], patch_size=_RES[res][1], width=width, num_heads=heads, embed_dim=width
    )
    args.update(_FAMILIES[fam])
    args.update(kwargs)
    if fam != "limoe" and args.get("num_experts"):
        raise ValueError(f"{variant} is dense; use mobile_limoe_{size}_{res} for a MoE")
    return build_model_with_cfg(ImageTextTransformer, variant, pretrained, **args)


_DOCS = {
    "limoe": "LIMoE: one tower, E=8 experts every other block, top-1 per-token routing with BPR",
    "onetower": "dense one-tower image-text model (LIMoE without experts)",
    "clip": "dense two-tower CLIP of the same per-example compute",
}
for _name, (_, _, _fam) in IMAGE_TEXT_VARIANTS.items():
    register_variant(_name, _create, f"{_name}: {_DOCS[_fam]}, see ImageTextTransformer.", globals())
