"""Lowering and running one model in each format: ExecuTorch (.pte, XNNPACK), Core ML (.mlpackage), ONNX.

These helpers do no verification and no file bookkeeping; ``mobile_vmoe.export.core.export_model`` does both.
The benchmark (benchmarks/export_latency.py) uses them directly to lower models without the parity pass.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobile_vmoe.models.moe import Router

from .quantize import int8_candidates
from .switch import has_experts, opaque_experts, splice_switches, switch_experts

__all__ = [
    "lower_pte",
    "PteRunner",
    "export_onnx",
    "OnnxRunner",
    "convert_coreml",
    "mil_op_stats",
    "save_coreml",
]


# ---------------------------------------------------------------------------------------------------------------
# ExecuTorch
# ---------------------------------------------------------------------------------------------------------------


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


INT8_SCHEMES = {
    "int8": "PT2E dynamic int8 (XNNPACKQuantizer) of every transformer linear (attention qkv and proj, MLP fc1 and "
    "fc2): symmetric per-channel int8 weights, activations quantised per inference; the classifier head, router, "
    "patch embedding, attention matmuls and expert MLPs stay fp32",
    "int8-static": "PT2E static int8 (XNNPACKQuantizer): linear + conv, symmetric per-channel weights, per-tensor "
    "activations calibrated on real images; attention matmuls, residual adds, expert MLPs stay fp32",
}


def _in_modules(names: Collection[str]) -> Callable[[Any], bool]:
    """Quantizer filter: nodes inside one of the named modules."""

    def f(node: Any) -> bool:
        return any(path in names for path, _ in node.meta.get("nn_module_stack", {}).values())

    return f


def lower_pte(
    model: nn.Module,
    example: torch.Tensor,
    quantize: str | None = None,
    calibration: Iterable[torch.Tensor] = (),
    *,
    keep_fp32: Collection[str] = (),
    xnnpack_rewrite: bool = True,
    expert_switch: bool = True,
) -> tuple[bytes, dict[str, Any]]:
    """Eval-mode model -> (.pte bytes, delegation report); ``quantize`` one of ``INT8_SCHEMES``.

    ``xnnpack_rewrite`` (default on) lowers ``rewrite.for_xnnpack(model)``: the same maths with attention and
    layer norm in ops XNNPACK runs, so whole blocks stay in one XNNPACK subgraph (off: for comparison only).
    ``expert_switch`` (default on) runs a MoE's experts as ``torch.cond`` branches, each expert lowered to
    XNNPACK on its own with constant weights (``switch.splice_switches``), instead of gathering the chosen
    experts' weights every inference; the experts stay fp32 in int8 programs. K=1 only: with K > 1 executorch 1.5
    can alias two conds' outputs, so those keep the gather form (the report says why).
    ``"int8"`` (default int8): dynamic quantisation of the transformer's linears but ``keep_fp32`` (module
    names; ``quantize.select_fp32_layers`` picks them for a trained model). Top-1 agreement with fp32 on
    500 held-out images of the built-in demo models (D=64, 16 tokens; dense / MoE; the range over different
    500-image samples): dynamic on every transformer linear 98.2-99.2 / 98.8-99.6 %, with the head too
    97.8 / 99.4 %, dynamic MLPs only 99.2-99.4 / 99.4-99.8 %, static on every linear + conv 92.2 %. The bar is
    99 %, hence the fp32 fallback. ``"int8-static"``: the classic PT2E static recipe,
    observers calibrated on ``calibration`` ([1, 3, H, W] each). Neither touches the expert MLPs: with the switch
    they are spliced in after quantization, and the gather form's bmm has no int8 pattern in the XNNPACK quantizer.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from .rewrite import for_xnnpack

    if quantize is not None and quantize not in INT8_SCHEMES:
        raise ValueError(f"unknown quantization {quantize!r}: expected one of {sorted(INT8_SCHEMES)}")
    rewrites = None
    if xnnpack_rewrite:
        model, rewrites = for_xnnpack(model)
    moe = has_experts(model)
    top_k = max((m.top_k for m in model.modules() if isinstance(m, Router)), default=0)
    gather_why = None
    if moe and not expert_switch:
        gather_why = "expert_switch=False"
    elif moe and top_k > 1:
        # K > 1 keeps the first expert's cond output alive while the next expert's cond runs, and executorch
        # 1.5's memory planner can place both in the same arena (wrong outputs; pytorch/executorch#21490).
        gather_why = "K > 1: sibling cond outputs can alias in ExecuTorch's memory plan (executorch#21490)"
    switch = moe and gather_why is None
    with torch.no_grad(), opaque_experts(model) if switch else contextlib.nullcontext(model) as model:
        ep = torch.export.export(model, (example,))
        gm = ep.module()
        if quantize is not None:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer()
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
            gm = convert_pt2e(prepared)
        if switch:
            splice_switches(gm, example)
        if switch or quantize is not None:
            # strict: a program that calls lowered modules only traces with dynamo (see switch.py)
            ep = torch.export.export(gm, (example,), strict=switch)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    report = _delegation_report(edge.exported_program().graph_module)
    report["rewrites"] = rewrites
    report["expert_dispatch"] = "switch" if switch else "gather" if moe else None
    if gather_why:
        report["expert_dispatch_reason"] = gather_why
    return edge.to_executorch().buffer, report


