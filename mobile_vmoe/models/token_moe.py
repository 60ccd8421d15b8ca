"""Per-token sparse Mixture-of-Experts layers: V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse
Mixture of Experts"). Shape letters are those of ``moe.py``, plus the routing letters defined there:
G groups of tokens routed together, N tokens per group, P buffer slots per expert.

Every token picks its top K of E experts with a noisy softmax router. Tokens are routed in groups (the tokens
of a few images), and each expert has a fixed buffer of P = ceil(K * N * capacity_ratio / E) slots per group:
a choice past a full buffer is dropped, and the token passes through the block's residual only. All first
choices are placed before any second choice; Batch Priority Routing (BPR) also orders the tokens by their top
gate, so that an important token is never dropped for an unimportant one. ``bpr_cls`` (ours, not V-MoE's) also
puts each image's class token ahead of every patch: a classifier reads only that token, and plain BPR drops it
at low capacity like any other.

Static shapes throughout: tokens are scattered into [E, P, D] buffers and gathered back, with no data-dependent
Python control flow, so torch.export keeps the whole block.
"""

import math
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from .moe import ExpertMlp

# Inference priority -> (BPR, class token first): the names of ``mobile-vmoe eval/export --priority``.
PRIORITY_FLAGS: dict[str, tuple[bool, bool]] = {
    "bpr": (True, False),  # Batch Priority Routing: by descending top gate
    "vanilla": (False, False),  # tokens in their order
    "bpr_cls": (True, True),  # BPR with each image's class (prefix) tokens first
}


def priority_flags(priority: str | None) -> tuple[bool | None, bool | None]:
    """``set_routing``'s (bpr, cls_first) for a priority name; (None, None) keeps the model's own."""
    return (None, None) if priority is None else PRIORITY_FLAGS[priority]


def priority_name(bpr: bool, cls_first: bool) -> str:
    """The name in ``PRIORITY_FLAGS`` of BPR on/off and class token first (vanilla ignores the latter)."""
    return {flags: name for name, flags in PRIORITY_FLAGS.items()}[(bpr, bpr and cls_first)]


class TokenRouting(NamedTuple):
    """One MoE block's routing of a batch, with what training and the analysis read from it."""

    logits: torch.Tensor  # [G, N, E] router logits before the noise
    probs: torch.Tensor  # [G, N, E] softmax of the logits the choice was made on (noisy in training)
    expert_idx: torch.Tensor  # [G, N, K] chosen experts, int64
    gates: torch.Tensor  # [G, N, K] weight of each choice: probs at the chosen experts
    slot: torch.Tensor  # [G, N, K] buffer slot e * P + p of each choice; E * P when the choice was dropped
    importance_loss: torch.Tensor  # scalar, V-MoE's importance loss (mean over groups)
    load_loss: torch.Tensor  # scalar, V-MoE's load loss (0 without router noise)
    capacity: int  # P, buffer slots per expert and group


