"""Expert MLPs lowered to XNNPACK delegates for the ``.pte`` expert switch, and what keeps that lowering cheap.

Each expert of a switch is a delegate of its own (``switch.py`` says why). Lowered one by one through ExecuTorch's
whole pipeline (export, decompositions, partitioning, XNNPACK passes) that costs E * L pipeline runs of a
three-op graph. Two things make it cheap without changing a byte of the result:

* ``ExpertLowering``: every expert of a model is the same program with other weights. The first expert of each
  shape goes through the pipeline; every other one hands that program, with its own weights (int8: quantised
  on their own), straight to the XNNPACK backend, which gives the bytes a full lowering gives
  (``tests/test_switch.py`` compares them).
* ``cached_delegate_tracing``: ExecuTorch traces a program that calls lowered modules many times (every pass
  re-traces it, and each ``cond`` traces its branches several times, at every level of the tree), and each
  traced call rebuilt the module's original program with ``ExportedProgram.module()`` and ran it on fake
  tensors to learn its outputs' shapes. Inside the context each program is rebuilt once, and a call with
  shapes seen before gets fake outputs of the recorded shapes without running it.

Shape letters as in ``mobile_vmoe.models.moe``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import operator
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.immutable_collections import immutable_dict, immutable_list

from mobile_vmoe.models.moe import ExpertMlp

__all__ = ["ExpertLowering", "cached_delegate_tracing"]


class OneExpert(nn.Module):
    """Expert ``e`` of an ``ExpertMlp`` as a dense timm-style MLP (nn.Linear layout): what one delegate holds."""

    def __init__(self, mlp: ExpertMlp, e: int) -> None:
        super().__init__()
        _, D, H = mlp.fc1_weight.shape
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), copy.deepcopy(mlp.act), nn.Linear(H, D)
        with torch.no_grad():
            self.fc1.weight.copy_(mlp.fc1_weight[e].t())
            self.fc1.bias.copy_(mlp.fc1_bias[e])
            self.fc2.weight.copy_(mlp.fc2_weight[e].t())
            self.fc2.bias.copy_(mlp.fc2_bias[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _lower_alone(expert: OneExpert, shape: Sequence[int], int8: bool = False) -> nn.Module:
    """One expert through ExecuTorch's whole pipeline -> its LoweredBackendModule; ``int8``: its two linears
    dynamic int8 first (PT2E, the ``--quantize int8`` scheme of ``pte.py``).

    Raises if any op stays outside the delegate: the branch calls only the lowered module.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.delegate import executorch_call_delegate
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    with torch.no_grad():
        example = torch.zeros(*shape)
        ep = torch.export.export(expert.eval(), (example,))
        if int8:
            ep = torch.export.export(_dynamic_int8(ep.module(), example), (example,))
        gm = (
            to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            .exported_program()
            .graph_module
        )
    mods = [m for m in gm.children() if isinstance(m, LoweredBackendModule)]
    rest = [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target not in (executorch_call_delegate, operator.getitem)
    ]
    if len(mods) != 1 or rest:
        raise RuntimeError(
            f"an expert MLP did not lower to one XNNPACK subgraph: {len(mods)} subgraphs, {rest}"
        )
    return mods[0]


