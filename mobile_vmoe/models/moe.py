"""Per-image sparse Mixture-of-Experts layers.

Shape letters, used in every module of this package (as google-research/vmoe does):
    B  images in the batch          T  tokens per image (patches + class token)
    D  token width (embed_dim)      H  hidden width of an expert MLP
    E  experts                      K  experts chosen per image (top-k)
    C  classes                      S  super-classes (S == E when super-class routing is used)
Per-token routing (``token_moe.py``) adds:
    G  groups of tokens routed together    N  tokens per group (the tokens of a few images)
    P  buffer slots per expert and group (V-MoE's capacity C, renamed: C is the classes here)

Mobile V-MoE routes whole images, not tokens: one router, placed after the last dense block, picks K of E
experts per image, and the same experts (with the same gate weights) serve every MoE block.

``Router`` and ``ExpertMlp`` are timm FX leaf modules: their control flow depends on the data (a forced expert
choice, the expert dispatch), so timm's feature extraction keeps each as one call. A plain
``torch.fx.symbolic_trace`` traces into them; they take a traceable form then (see ``_fx_tracing``).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


class Routing(NamedTuple):
    """The routing decision for a batch, shared by every MoE block."""

    logits: torch.Tensor  # [B, E] router logits (the super-class loss is taken on these)
    expert_idx: torch.Tensor  # [B, K] chosen experts, int64
    gates: torch.Tensor  # [B, K] weight of each chosen expert's output


def _fx_tracing() -> bool:
    """True while torch.fx traces Python code (TorchScript compiles only the first branch)."""
    if torch.jit.is_scripting():
        tracing = False
    else:
        tracing = is_fx_symbolic_tracing()
    return tracing


def _graph_tracing() -> bool:
    """True while a tracer records one path through the code: FX, torch.jit.trace, dynamo / torch.export."""
    if torch.jit.is_scripting():
        tracing = False
    else:
        tracing = is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
    return tracing


def choose_experts(
    logits: torch.Tensor, top_k: int, renormalize: bool, expert_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, E] -> (gates [B, K], expert_idx [B, K]); a given ``expert_idx`` ([B, K] or [B]) is kept."""
    probs = logits.softmax(dim=-1)
    if expert_idx is None:
        gates, idx = probs.topk(top_k, dim=-1)
    else:
        idx = expert_idx.reshape(logits.shape[0], -1).long()
        gates = probs.gather(1, idx)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates, idx


# A plain FX trace passes the optional expert_idx as a placeholder, so `is None` must be decided at run time.
torch.fx.wrap("choose_experts")