class PteRunner:
    """A .pte loaded in the ExecuTorch runtime; its input shape is static (batch 1), so batches run per image."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.method.execute([x[i : i + 1].contiguous()])[0] for i in range(x.shape[0])]
        return torch.cat(outs)


# ---------------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], *, expert_switch: bool = True
) -> str | None:
    """torch.onnx dynamo export with a dynamic batch axis, weights inside the one file, then onnx's checker.

    ``expert_switch`` (default on): a MoE's experts become ``If`` branches with constant weights, which ONNX
    Runtime pre-packs (``switch.ExpertSwitch``); a batch whose images chose different experts takes the gather
    form. Off: the gather form only. Returns the MoE's expert dispatch, "switch" or "gather" (None: dense).
    """
    import onnx

    dispatch = None
    if has_experts(model):
        dispatch = "switch" if expert_switch else "gather"
    if dispatch == "switch":
        model = switch_experts(model)
    if example.shape[0] == 1:
        # Traced at batch 1, a cond branch specialises the batch to 1 (torch specialises sizes 0 and 1).
        example = example.expand(2, *example.shape[1:])
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return dispatch


class OnnxRunner:
    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.numpy().astype(np.float32)})[0]
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------------------
# Core ML
# ---------------------------------------------------------------------------------------------------------------


class _CoreMLWrapper(nn.Module):
    """What the .mlpackage computes: optional 1/std scaling (ImageType has one scale for all channels, so it
    carries 1/255 and -mean, and the per-channel 1/std lives here) and softmax, so that the classifier's
    probability dictionary holds probabilities."""

    def __init__(self, model: nn.Module, inv_std: torch.Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.scale = inv_std is not None
        self.register_buffer(
            "inv_std", inv_std.reshape(1, -1, 1, 1) if inv_std is not None else torch.ones(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale:
            x = x * self.inv_std
        return self.model(x).softmax(dim=-1)


def convert_coreml(
    model: nn.Module,
    input_size: tuple[int, int],
    class_names: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    image_input: bool = True,
    precision: str = "fp16",
    weights: str | None = None,
    palettize_bits: int | None = None,
    target: str = "iOS17",
) -> Any:
    """Convert to an ML program (classifier with ``class_names``); returns the coremltools MLModel.

    ``image_input``: an RGB ImageType whose scale/bias (and a per-channel 1/std multiply in the graph) apply the
    model's normalisation, so apps pass pixels; else a float tensor already normalised as in PyTorch.
    ``weights="int8"``: linear symmetric int8 weight quantisation; ``palettize_bits``: k-means palettisation.
    """
    import coremltools as ct

    H, W = input_size
    shape = (1, 3, H, W)
    uniform_std = max(std) - min(std) < 1e-12
    if image_input:
        if uniform_std:  # everything fits in the ImageType's scale and bias
            inv_std = None
            scale = 1.0 / (255.0 * std[0])
            bias = [-m / std[0] for m in mean]
        else:
            inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32)
            scale = 1.0 / 255.0
            bias = [-m for m in mean]
        inputs = [
            ct.ImageType(name="image", shape=shape, scale=scale, bias=bias, color_layout=ct.colorlayout.RGB)
        ]
    else:
        inv_std = None
        inputs = [ct.TensorType(name="image", shape=shape, dtype=np.float32)]
    wrapper = _CoreMLWrapper(model, inv_std).eval()
    with torch.no_grad():
        ep = torch.export.export(wrapper, (torch.zeros(shape),)).run_decompositions({})
    mlmodel = ct.convert(
        ep,
        convert_to="mlprogram",
        inputs=inputs,
        classifier_config=ct.ClassifierConfig(list(class_names)),
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )
    if weights == "int8":
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OptimizationConfig,
            linear_quantize_weights,
        )

        cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
        mlmodel = linear_quantize_weights(mlmodel, config=cfg)
    elif weights is not None:
        raise ValueError(f"unknown Core ML weight compression {weights!r}")
    if palettize_bits:
        from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

        cfg = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=palettize_bits))
        mlmodel = palettize_weights(mlmodel, config=cfg)
    return mlmodel


MATMUL_OPS = ("matmul", "linear")


def mil_op_stats(mlmodel: Any, num_experts: int) -> dict[str, Any]:
    """Walk the MIL program (nested blocks included): op counts, matmul-like op count, and the gather ops that
    read a tensor with E rows (the stacked expert weights, possibly behind a decompression op)."""
    counts: collections.Counter[str] = collections.Counter()
    expert_gathers: list[dict[str, Any]] = []

    def walk(block: Any) -> None:
        for op in block.operations:
            counts[op.op_type] += 1
            if op.op_type.startswith("gather") and num_experts > 0:
                x = op.inputs.get("x")
                shp = tuple(int(d) for d in x.shape) if x is not None and x.shape is not None else ()
                if len(shp) >= 2 and shp[0] == num_experts:
                    expert_gathers.append(
                        {"op": op.op_type, "source": x.op.op_type if x.op else "input", "shape": list(shp)}
                    )
            for b in op.blocks:
                walk(b)

    walk(mlmodel._mil_program.functions["main"])
    return {
        "op_counts": dict(sorted(counts.items())),
        "matmul_ops": sum(counts[k] for k in MATMUL_OPS),
        "expert_weight_gathers": expert_gathers,
    }


def save_coreml(mlmodel: Any, path: Path) -> None:
    """Save to ``path`` exactly (coremltools appends .mlpackage to names without it, so stage, then rename)."""
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = stage / "model.mlpackage"
        mlmodel.save(str(staged))
        os.replace(staged, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def clean_op_name(name: str) -> str:
    """'aten_native_layer_norm_default' -> 'aten.native_layer_norm' for printing."""
    name = re.sub(r"_(default|Tensor|Scalar|int|dim|dims|self|dim_int_list|tensor)$", "", name)
    return name.replace("aten_", "aten.", 1)