def _dynamic_int8(gm: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """Every linear of ``gm`` as PT2E dynamic int8: symmetric per-channel int8 weights, int8 activations."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    cfg = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    quantizer.set_operator_type(torch.ops.aten.linear.default, cfg)
    prepared = prepare_pt2e(gm, quantizer)
    prepared(example)
    return convert_pt2e(prepared)


def _int8_weights(expert: OneExpert, shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """The state a dynamic-int8 lowering of ``expert`` holds (int8 weights, their scales, the biases), quantised
    as ``_lower_alone(int8=True)`` does, without the rest of its pipeline."""
    with torch.no_grad():
        example = torch.zeros(*shape)
        q = _dynamic_int8(torch.export.export(expert.eval(), (example,)).module(), example)
    return {name: t.detach() for name, t in [*q.named_parameters(), *q.named_buffers()]}


def _with_weights(template: Any, weights: dict[str, torch.Tensor]) -> nn.Module:
    """``template`` (a lowered expert) with other ``weights``: its edge program, new state, XNNPACK again."""
    from executorch.exir.backend.backend_api import to_backend

    ep = template.original_module
    old = ep.state_dict
    if not old.keys() <= weights.keys() or any(weights[k].shape != old[k].shape for k in old) or ep.constants:
        raise RuntimeError("an expert's parameters do not match the lowered template's")
    state = {
        k: nn.Parameter(weights[k], requires_grad=False) if isinstance(v, nn.Parameter) else weights[k]
        for k, v in old.items()
    }
    program = ep._update(copy.deepcopy(ep.graph_module), copy.deepcopy(ep.graph_signature), state_dict=state)
    return to_backend(template.backend_id, program, template.compile_specs)


class ExpertLowering:
    """Lowers the experts of ``ExpertMlp`` modules; one instance per exported program (it keeps templates).

    ``reuse=False`` lowers every expert through the whole pipeline (the benchmark's "before"). The experts of
    the ``ExpertMlp`` modules in ``int8`` get dynamic int8 linears: each is quantised on its own (its scales are
    its own) and handed to the int8 template of its shape.
    """

    def __init__(self, reuse: bool = True, int8: Collection[ExpertMlp] = ()) -> None:
        self.reuse = reuse
        self.int8 = list(int8)
        self._templates: dict[tuple, nn.Module] = {}

    def __call__(
        self, mlp: ExpertMlp, shape: Sequence[int], done: Callable[[], None] | None = None
    ) -> list[nn.Module]:
        """Each expert of ``mlp`` lowered for inputs of ``shape`` ([1, T, D]); ``done()`` after each one."""
        int8 = any(mlp is m for m in self.int8)
        key = (tuple(shape), tuple(mlp.fc1_weight.shape[1:]), mlp.fc1_weight.dtype, repr(mlp.act), int8)
        lowered: list[nn.Module] = []
        for e in range(mlp.num_experts):
            expert = OneExpert(mlp, e).eval()
            template = self._templates.get(key) if self.reuse else None
            if template is None:
                template = _lower_alone(expert, shape, int8=int8)
                if self.reuse:
                    self._templates[key] = template
                lowered.append(template)
            else:
                weights = _int8_weights(expert, shape) if int8 else dict(expert.named_parameters())
                lowered.append(_with_weights(template, weights))
            if done is not None:
                done()
        return lowered


@dataclass
class _Traced:
    """A lowered module's original program, rebuilt once, and the metadata of its outputs per input metadata."""

    blob: bytes  # the delegate's processed bytes
    module: nn.Module
    outputs: dict[tuple, tuple[Any, list[tuple]]] = field(default_factory=dict)


@contextlib.contextmanager
def cached_delegate_tracing() -> Iterator[None]:
    """Within the context, tracing a call of a lowered module neither rebuilds nor reruns its program per call
    (see the module doc). Calls on real tensors, and on shapes not seen before, run the program as before.

    It replaces ExecuTorch's ``call_delegate_cpu``, which the operator's tracing and fake-tensor rules call, for
    as long as the context is open.
    """
    # The module, not the operator of the same name that torch._higher_order_ops exports.
    hop = importlib.import_module("torch._higher_order_ops.executorch_call_delegate")
    original = hop.call_delegate_cpu
    traced: dict[int, _Traced] = {}

    def call_delegate_cpu(lowered_module: Any, *args: Any) -> Any:
        # Keyed by the delegate's bytes, which ExecuTorch's copies of a lowered module share: the same program.
        blob = lowered_module.processed_bytes
        t = traced.get(id(blob))
        if t is None or t.blob is not blob:
            t = traced[id(blob)] = _Traced(blob, lowered_module.original_module.module())
        args = _plain_containers(args)
        fake_mode, key = _fake_key(args)
        if key is not None and key in t.outputs:
            spec, metas = t.outputs[key]
            with fake_mode:
                outs = [torch.empty_strided(sh, st, dtype=dt, device=dev) for sh, st, dt, dev in metas]
            return pytree.tree_unflatten(outs, spec)
        out = t.module(*args)
        flat, spec = pytree.tree_flatten(out)
        if key is not None and all(isinstance(o, FakeTensor) and _static(o) for o in flat):
            t.outputs[key] = (spec, [(o.shape, o.stride(), o.dtype, o.device) for o in flat])
        return out

    hop.call_delegate_cpu = call_delegate_cpu
    try:
        yield
    finally:
        hop.call_delegate_cpu = original


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(d, int) for d in (*t.shape, *t.stride()))


def _fake_key(args: tuple) -> tuple[Any, tuple | None]:
    """(fake mode, hashable metadata of ``args``) when every tensor in them is fake with static sizes; else
    (None, None): the call runs the program."""
    flat, spec = pytree.tree_flatten(args)
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    if not tensors or not all(isinstance(a, FakeTensor) and _static(a) for a in tensors):
        return None, None
    if any(not isinstance(a, (torch.Tensor, int, float, bool, str, type(None))) for a in flat):
        return None, None
    meta = tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in flat
    )
    return tensors[0].fake_mode, (str(spec), meta)


def _plain_containers(args: tuple) -> tuple:
    """FX's immutable dicts and lists as plain ones, as ExecuTorch's own call_delegate_cpu passes them."""
    plain = {immutable_dict: dict, immutable_list: list}
    return pytree.tree_map_only(
        tuple(plain), lambda a: plain[type(a)](a), args, lambda a: isinstance(a, tuple(plain))
    )
