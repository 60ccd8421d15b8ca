"""Module rewrites that keep a timm ViT inside XNNPACK when it is lowered to a .pte.

Lowered as it is (torch 2.14, executorch 1.5), a ViT block splits into several XNNPACK subgraphs with
ExecuTorch's portable kernels running between them:

* ``F.scaled_dot_product_attention`` exports as a math decomposition with a NaN guard (eq / any / logical_not /
  where / mul.Scalar) that XNNPACK does not take. On mobile_vmoe_tiny_patch16_224 (1 thread) those portable ops
  took 13.5 of 37 ms, more than every fp32 linear together;
* the XNNPACK partitioner has no layer norm, so every norm (two per block) ends a subgraph and runs a portable kernel;
* a 4-D ``@`` exports as expand_copy + bmm, and ``unbind`` as squeeze_copy: more portable copies;
* a MoE router's token mean (mean.dim over a 3-D tensor) is portable too; as a 4-D mean it is XNNPACK's,
  with two layout transposes around it (0.03 ms on ViT-Tiny), while a linear map over the tokens needs one.

``for_xnnpack`` returns a copy of the model with the same parameters in which timm ``Attention`` computes with
3-D ``bmm`` and ``nn.LayerNorm`` takes its two statistics as matmuls with a constant averaging vector; every op
of a block then has an XNNPACK kernel. The maths is unchanged (export checks fp32 parity against the original
model) and int8 gains most, because what stays fp32 is then cheap: on that model, 2 threads, fp32 went from
25.2 to 13.1 ms and dynamic int8 from 20.2 to 8.0 ms (benchmarks/export_latency.py prints the ratios).
Only the .pte path uses it: Core ML and ONNX Runtime have native attention and layer norm.
"""

from __future__ import annotations

import copy

import torch
from timm.layers.attention import Attention
from torch import nn
from torch.nn import functional as F

from mobile_vmoe.models.moe import Router

__all__ = ["for_xnnpack", "BmmAttention", "MatmulLayerNorm"]


class BmmAttention(nn.Module):
    """timm ``Attention`` (self-attention without mask or gate, or causal) as two 3-D batched matmuls.

    Takes over the source module's submodules under the same names, so parameter and module paths do not change
    (``blocks.0.attn.qkv`` stays that). H heads of width hd, D = H * hd; other letters as in the package.
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.norm, self.proj, self.proj_drop = attn.norm, attn.proj, attn.proj_drop

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("BmmAttention is for unmasked or causal self-attention; got a mask")
        B, T, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        A = H * hd
        qkv = self.qkv(x)  # [B, T, 3 * A]
        # Slices, not unbind: unbind exports as squeeze_copy, which XNNPACK does not take.
        q, k, v = (qkv[..., i * A : (i + 1) * A].reshape(B, T, H, hd).transpose(1, 2) for i in range(3))
        q, k = self.q_norm(q), self.k_norm(k)  # [B, H, T, hd]
        q = (q * self.scale).reshape(B * H, T, hd)
        attn = torch.bmm(q, k.reshape(B * H, T, hd).transpose(1, 2))  # [B*H, T, T]
        if is_causal:  # a caption's tokens see only those before them (CLIP's text tower)
            attn = attn + torch.full((T, T), float("-inf"), dtype=attn.dtype, device=attn.device).triu(1)
        attn = attn.softmax(dim=-1)
        y = torch.bmm(attn, v.reshape(B * H, T, hd))  # [B*H, T, hd]
        y = y.reshape(B, H, T, hd).transpose(1, 2).reshape(B, T, A)
        return self.proj_drop(self.proj(self.norm(y)))


class MatmulLayerNorm(nn.Module):
    """LayerNorm over the last dimension; mean and variance come from a linear map with weights 1/D (XNNPACK's)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"MatmulLayerNorm normalises one dimension, got {norm.normalized_shape}")
        (D,) = norm.normalized_shape
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        dtype = norm.weight.dtype if norm.weight is not None else torch.float32
        self.register_buffer("avg", torch.full((1, D), 1.0 / D, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear, not ``@``: a linear takes [..., D] as it is, while a 3-D matmul exports with reshapes around
        # a 2-D mm, and a reshape of a delegate input is a copy inside XNNPACK.
        xc = x - F.linear(x, self.avg)  # [..., D] - [..., 1]
        y = xc * torch.rsqrt(F.linear(xc * xc, self.avg) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def _rewritable_attention(m: nn.Module) -> bool:
    # Exactly timm's Attention: subclasses (rope, ...) compute something else in forward.
    return type(m) is Attention and getattr(m, "gate", None) is None


def _num_tokens(model: nn.Module) -> int | None:
    """T of a timm ViT with a fixed image size (the router's token mean needs it); None when unknown."""
    patch_embed = getattr(model, "patch_embed", None)
    num_patches = getattr(patch_embed, "num_patches", None)
    if num_patches is None or getattr(model, "dynamic_img_size", False):
        return None
    return int(num_patches) + int(getattr(model, "num_prefix_tokens", 0))


def for_xnnpack(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """(eval-mode copy of ``model`` with the rewrites, how many modules of each kind were rewritten).

    Also gives each mean-summary ``Router`` its ``token_avg`` row, so that the token mean is a linear map
    (needs the token count T: a timm ViT with a fixed image size).

    Modules that do not match (a gated or rope attention, a multi-dimensional norm) stay as they are.
    """
    model = copy.deepcopy(model).eval()
    num_tokens = _num_tokens(model)
    counts = {"attention": 0, "layer_norm": 0, "router_pool": 0}
    # Children before parents: an attention's q/k norms are swapped before the attention hands them over.
    for parent in reversed(list(model.modules())):
        for name, child in list(parent.named_children()):
            if _rewritable_attention(child):
                setattr(parent, name, BmmAttention(child))
                counts["attention"] += 1
            elif isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                setattr(parent, name, MatmulLayerNorm(child))
                counts["layer_norm"] += 1
        if isinstance(parent, Router) and parent.summary == "mean" and num_tokens is not None:
            P = parent.num_prefix_tokens
            avg = torch.full((1, num_tokens), 1.0 / (num_tokens - P), dtype=parent.proj.weight.dtype)
            avg[:, :P] = 0.0
            parent.token_avg = avg.to(parent.proj.weight.device)
            counts["router_pool"] += 1
    return model, counts