def expert_capacity(num_tokens: int, top_k: int, capacity_ratio: float, num_experts: int) -> int:
    """P = ceil(K * N * ratio / E), at least 1 and at most N (a token picks an expert at most once)."""
    return max(1, min(num_tokens, math.ceil(top_k * num_tokens * capacity_ratio / num_experts)))


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last axis, averaged over the others."""
    x = x.float()
    return (x.var(dim=-1, unbiased=False) / (x.mean(dim=-1) ** 2 + 1e-10)).mean()


def buffer_slots(
    expert_idx: torch.Tensor,
    gates: torch.Tensor,
    num_experts: int,
    capacity: int,
    bpr: bool,
    mask: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Place every choice in its expert's buffer: expert_idx, gates [G, N, K] -> slot [G, N, K].

    Choices are ranked K-major (all first choices, then all second choices); within a rank, in token order, or
    with ``bpr`` by descending top gate, the tokens in ``first`` ([N] bool: the class tokens) ahead of all
    others. A choice's position is the count of earlier choices of its expert; positions >= ``capacity`` are
    dropped (slot E * P). Tokens outside ``mask`` ([G, N], True = routed; text padding) take no slot and are not
    counted.
    """
    G, N, K = expert_idx.shape
    E, P = num_experts, capacity
    # Few, small ops: exported, each of them is a portable kernel call on the phone. K = 1 (the usual inference)
    # needs no K-major reshuffle.
    idx = expert_idx.reshape(G, N) if K == 1 else expert_idx.transpose(1, 2).reshape(G, K * N)  # K-major
    rank: torch.Tensor | None = None  # [G, K * N]: the choice each ranked position holds (None: token order)
    if bpr:
        priority = gates[..., 0]  # [G, N]
        if first is not None:  # gates are <= 1: + 2 ranks these ahead, in gate order among themselves
            priority = priority + 2.0 * first.to(priority.dtype)
        # most confident first; topk, not argsort: ExecuTorch's portable kernels have no sort
        order = priority.topk(N, dim=1).indices
        rank = order if K == 1 else (order.unsqueeze(1) + N * torch.arange(K, device=idx.device)[:, None])
        rank = rank.reshape(G, K * N)
        idx = idx.gather(1, rank)
    onehot = F.one_hot(idx, E)  # [G, K * N, E] in ranking order
    routed: torch.Tensor | None = None  # [G, K * N] in ranking order: the choices of tokens inside the mask
    if mask is not None:  # a masked token counts for no expert
        routed = (mask if rank is None else mask.gather(1, rank[:, :N])).repeat(1, K)
        onehot = onehot * routed.unsqueeze(-1)
    # Position = earlier choices of the same expert: the running count at the choice's own expert, minus itself.
    pos = onehot.cumsum(dim=1).gather(2, idx.unsqueeze(-1)).reshape(G, K * N) - 1
    keep = pos < P if routed is None else (pos < P) & routed
    slot = torch.where(keep, idx * P + pos, torch.full_like(pos, E * P))
    if rank is not None:  # back to choice order: slot_in_choice_order[rank[i]] = slot[i]
        slot = torch.zeros_like(slot).scatter(1, rank, slot)
    return slot.reshape(G, N, 1) if K == 1 else slot.reshape(G, K, N).transpose(1, 2)


