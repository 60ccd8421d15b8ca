"""ExecuTorch: a model lowered to a ``.pte`` (XNNPACK), and the runtime that runs one here.

No verification and no file bookkeeping (``core.export_model`` does both); benchmarks/export_latency.py and
benchmarks/export_lowering.py call ``lower_pte`` directly.
"""

from __future__ import annotations

import collections
import contextlib
import operator
import os
import re
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobile_vmoe.models.moe import Router

from .delegates import ExpertLowering, cached_delegate_tracing
from .quantize import int8_candidates
from .quiet import Progress, captured_output, quiet_libraries
from .rewrite import for_xnnpack
from .switch import count_expert_ops, has_experts, opaque_expert_mlps, opaque_experts, splice_switches

__all__ = ["INT8_SCHEMES", "PteRunner", "clean_op_name", "lower_pte"]

INT8_SCHEMES = {
    "int8": "PT2E dynamic int8 (XNNPACKQuantizer) of every transformer linear (attention qkv and proj, MLP fc1 and "
    "fc2, expert MLPs): symmetric per-channel int8 weights, activations quantised per inference; the classifier "
    "head, router, patch embedding and attention matmuls stay fp32",
    "int8-static": "PT2E static int8 (XNNPACKQuantizer): linear + conv, symmetric per-channel weights, per-tensor "
    "activations calibrated on real images; attention matmuls, residual adds, expert MLPs stay fp32",
}


def lower_pte(
    model: nn.Module,
    example: torch.Tensor,
    quantize: str | None = None,
    calibration: Iterable[torch.Tensor] = (),
    *,
    keep_fp32: Collection[str] = (),
    xnnpack_rewrite: bool = True,
    expert_switch: bool = True,
    fast_lowering: bool = True,
) -> tuple[bytes, dict[str, Any]]:
    """Eval-mode model -> (.pte bytes, delegation report); ``quantize`` one of ``INT8_SCHEMES``.

    ``xnnpack_rewrite`` (default on) lowers ``rewrite.for_xnnpack(model)``: the same maths with attention and
    layer norm in ops XNNPACK runs, so whole blocks stay in one XNNPACK subgraph (off: for comparison only).
    ``expert_switch`` (default on) runs a MoE's experts as ``torch.cond`` branches, each expert lowered to
    XNNPACK on its own with constant weights (``switch.splice_switches``), instead of gathering the chosen
    experts' weights every inference; the experts stay fp32 in int8 programs. K=1 only: with K > 1 executorch 1.5
    can alias two conds' outputs, so those keep the gather form (the report says why).
    ``fast_lowering`` (default on) lowers the experts from one template and traces lowered modules with a cache
    (``delegates.py``): the same program, byte for byte; off: ExecuTorch's plain path, for the benchmark.
    ``"int8"`` (default int8): dynamic quantisation of the transformer's linears but ``keep_fp32`` (module
    names; ``quantize.select_fp32_layers`` picks them for a trained model). Top-1 agreement with fp32 on
    500 held-out images of the built-in demo models (D=64, 16 tokens; dense / MoE; the range over different
    500-image samples): dynamic on every transformer linear 98.2-99.2 / 98.8-99.6 %, with the head too
    97.8 / 99.4 %, dynamic MLPs only 99.2-99.4 / 99.4-99.8 %, static on every linear + conv 92.2 %. The bar is
    99 %, hence the fp32 fallback. ``"int8-static"``: the classic PT2E static recipe,
    observers calibrated on ``calibration`` ([1, 3, H, W] each). Expert MLPs: with the switch they are spliced in
    after quantization, as dynamic int8 delegates under ``"int8"`` (each expert quantised on its own, unless its
    MoE MLP is in ``keep_fp32``) and fp32 under ``"int8-static"`` (no calibration reaches them); the gather form's
    bmm has no int8 pattern in the XNNPACK quantizer and stays fp32. A per-token V-MoE's experts are linears
    (``token.py``) and are quantised as any other.
    """
    if quantize is not None and quantize not in INT8_SCHEMES:
        raise ValueError(f"unknown quantization {quantize!r}: expected one of {sorted(INT8_SCHEMES)}")
    rewrites = None
    if xnnpack_rewrite:
        model, rewrites = for_xnnpack(model)
    moe, gather_why = has_experts(model), _gather_reason(model, expert_switch)
    switch = moe and gather_why is None
    steps = 3 + (quantize is not None) + (switch or quantize is not None)
    fast = cached_delegate_tracing() if fast_lowering else contextlib.nullcontext()
    int8: list[nn.Module] = []  # the switch's ExpertMlp modules whose experts are lowered int8
    with Progress("lowering to .pte", total=steps) as progress, quiet_libraries(), fast, torch.no_grad():
        with opaque_experts(model) if switch else contextlib.nullcontext(model) as traced:
            progress.stage("torch.export")
            ep = torch.export.export(traced, (example,))
            progress.advance()
            gm = ep.module()
            if quantize is not None:
                progress.stage(f"quantising ({quantize})")
                gm = _quantized(gm, traced, example, quantize, calibration, keep_fp32)
                progress.advance()
            if switch:
                progress.add_total(count_expert_ops(gm) * _num_experts(model))
                progress.stage("lowering the experts")
                # dynamic int8 experts but those the accuracy check keeps fp32 (by their ExpertMlp's name)
                if quantize == "int8":
                    int8 = [m for n, m in opaque_expert_mlps(traced).items() if n not in keep_fp32]
                lowering = ExpertLowering(reuse=fast_lowering, int8=int8)
                splice_switches(gm, example, lowering, progress.advance)
            if switch or quantize is not None:
                progress.stage("torch.export (strict)" if switch else "torch.export")
                # strict: a program that calls lowered modules only traces with dynamo (see switch.py)
                ep = torch.export.export(gm, (example,), strict=switch)
                progress.advance()
        buf, report = _to_executorch(ep, progress)
    report["rewrites"] = rewrites
    report["expert_dispatch"] = "switch" if switch else "gather" if moe else None
    report["int8_expert_mlps"] = len(int8)
    if gather_why:
        report["expert_dispatch_reason"] = gather_why
    return buf, report