@register_notrace_module
class Router(nn.Module):
    """One per-image router: summary of the tokens -> E logits -> top-K experts and their gates.

    ``summary="mean"`` (default) averages the patch tokens. At the routing point (after the dense blocks, i.e.
    before the last blocks) the class token has only started to aggregate the image, while the mean of the patch
    tokens already describes all of it; the Mobile V-MoE paper also routes on the averaged tokens.
    ``summary="cls"`` reads the class token instead.

    Gates are softmax(logits) taken at the chosen experts. ``renormalize=False`` (default) keeps them as they are,
    as V-MoE does: with K=1 a renormalised gate is always 1 and the classification loss would give the router no
    gradient at all. ``renormalize=True`` rescales the K gates to sum to 1.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        summary: str = "mean",
        renormalize: bool = False,
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if summary not in ("mean", "cls"):
            raise ValueError(f"router summary must be 'mean' or 'cls', got {summary!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if summary == "cls" and num_prefix_tokens == 0:
            raise ValueError("router summary 'cls' needs a class token (class_token=True)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.summary = summary
        self.renormalize = renormalize
        self.num_prefix_tokens = num_prefix_tokens
        # export/rewrite.py sets a [1, T] row of token weights (0 on the prefix tokens, 1/T' on the patches):
        # the token mean as one linear map, which XNNPACK runs (it has no mean over a 3-D tensor's tokens).
        self.register_buffer("token_avg", None, persistent=False)
        self.norm = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, num_experts, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor | None = None) -> Routing:
        """x: [B, T, D]. ``expert_idx`` [B, K] (or [B]) forces the choice, e.g. for analysis."""
        token_avg = self.token_avg
        if self.summary == "mean" and token_avg is not None:
            s = F.linear(x.transpose(1, 2), token_avg).flatten(1)  # [B, D, T] -> [B, D]
        elif self.summary == "mean":
            s = x[:, self.num_prefix_tokens :].mean(dim=1)  # [B, D]
        else:
            s = x[:, 0]  # [B, D]
        logits = self.proj(self.norm(s))  # [B, E]
        gates, idx = choose_experts(logits, self.top_k, self.renormalize, expert_idx)
        return Routing(logits, idx, gates)


@register_notrace_module
class ExpertMlp(nn.Module):
    """E expert MLPs stored as stacked parameters; only the K chosen experts of each image are computed.

    Two dispatch forms compute the same function:
      * gather: index_select the chosen experts' weights and run batched matmuls. No data-dependent Python
        control flow, so torch.export / ExecuTorch / Core ML / ONNX / TorchScript / FX keep the sparse compute.
      * grouped: one dense matmul per expert over the images routed to it. It avoids a [B*K, D, H] weight copy
        per layer, which pays off when gradients are taken.
    ``dispatch="auto"`` groups while gradients are enabled and gathers otherwise; anything that can only
    record one path (a tracer, the meta device) gathers. The .pte and .onnx exports replace the gather with
    one ``torch.cond`` branch per expert (export/switch.py).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        dispatch: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dispatch not in ("auto", "gather", "grouped"):
            raise ValueError(f"dispatch must be 'auto', 'gather' or 'grouped', got {dispatch!r}")
        dd = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.dispatch = dispatch
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **dd))  # [E, D, H]
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim, **dd))  # [E, H]
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **dd))  # [E, H, D]
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim, **dd))  # [E, D]
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # timm's ViT init for Linear layers: truncated normal, std 0.02, zero bias.
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)

    def load_dense(
        self,
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor,
    ) -> None:
        """Upcycling: copy one dense MLP (nn.Linear layout, [out, in]) into every expert."""
        with torch.no_grad():
            self.fc1_weight.copy_(fc1_weight.t().unsqueeze(0).expand_as(self.fc1_weight))
            self.fc1_bias.copy_(fc1_bias.unsqueeze(0).expand_as(self.fc1_bias))
            self.fc2_weight.copy_(fc2_weight.t().unsqueeze(0).expand_as(self.fc2_weight))
            self.fc2_bias.copy_(fc2_bias.unsqueeze(0).expand_as(self.fc2_bias))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D] = sum_k gates[:, k] * expert_{idx[:, k]}(x)."""
        if self._grouped(x):
            return self._forward_grouped(x, routing)
        return self._forward_gather(x, routing)

    def _grouped(self, x: torch.Tensor) -> bool:
        # The grouped loop reads the expert counts on the host: no tracer can record it, a meta tensor has none.
        if self.dispatch == "gather" or _graph_tracing() or x.device.type == "meta":
            return False
        return self.dispatch == "grouped" or torch.is_grad_enabled()

    def _forward_gather(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        # The K chosen experts of an image side by side: one [D, K*H] and one [K*H, D] matrix per image, so
        # each layer is one bmm whatever K is. The gates scale the hidden units, which makes fc2's matmul do
        # the weighted sum over experts: sum_k g_k (h_k W2_k + b2_k) = [g_1 h_1 .. g_K h_K] [W2_1; ..; W2_K]
        # + sum_k g_k b2_k. Nothing is expanded or summed outside the matmuls, which keeps the whole MLP
        # inside XNNPACK when exported.
        B, T, D = x.shape
        K = routing.expert_idx.shape[1]
        H = self.fc1_weight.shape[2]
        idx = routing.expert_idx.reshape(-1)  # [B*K]
        gates = routing.gates.to(x.dtype)  # [B, K]
        w1 = self.fc1_weight.index_select(0, idx)  # [B*K, D, H]
        w2 = self.fc2_weight.index_select(0, idx)  # [B*K, H, D]
        b1 = self.fc1_bias.index_select(0, idx).reshape(B, 1, K * H)
        b2 = self.fc2_bias.index_select(0, idx).reshape(B, K, D)
        # Under FX, K is a graph value and cannot pick a branch: the general form is also right for K=1.
        single = not _fx_tracing() and K == 1
        if not single:
            w1 = w1.reshape(B, K, D, H).transpose(1, 2).reshape(B, D, K * H)
            w2 = w2.reshape(B, K * H, D)
        # With K=1 the gathered weights are [B, D, H] and [B, H, D] already: no reshape, which on export would
        # be a copy inside XNNPACK (a reshape of a delegate input).
        h = self.drop(self.act(torch.baddbmm(b1, x, w1)))  # [B, T, K*H]
        if single:
            # one expert: the gate scales the [T, D] output, 4x fewer elements than the hidden units
            return self.drop(torch.baddbmm(b2, h, w2)) * gates.reshape(B, 1, 1)  # [B, T, D]
        h = (h.reshape(B, T, K, H) * gates.reshape(B, 1, K, 1)).reshape(B, T, K * H)
        return self.drop(torch.baddbmm(torch.bmm(gates.unsqueeze(1), b2), h, w2))  # [B, T, D]

    def _forward_grouped(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        # One dense matmul per expert over the images routed to it (Python control flow on the counts).
        B, T, D = x.shape
        K = routing.expert_idx.shape[1]
        flat_idx = routing.expert_idx.reshape(-1)  # [B*K]
        flat_img = torch.arange(B, device=x.device).repeat_interleave(K)  # [B*K]
        flat_gate = routing.gates.reshape(-1)
        out = torch.zeros_like(x)
        order = torch.argsort(flat_idx, stable=True)
        counts: list[int] = torch.bincount(flat_idx, minlength=self.num_experts).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start : start + n]
            start += n
            img = flat_img[sel]
            h = self.drop(
                self.act(torch.addmm(self.fc1_bias[e], x[img].reshape(n * T, D), self.fc1_weight[e]))
            )
            y = self.drop(torch.addmm(self.fc2_bias[e], h, self.fc2_weight[e])).reshape(n, T, D)
            out = out.index_add(0, img, y * flat_gate[sel].reshape(n, 1, 1).to(y.dtype))
        return out

    def extra_repr(self) -> str:
        E, D, H = self.fc1_weight.shape
        return f"num_experts={E}, dim={D}, hidden_dim={H}, dispatch={self.dispatch!r}"


class MoEBlock(nn.Module):
    """A pre-norm ViT block whose MLP is an ExpertMlp; attention and norms are shared, taken from a timm Block.

    The expert stack is created on the block's device and in its dtype.
    """

    def __init__(self, block: nn.Module, num_experts: int, dispatch: str = "auto") -> None:
        super().__init__()
        self.norm1 = block.norm1
        self.attn = block.attn
        self.ls1 = block.ls1
        self.drop_path1 = block.drop_path1
        self.norm2 = block.norm2
        self.ls2 = block.ls2
        self.drop_path2 = block.drop_path2
        fc1 = block.mlp.fc1
        self.mlp = ExpertMlp(
            dim=fc1.in_features,
            hidden_dim=fc1.out_features,
            num_experts=num_experts,
            act_layer=type(block.mlp.act),
            drop=block.mlp.drop1.p if isinstance(block.mlp.drop1, nn.Dropout) else 0.0,
            dispatch=dispatch,
            device=fc1.weight.device,
            dtype=fc1.weight.dtype,
        )

    def forward(
        self,
        x: torch.Tensor,
        routing: Routing,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), routing)))
        return x


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """V-MoE's importance loss: squared coefficient of variation of the per-expert gate mass over the batch.

    Used only when no super-class map is given, to keep an end-to-end router from collapsing onto one expert.
    """
    probs = F.softmax(routing.logits.float(), dim=-1)  # [B, E]
    importance = probs.sum(dim=0)  # [E]
    return (importance.std(unbiased=False) / (importance.mean() + 1e-9)) ** 2


def expert_bias_names(model: nn.Module) -> set[str]:
    """Expert biases are stacked [E, H] tensors, so timm's "ndim <= 1 or *.bias" no-weight-decay rule misses them."""
    return {n for n, _ in model.named_parameters() if n.endswith(("fc1_bias", "fc2_bias"))}


def expert_load(routing: Routing, num_experts: int) -> torch.Tensor:
    """Images per expert in this batch, [E]; counts each of the K choices."""
    return torch.bincount(routing.expert_idx.reshape(-1), minlength=num_experts)


__all__ = [
    "Routing",
    "Router",
    "ExpertMlp",
    "MoEBlock",
    "choose_experts",
    "load_balancing_loss",
    "expert_load",
]