@register_notrace_module
class TokenRouter(nn.Module):
    """Noisy top-K router: a bias-free linear map of each token to E logits (V-MoE's ``NoisyTopExpertsPerItem``).

    In training, Gaussian noise of std ``noise_std / E`` is added to the logits before the softmax; the load
    loss is the squared coefficient of variation of P(expert in a token's top K under that noise).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        noise_std: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.proj = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        capacity: int,
        bpr: bool,
        mask: torch.Tensor | None = None,
        first: torch.Tensor | None = None,
    ) -> TokenRouting:
        """x: [G, N, D] -> the routing of its G * N tokens into [E, capacity] buffers.

        ``mask`` [G, N] (True = routed): the other tokens take no buffer slot and count in no loss. ``first``
        [N]: tokens BPR ranks ahead of the others (``buffer_slots``).
        """
        logits, noisy = self.scores(x)
        return self.route(logits, noisy, capacity, bpr, mask, x.dtype, first)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [G, N, D] -> (logits, logits plus the training noise), both [G, N, E] in float32."""
        logits = self.proj(x).float()  # float: softmax and the normal CDF want the precision
        std = self.noise_std / self.num_experts
        noisy = logits + torch.randn_like(logits) * std if self.training and std > 0 else logits
        return logits, noisy

    def route(
        self,
        logits: torch.Tensor,
        noisy: torch.Tensor,
        capacity: int,
        bpr: bool,
        mask: torch.Tensor | None,
        dtype: torch.dtype,
        first: torch.Tensor | None = None,
    ) -> TokenRouting:
        """The routing from ``scores``: top-K of the noisy softmax, buffer slots, balance losses; gates in ``dtype``."""
        probs = noisy.softmax(dim=-1)
        # [G, N, K]; max for one choice: exported, a portable topk over E costs more than a max
        gates, idx = probs.max(dim=-1, keepdim=True) if self.top_k == 1 else probs.topk(self.top_k, dim=-1)
        slot = buffer_slots(idx, gates, self.num_experts, capacity, bpr, mask, first)
        importance, load = self.balance_losses(logits, noisy, mask)
        return TokenRouting(logits, probs, idx, gates.to(dtype), slot, importance, load, capacity)

    def balance_losses(
        self, logits: torch.Tensor, noisy: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """V-MoE's (importance, load) losses over the tokens in ``mask`` ([G, N]; all when None)."""
        probs = noisy.softmax(dim=-1)
        w = None if mask is None else mask.unsqueeze(-1).to(probs.dtype)  # [G, N, 1]
        importance = _cv_squared(probs.sum(dim=1) if w is None else (probs * w).sum(dim=1))  # [G, E]
        std = self.noise_std / self.num_experts
        if not (self.training and std > 0):
            return importance, logits.new_zeros(())
        threshold = noisy.topk(self.top_k, dim=-1)[0][..., -1:]  # [G, N, 1] the K-th largest noisy logit
        p_in_top_k = 0.5 * torch.erfc((threshold - logits) / (std * math.sqrt(2.0)))  # 1 - Phi(z)
        if w is None:
            return importance, _cv_squared(p_in_top_k.mean(dim=1))
        return importance, _cv_squared((p_in_top_k * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std}"


def to_buffers(x: torch.Tensor, routing: TokenRouting, num_experts: int) -> torch.Tensor:
    """x [G, N, D] -> expert buffers [E, G * P, D]: each kept choice's token in its slot, zeros elsewhere."""
    G, N, D = x.shape
    K, E, P = routing.slot.shape[-1], num_experts, routing.capacity
    slot = routing.slot.reshape(G, N * K, 1).expand(G, N * K, D)
    src = x.unsqueeze(2).expand(G, N, K, D).reshape(G, N * K, D)
    # Slot E * P collects the dropped choices and is never read back.
    buf = x.new_zeros(G, E * P + 1, D).scatter(1, slot, src)
    return buf[:, : E * P].reshape(G, E, P, D).transpose(0, 1).reshape(E, G * P, D)


def from_buffers(y: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
    """Expert outputs [E, G * P, D] -> [G, N, D]: each token's kept choices, weighted by their gates."""
    G, N, K = routing.slot.shape
    E, P, D = y.shape[0], routing.capacity, y.shape[-1]
    y = y.reshape(E, G, P, D).transpose(0, 1).reshape(G, E * P, D)
    y = torch.cat([y, y.new_zeros(G, 1, D)], dim=1)  # a dropped choice reads zeros
    out = y.gather(1, routing.slot.reshape(G, N * K, 1).expand(G, N * K, D)).reshape(G, N, K, D)
    return (out * routing.gates.unsqueeze(-1)).sum(dim=2)


@register_notrace_module
class TokenExpertMlp(ExpertMlp):
    """E expert MLPs (stacked ``[E, D, H]`` weights, as ``ExpertMlp``) applied to fixed per-expert buffers."""

    def forward(self, x: torch.Tensor, routing: TokenRouting) -> torch.Tensor:  # type: ignore[override]
        """x: [G, N, D] -> [G, N, D] = sum_k gates[..., k] * expert_{idx[..., k]}(token), 0 for dropped choices."""
        return from_buffers(self.experts(to_buffers(x, routing, self.num_experts)), routing)

    def experts(self, buf: torch.Tensor) -> torch.Tensor:
        """[E, M, D] -> [E, M, D]: expert e's MLP on its M buffer rows (export swaps in per-expert linears)."""
        h = self.drop(self.act(torch.baddbmm(self.fc1_bias.unsqueeze(1), buf, self.fc1_weight)))
        return self.drop(torch.baddbmm(self.fc2_bias.unsqueeze(1), h, self.fc2_weight))


def group_images(batch: int, group_size: int) -> int:
    """Images per routing group: the largest divisor of the batch up to group_size (shapes stay static)."""
    if group_size == 1:  # without reading the batch size, which may be symbolic (a dynamic batch on export)
        return 1
    g = min(group_size, batch)
    while batch % g:
        g -= 1
    return g


# Under a plain FX trace the batch size is a proxy: these run when the graph runs, not when it is traced.
torch.fx.wrap("group_images")
torch.fx.wrap("expert_capacity")
torch.fx.wrap("buffer_slots")  # its few-ops forms depend on K and G


# Kept outside the modules: a routing holds graph tensors, which deepcopy (EMA, export copies) cannot copy.
_LAST_ROUTING: "weakref.WeakKeyDictionary[nn.Module, TokenRouting]" = weakref.WeakKeyDictionary()


class TokenMoEMlp(nn.Module):
    """The MLP of a V-MoE block: groups the tokens, routes them (``TokenRouter``) and runs the experts
    (``TokenExpertMlp``). It takes a timm ``Block``'s ``mlp`` slot, so the block stays a plain timm block.

    Capacity ratio and BPR have a training and an inference value; ``set_routing`` changes the inference ones
    without retraining. The last routing is kept in ``last_routing`` for the training losses and the routing
    statistics (a timm block returns only tokens).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_ratio: float = 1.05,
        eval_capacity_ratio: float = 1.05,
        bpr: bool = False,
        eval_bpr: bool = True,
        noise_std: float = 1.0,
        group_size: int = 8,
        eval_group_size: int = 1,
        prefix_tokens: int = 0,
        cls_first: bool = False,
        eval_cls_first: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if group_size < 1 or eval_group_size < 1:
            raise ValueError(
                f"group_size and eval_group_size must be >= 1, got {group_size}, {eval_group_size}"
            )
        for name, v in (("capacity_ratio", capacity_ratio), ("eval_capacity_ratio", eval_capacity_ratio)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.router = TokenRouter(dim, num_experts, top_k, noise_std, device=device, dtype=dtype)
        nn.init.trunc_normal_(self.router.proj.weight, std=0.02)
        self.experts = TokenExpertMlp(
            dim, hidden_dim, num_experts, act_layer=act_layer, drop=drop, device=device, dtype=dtype
        )
        self.num_experts = num_experts
        self.group_size = group_size
        # At inference each image is routed on its own by default: a phone runs batch 1, and evaluation, export
        # verification and the phone then agree whatever the batch.
        self.eval_group_size = eval_group_size
        self.capacity_ratio = capacity_ratio
        self.eval_capacity_ratio = eval_capacity_ratio
        self.bpr = bpr
        self.eval_bpr = eval_bpr
        # the leading tokens of each image (a ViT's class token) that BPR ranks first with cls_first
        self.prefix_tokens = prefix_tokens
        if (cls_first or eval_cls_first) and not prefix_tokens:
            raise ValueError("cls_first needs a class token (prefix_tokens >= 1)")
        self.cls_first = cls_first
        self.eval_cls_first = eval_cls_first

    @classmethod
    def from_block_mlp(cls, mlp: nn.Module, num_experts: int, **kwargs: Any) -> "TokenMoEMlp":
        """Replace a timm ``Mlp``: same widths, activation, dropout, device and dtype."""
        fc1 = mlp.fc1
        return cls(
            fc1.in_features,
            fc1.out_features,
            num_experts,
            act_layer=type(mlp.act),
            drop=mlp.drop1.p if isinstance(mlp.drop1, nn.Dropout) else 0.0,
            device=fc1.weight.device,
            dtype=fc1.weight.dtype,
            **kwargs,
        )

    def set_routing(
        self,
        capacity_ratio: float | None = None,
        bpr: bool | None = None,
        top_k: int | None = None,
        group_size: int | None = None,
        cls_first: bool | None = None,
    ) -> None:
        """Inference-time routing: capacity ratio, BPR on/off, K, images routed together, class token first
        under BPR (no retraining)."""
        if cls_first and not self.prefix_tokens:
            raise ValueError("priority bpr_cls (cls_first) needs a model with a class token")
        if group_size is not None:
            if group_size < 1:
                raise ValueError(f"group_size must be >= 1, got {group_size}")
            self.eval_group_size = int(group_size)
        if capacity_ratio is not None:
            if not capacity_ratio > 0:
                raise ValueError(f"capacity_ratio must be > 0, got {capacity_ratio}")
            self.eval_capacity_ratio = float(capacity_ratio)
        if bpr is not None:
            self.eval_bpr = bool(bpr)
        if cls_first is not None:
            self.eval_cls_first = bool(cls_first)
        if top_k is not None:
            if not 1 <= top_k <= self.num_experts:
                raise ValueError(f"top_k must be in [1, {self.num_experts}], got {top_k}")
            self.router.top_k = int(top_k)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]; the tokens of ``group_size`` images are routed together.

        ``token_mask`` [B, T] (True = routed): the other tokens (text padding) take no buffer slot, count in no
        loss and come out as zeros.
        """
        B, T, D = x.shape
        y, mask, capacity, bpr = self.grouped(x, token_mask)
        routing = self.router(y, capacity, bpr, mask, self.first_tokens(y.shape[1], T) if bpr else None)
        self._keep(routing)
        return self.experts(y, routing).reshape(B, T, D)

    def _keep(self, routing: TokenRouting) -> None:
        if not torch.jit.is_scripting():
            _LAST_ROUTING[self] = routing

    def grouped(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
        """x [B, T, D] -> (groups [G, N, D], mask [G, N] or None, capacity P, BPR) for the current mode."""
        B, T, D = x.shape
        g = group_images(B, self.group_size if self.training else self.eval_group_size)
        ratio = self.capacity_ratio if self.training else self.eval_capacity_ratio
        bpr = self.bpr if self.training else self.eval_bpr
        mask = None if token_mask is None else token_mask.reshape(B // g, g * T)
        capacity = expert_capacity(g * T, self.router.top_k, ratio, self.num_experts)
        return x.reshape(B // g, g * T, D), mask, capacity, bpr

    def first_tokens(self, N: int, T: int) -> torch.Tensor | None:
        """[N] bool, the class tokens of a group of N tokens (images of T tokens) when the current mode ranks them
        first under BPR; else None."""
        if not (self.cls_first if self.training else self.eval_cls_first):
            return None
        return torch.arange(N, device=self.router.proj.weight.device) % T < self.prefix_tokens

    __jit_unused_properties__ = ["last_routing"]

    @property
    def last_routing(self) -> TokenRouting | None:
        """The routing of the last forward (with its autograd graph, for the losses)."""
        return _LAST_ROUTING.get(self)

    def extra_repr(self) -> str:
        return (
            f"group_size={self.group_size}/{self.eval_group_size}, capacity_ratio={self.capacity_ratio}/{self.eval_capacity_ratio} "
            f"(train/eval), bpr={self.bpr}/{self.eval_bpr}, cls_first={self.cls_first}/{self.eval_cls_first}"
        )


class TokenMoEModel:
    """The model-level routing API of a model whose blocks ``moe_indices`` hold ``TokenMoEMlp`` layers
    (``TokenVMoE``, LIMoE): a mixin, listed before the ``nn.Module`` base, which sets ``blocks``,
    ``moe_indices`` and ``top_k`` (no class annotations here: TorchScript would read them as attribute types)."""

    @torch.jit.ignore
    def moe_mlps(self) -> list[TokenMoEMlp]:
        """The MoE layers, in block order."""
        return [self.blocks[i].mlp for i in self.moe_indices]

    @torch.jit.ignore
    def set_routing(
        self,
        capacity_ratio: float | None = None,
        bpr: bool | None = None,
        top_k: int | None = None,
        group_size: int | None = None,
        cls_first: bool | None = None,
    ) -> None:
        """Inference-time capacity ratio, BPR, K, images per routing group and class token first under BPR for
        every MoE block (no retraining)."""
        for mlp in self.moe_mlps():
            mlp.set_routing(capacity_ratio, bpr, top_k, group_size, cls_first)
        if top_k is not None and self.moe_indices:  # a dense image-text model keeps K = 0
            self.top_k = int(top_k)


def routing_stats(
    routing: TokenRouting, num_experts: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(choices each expert processed [E], fraction of choices dropped) for one block's routing; ``mask``
    (True = routed, any shape with G * N elements) leaves the unrouted tokens (text padding) out of the count."""
    E, P = num_experts, routing.capacity
    slot = routing.slot
    if mask is not None:
        slot = slot[mask.reshape(slot.shape[:-1])]
    slot = slot.reshape(-1)
    kept = slot < E * P
    load = torch.bincount(torch.div(slot[kept], P, rounding_mode="floor"), minlength=E)
    return load, 1.0 - kept.float().mean()