def _gather_reason(model: nn.Module, expert_switch: bool) -> str | None:
    """Why a MoE keeps the gather form (None: it takes the switch, or it has no experts)."""
    if not has_experts(model):
        return None
    if not expert_switch:
        return "expert_switch=False"
    if max((m.top_k for m in model.modules() if isinstance(m, Router)), default=0) > 1:
        # K > 1 keeps the first expert's cond output alive while the next expert's cond runs, and executorch
        # 1.5's memory planner can place both in the same arena (wrong outputs; pytorch/executorch#21490).
        return "K > 1: sibling cond outputs can alias in ExecuTorch's memory plan (executorch#21490)"
    return None


def _num_experts(model: nn.Module) -> int:
    return max((m.num_experts for m in model.modules() if isinstance(m, Router)), default=0)


def _to_executorch(ep: Any, progress: Progress) -> tuple[bytes, dict[str, Any]]:
    """Exported program -> (.pte bytes, delegation report): edge dialect, XNNPACK partitions, ExecuTorch."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    progress.stage("edge dialect + XNNPACK")
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    progress.advance()
    report = _delegation_report(edge.exported_program().graph_module)
    progress.stage("ExecuTorch program")
    buf = edge.to_executorch().buffer
    progress.advance()
    return buf, report


def _in_modules(names: Collection[str]) -> Callable[[Any], bool]:
    """Quantizer filter: nodes inside one of the named modules."""

    def f(node: Any) -> bool:
        return any(path in names for path, _ in node.meta.get("nn_module_stack", {}).values())

    return f


def _quantized(
    gm: torch.fx.GraphModule,
    model: nn.Module,
    example: torch.Tensor,
    quantize: str,
    calibration: Iterable[torch.Tensor],
    keep_fp32: Collection[str],
) -> torch.fx.GraphModule:
    """PT2E: the exported graph with ``quantize``'s quantizer, prepared, calibrated and converted."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _integer_safe(XNNPACKQuantizer)()
    if quantize == "int8":
        cfg = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
        quantizer.set_operator_type(torch.ops.aten.linear.default, cfg)
        quantizer.filter_fn = _in_modules(set(int8_candidates(model)) - set(keep_fp32))
        calibration = [example]  # dynamic: scales come from each input, nothing to calibrate
    else:
        # Linear and conv only: int8 residual adds/muls cost ViTs top-1 agreement (90% with everything
        # quantised on the quick models) and save little time. Only those of nn.Linear / nn.Conv2d
        # modules: the rewrite's layer-norm statistics and token mean are linears too, and in int8
        # they cost agreement (95.8% on the test MoE).
        cfg = get_symmetric_quantization_config(is_per_channel=True)
        for op in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
            quantizer.set_operator_type(op, cfg)
        quantizer.filter_fn = _in_modules(
            {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        )
    prepared = prepare_pt2e(gm, quantizer)
    n = 0
    for x in calibration:
        prepared(x)
        n += 1
    if n == 0:
        raise ValueError("int8-static quantization needs at least one calibration image")
    return convert_pt2e(prepared)


def _integer_safe(cls: type) -> type:
    """``XNNPACKQuantizer`` whose scalar-to-tensor step leaves integer add / mul alone.

    Before annotating, executorch's quantizer turns the scalar operand of every ``add`` / ``mul`` into a float
    tensor, so integer index arithmetic (a per-token MoE's buffer slots: ``expert * P + position``) becomes
    float, and the scatter that reads it fails ("Expected dtype int32/int64 for index"). Only float maths can
    be quantised anyway.
    """

    class IntegerSafe(cls):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            hidden = {}
            for n in model.graph.nodes:
                val = n.meta.get("val")
                if n.target in _SCALAR_OPS and isinstance(val, torch.Tensor) and not val.is_floating_point():
                    hidden[n], n.target = n.target, _SCALAR_OPS[n.target]  # a target the step skips
            try:
                return super().transform_for_annotation(model)
            finally:
                for n, target in hidden.items():
                    n.target = target
                model.recompile()

    return IntegerSafe


_SCALAR_OPS = {torch.ops.aten.add.Tensor: operator.add, torch.ops.aten.mul.Tensor: operator.mul}


def _delegation_report(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """Which edge ops went into XNNPACK subgraphs and which stay on ExecuTorch's portable kernels.

    Counts the branches of control flow (``torch.cond``) too: an expert switch's experts are delegates there.
    """
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir.graph_module import get_control_flow_submodules

    delegated: collections.Counter[str] = collections.Counter()
    portable: collections.Counter[str] = collections.Counter()
    subgraphs = 0
    todo = [graph_module]
    while todo:
        gm = todo.pop()
        info = get_delegation_info(gm)
        subgraphs += info.num_delegated_subgraphs
        for name, b in info.delegation_by_operator.items():
            if name == "getitem":  # tuple unpacking, not a kernel
                continue
            delegated[name] += b.delegated
            portable[name] += b.non_delegated
        todo.extend(sub for _, sub, _ in get_control_flow_submodules(gm))
    return {
        "backend": "XnnpackBackend",
        "num_delegated_subgraphs": subgraphs,
        "delegated_ops": {k: v for k, v in sorted(delegated.items()) if v},
        "portable_ops": {k: v for k, v in sorted(portable.items()) if v},
    }


def clean_op_name(name: str) -> str:
    """'aten_native_layer_norm_default' -> 'aten.native_layer_norm' for printing."""
    name = re.sub(r"_(default|Tensor|Scalar|int|dim|dims|self|dim_int_list|tensor)$", "", name)
    return name.replace("aten_", "aten.", 1)


class PteRunner:
    """A .pte loaded in the ExecuTorch runtime; its input shape is static (batch 1), so batches run per image."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from executorch.runtime import Runtime

        with captured_output():  # the runtime's C++ CPU probing prints to stderr on its first load
            self.program = Runtime.get().load_program(Path(path))
            self.method = self.program.load_method("forward")

    def __call__(self, x: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
        outs = []
        for i in range(x.shape[0]):
            outs.append(self.method.execute([x[i : i + 1].contiguous()])[0])
            if progress is not None:
                progress.advance()
        return torch.cat(outs)
