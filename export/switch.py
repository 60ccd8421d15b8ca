"""Exported MoE programs that run only the chosen expert, with that expert's weights as constants.

The gather form of ``ExpertMlp`` (index_select the chosen experts' weights from the [E, D, H] stack, then bmm)
keeps the compute sparse, but each inference copies the chosen weights out of the stack and the runtime packs
them again for its matmul kernel, where a dense model's weights are packed once, at load. On ViT-Tiny (L=2,
2 threads) that was most of the MoE's cost over dense: ExecuTorch's portable index_select 0.27 ms and XNNPACK's
repacking 0.14 ms of a ~0.45 ms gap; in ONNX Runtime Gather 0.28 ms and unpacked MatMuls 0.18 ms.

``ExpertSwitch`` runs the experts as branches of a binary tree of ``torch.cond`` on the expert id (depth
ceil(log2 E), scalar comparisons), so each branch holds one expert with constant weights:

* ONNX Runtime: a branch slices the stacked parameters at a constant index; ORT folds the slices into
  initialisers when the session loads, so the branch's MatMuls use pre-packed weights (and fuse bias + GELU).
* ExecuTorch: the XNNPACK partitioner does not look inside ``cond`` branches, so every expert MLP is lowered to
  XNNPACK on its own first (``delegates.ExpertLowering``) (its weights become constants of that delegate) and the branch calls
  the lowered module. PT2E quantization does not enter ``cond`` branches either, so the program is first
  exported (and quantised) with each MoE MLP as one opaque op (``opaque_experts``); ``splice_switches`` then
  replaces the ops by switches. The result is exported again with ``strict=True``: non-strict export evaluates
  a lowered module's original program, whose weights are real tensors, under fake tensors, and fails.

Every image of a batch must use the same experts for one branch to serve the batch. ``fallback=True`` (ONNX,
dynamic batch) adds an outer ``cond`` that sends any other batch through the gather form; without it (a .pte,
whose batch is static 1) the batch must be one image. Shape letters as in ``mobile_vmoe.models.moe``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from mobile_vmoe.models.moe import ExpertMlp, MoEBlock, Routing

from .delegates import ExpertLowering

__all__ = [
    "ExpertSwitch",
    "has_experts",
    "switch_experts",
    "opaque_experts",
    "opaque_expert_mlps",
    "splice_switches",
    "count_expert_ops",
]


class ExpertSwitch(nn.Module):
    """An ``ExpertMlp`` (eval mode) that runs each chosen expert as a ``torch.cond`` branch; see the module doc.

    ``experts``: one callable per expert, [B, T, D] -> [B, T, D] or a one-tensor tuple (a lowered ExecuTorch
    module); default: the expert's slices of the stacked parameters. ``fallback``: see the module doc.
    """

    def __init__(
        self, mlp: ExpertMlp, experts: Sequence[nn.Module] | None = None, fallback: bool = True
    ) -> None:
        super().__init__()
        if experts is not None and len(experts) != mlp.num_experts:
            raise ValueError(f"need one module per expert ({mlp.num_experts}), got {len(experts)}")
        self.mlp = mlp  # the parameters, and the gather form for mixed batches
        self.experts = None if experts is None else nn.ModuleList(experts)
        self.fallback = fallback

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.experts is not None:
            y = self.experts[e](x)
            return y[0] if isinstance(y, (tuple, list)) else y
        m = self.mlp
        return m.act(x @ m.fc1_weight[e] + m.fc1_bias[e]) @ m.fc2_weight[e] + m.fc2_bias[e]

    def _switch(self, e: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Expert ``e`` (a 0-d id in [lo, hi)) applied to x, by binary search over the ids."""
        if hi - lo == 1:
            return self._expert(lo, x)
        mid = (lo + hi) // 2
        return torch.cond(
            e < mid,
            lambda e, x: self._switch(e, x, lo, mid),
            lambda e, x: self._switch(e, x, mid, hi),
            (e, x),
        )

    def _same_experts(self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every image routed like image 0: sum_k gates[:, k] * expert_{idx[0, k]}(x)."""
        y = None
        for k in range(expert_idx.shape[1]):
            yk = self._switch(expert_idx[0, k], x, 0, self.mlp.num_experts)
            yk = yk * gates[:, k].reshape(-1, 1, 1).to(x.dtype)
            y = yk if y is None else y + yk
        return y

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D], as ``ExpertMlp.forward`` in eval mode."""
        idx, gates = routing.expert_idx, routing.gates
        if not self.fallback:
            torch._check(x.shape[0] == 1, lambda: "ExpertSwitch without fallback runs one image at a time")
            return self._same_experts(x, idx, gates)
        same = (idx == idx[:1]).all()
        return torch.cond(
            same,
            self._same_experts,
            lambda x, idx, gates: self.mlp._forward_gather(x, Routing(routing.logits, idx, gates)),
            (x, idx, gates),
        )


# PT2E quantization does not enter torch.cond branches, so a .pte's experts are spliced in after it: the MoE
# MLPs are exported as one opaque op each (what the quantizer sees), then each op node is replaced by a call of
# its ExpertSwitch. The op's key names its ExpertMlp in this table while an export runs.
_OPAQUE: dict[int, ExpertMlp] = {}
_SHAPES: dict[int, torch.Size] = {}  # the input shape each op saw last


@torch.library.custom_op("mobile_vmoe::expert_mlp", mutates_args=())
def _expert_mlp(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, key: int) -> torch.Tensor:
    _SHAPES[key] = x.shape
    return _OPAQUE[key]._forward_gather(x, Routing(gates, expert_idx, gates))  # logits unused there


@_expert_mlp.register_fake
def _(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, key: int) -> torch.Tensor:
    return torch.empty_like(x)


class _OpaqueExperts(nn.Module):
    def __init__(self, mlp: ExpertMlp) -> None:
        super().__init__()
        self.mlp, self.key = mlp, id(mlp)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return _expert_mlp(x, routing.expert_idx, routing.gates, self.key)


class _SwitchCall(nn.Module):
    """(x, expert_idx, gates) -> ExpertSwitch: what replaces an opaque op node in a graph."""

    def __init__(self, switch: ExpertSwitch) -> None:
        super().__init__()
        self.switch = switch

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return self.switch(x, Routing(gates, expert_idx, gates))


def opaque_expert_mlps(model: nn.Module) -> dict[str, ExpertMlp]:
    """The ExpertMlp behind each opaque op of a model made by ``opaque_experts``, by module name (the name the
    ExpertMlp has in the original model)."""
    return {name: m.mlp for name, m in model.named_modules() if isinstance(m, _OpaqueExperts)}


def has_experts(model: nn.Module) -> bool:
    return any(isinstance(m, ExpertMlp) for m in model.modules())


def _replace_expert_mlps(model: nn.Module, make: Callable[[ExpertMlp], nn.Module]) -> tuple[nn.Module, list]:
    """(eval-mode copy of ``model`` with each MoE block's ExpertMlp replaced by ``make(mlp)``, the new modules)"""
    model = copy.deepcopy(model).eval()
    made = []
    for blk in model.modules():
        if isinstance(blk, MoEBlock) and isinstance(blk.mlp, ExpertMlp):
            blk.mlp = make(blk.mlp)
            made.append(blk.mlp)
    return model, made


@contextlib.contextmanager
def opaque_experts(model: nn.Module) -> Iterator[nn.Module]:
    """A copy of ``model`` whose MoE MLPs are opaque ops (they compute the gather form), while the context is open.

    Export it, quantise it if wanted, then ``splice_switches`` into the graph module.
    """
    model, opaque = _replace_expert_mlps(model, _OpaqueExperts)
    _OPAQUE.update((m.key, m.mlp) for m in opaque)
    try:
        yield model
    finally:
        for m in opaque:
            _OPAQUE.pop(m.key, None)


def splice_switches(
    gm: torch.fx.GraphModule,
    example: torch.Tensor,
    lowering: ExpertLowering | None = None,
    progress: Callable[[], None] | None = None,
) -> int:
    """Replace each opaque expert op of ``gm`` by an ``ExpertSwitch`` over experts lowered to XNNPACK.

    Needs ``opaque_experts``' context open. ``example`` (batch 1) gives the experts' input shapes; ``lowering``
    lowers the experts (default: a new ``ExpertLowering``), ``progress()`` is called after each expert. Returns
    the number of ops replaced. Export the result with ``strict=True`` (see the module doc).
    """
    lowering = lowering or ExpertLowering()
    _SHAPES.clear()
    with torch.no_grad():
        gm(example)  # the opaque ops record their input shapes
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.mobile_vmoe.expert_mlp.default:
            continue
        x, idx, gates, key = node.args
        shape = _SHAPES[key]
        if shape[0] != 1:
            raise ValueError(f"lowered experts run one image at a time; the example has batch {shape[0]}")
        mlp = _OPAQUE[key]
        name = f"expert_switch_{n}"
        experts = lowering(mlp, shape, progress)
        gm.add_submodule(name, _SwitchCall(ExpertSwitch(mlp, experts, fallback=False)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x, idx, gates))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n += 1
    gm.graph.lint()
    gm.recompile()
    return n


def count_expert_ops(gm: torch.fx.GraphModule) -> int:
    """How many opaque expert ops ``gm`` holds (what ``splice_switches`` will lower: E experts each)."""
    target = torch.ops.mobile_vmoe.expert_mlp.default
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def switch_experts(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose MoE blocks run their experts through ``ExpertSwitch`` (for ONNX):
    branches slice the stacked weights, and a batch with mixed routing takes the gather form."""
    return _replace_expert_mlps(model, lambda mlp: ExpertSwitch(mlp, fallback=True))[0]
