"""Core ML: a model converted to an ML Program (.mlpackage), and the structural check that stands in for running
it (Core ML predicts only on Apple hardware).

No file bookkeeping (``core.export_model`` does it). ``check_structure`` is the Core ML verification: the MIL
program of a MoE must gather the stacked expert weights and hold no per-expert copies of the MLP.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .quiet import captured_output, quiet_libraries

__all__ = [
    "MATMUL_OPS",
    "check_structure",
    "convert_coreml",
    "convert_coreml_text",
    "mil_op_stats",
    "save_coreml",
]


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
    with quiet_libraries(), captured_output():
        import coremltools as ct

        inputs, inv_std = _inputs(ct, input_size, mean, std, image_input)
        wrapper = _CoreMLWrapper(model, inv_std).eval()
        with torch.no_grad():
            ep = torch.export.export(wrapper, (torch.zeros(1, 3, *input_size),)).run_decompositions({})
        mlmodel = ct.convert(
            ep,
            convert_to="mlprogram",
            inputs=inputs,
            classifier_config=ct.ClassifierConfig(list(class_names)),
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        )
        return _compressed(mlmodel, weights, palettize_bits)


def convert_coreml_text(
    model: nn.Module,
    context_length: int,
    *,
    precision: str = "fp16",
    weights: str | None = None,
    palettize_bits: int | None = None,
    target: str = "iOS17",
) -> Any:
    """A text encoder (tokens [1, L] -> embedding [1, P]) as an ML program: input ``tokens`` int32 (Core ML has
    no int64 inputs; ids < 2^31), output ``text_embeds``."""
    with quiet_libraries(), captured_output():
        import coremltools as ct

        with torch.no_grad():
            example = torch.zeros(1, context_length, dtype=torch.long)
            ep = _convertible(torch.export.export(model.eval(), (example,)).run_decompositions({}))
        mlmodel = ct.convert(
            ep,
            convert_to="mlprogram",
            inputs=[ct.TensorType(name="tokens", shape=(1, context_length), dtype=np.int32)],
            outputs=[ct.TensorType(name="text_embeds")],
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        )
        return _compressed(mlmodel, weights, palettize_bits)


def _convertible(ep: Any) -> Any:
    """``ep`` in ops coremltools 9 converts: no ``aten.alias`` (a full slice such as ``pos_embed[:, :L]``; an
    alias is its input), and ``&`` of boolean masks (the text padding's routing mask) as ``logical_and``."""
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target == torch.ops.aten.__and__.Tensor and node.meta["val"].dtype == torch.bool:
            node.target = torch.ops.aten.logical_and.default
        elif node.target == torch.ops.aten.gather.default and node.meta["val"].dtype == torch.bool:
            _gather_as_int(graph, node)  # Core ML gathers no booleans (BPR orders the padding mask)
    ep.graph_module.recompile()
    return ep


def _gather_as_int(graph: Any, node: Any) -> None:
    """A gather of a boolean tensor as one of int32 values, cast back to bool."""
    src = node.args[0]
    with graph.inserting_before(node):
        as_int = graph.call_function(torch.ops.aten._to_copy.default, (src,), {"dtype": torch.int32})
        as_int.meta["val"] = src.meta["val"].to(torch.int32)
    node.replace_input_with(src, as_int)
    val = node.meta["val"]
    node.meta["val"] = val.to(torch.int32)
    with graph.inserting_after(node):
        back = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": torch.bool})
        back.meta["val"] = val
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)


def _inputs(
    ct: Any, input_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], image_input: bool
) -> tuple[list, torch.Tensor | None]:
    """(the converter's input types, the per-channel 1/std the graph multiplies by, or None)."""
    shape = (1, 3, *input_size)
    if not image_input:
        return [ct.TensorType(name="image", shape=shape, dtype=np.float32)], None
    if max(std) - min(std) < 1e-12:  # everything fits in the ImageType's scale and bias
        inv_std = None
        scale = 1.0 / (255.0 * std[0])
        bias = [-m / std[0] for m in mean]
    else:
        inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32)
        scale = 1.0 / 255.0
        bias = [-m for m in mean]
    image = ct.ImageType(name="image", shape=shape, scale=scale, bias=bias, color_layout=ct.colorlayout.RGB)
    return [image], inv_std


def _compressed(mlmodel: Any, weights: str | None, palettize_bits: int | None) -> Any:
    """int8 weights (linear symmetric) and / or k-means palettisation."""
    if weights not in (None, "int8"):
        raise ValueError(f"unknown Core ML weight compression {weights!r}")
    if weights == "int8":
        from coremltools.optimize.coreml import (
            OpLinearQuantizerConfig,
            OptimizationConfig,
            linear_quantize_weights,
        )

        cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
        mlmodel = linear_quantize_weights(mlmodel, config=cfg)
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


def check_structure(
    model: nn.Module,
    model_name: str,
    kwargs: dict,
    mlmodel: Any,
    twin: tuple[nn.Module, torch.Tensor] | None = None,
) -> tuple[dict, list[str]]:
    """(MIL structure report, failures): Core ML's verification, since it cannot predict on Linux.

    A MoE must gather the stacked expert weights, and its matmul count must stay about the dense twin's plus
    the router's (computing all experts would add 2 * L * (E - 1) matmuls). ``twin``: the dense twin and its
    example input, where it is not the timm model of the same name without MoE layers (an image-text part).
    """
    E, L = int(getattr(model, "num_experts", 0)), int(getattr(model, "num_moe_layers", 0))
    stats = mil_op_stats(mlmodel, E)
    if not L:
        return {"dense": stats}, []
    if getattr(model, "moe_routing", None) == "token":
        dense_mm = _matmuls(*twin) if twin is not None else _dense_twin_matmuls(model_name, kwargs)
        return _check_token_structure(model, dense_mm, stats)
    dense_mm = _dense_twin_matmuls(model_name, kwargs)
    extra = stats["matmul_ops"] - dense_mm
    out: dict[str, Any] = {
        "moe": stats,
        "dense_twin_matmul_ops": dense_mm,
        "extra_matmul_ops_over_dense": extra,
        "all_experts_would_add": 2 * L * (E - 1) + 1,
    }
    failures: list[str] = []
    if len(stats["expert_weight_gathers"]) < 2 * L:
        failures.append(
            f"MIL program gathers {len(stats['expert_weight_gathers'])} stacked [E={E}, ...] expert weights, "
            f"expected >= {2 * L} (fc1 and fc2 of {L} MoE blocks)"
        )
    # Expected extra: the router's projection, and with K > 1 per MoE block the gated fc2 bias (gates @ b2).
    if extra > 1 + 2 * L:
        failures.append(
            f"MIL program has {stats['matmul_ops']} matmul/linear ops vs {dense_mm} for the dense twin: "
            f"looks like the experts are all computed (sparse compute lost)"
        )
    out["sparse_compute_preserved"] = not failures
    return out, failures


def _check_token_structure(model: nn.Module, dense_mm: int, stats: dict) -> tuple[dict, list[str]]:
    """A per-token V-MoE: its tokens reach the experts through scatter / gather into fixed buffers, and each MoE
    block adds its router and 2 * (E - 1) expert linears over the dense twin's MLP (each expert runs on its P
    buffer rows, not on every token)."""
    E, L = int(model.num_experts), int(model.num_moe_layers)
    extra = stats["matmul_ops"] - dense_mm
    want = L * (1 + 2 * (E - 1))
    ops = stats["op_counts"]
    scatters = sum(v for k, v in ops.items() if k.startswith("scatter"))
    gathers = sum(v for k, v in ops.items() if k.startswith("gather"))
    out = {"moe": stats, "dense_twin_matmul_ops": dense_mm, "extra_matmul_ops_over_dense": extra,
           "expected_extra": want, "token_scatters": scatters, "token_gathers": gathers}  # fmt: skip
    failures = []
    if extra != want:
        failures.append(f"MIL program has {extra} matmul/linear ops over the dense twin, expected {want}")
    if scatters < L or gathers < L:
        failures.append(
            f"MIL program has {scatters} scatter and {gathers} gather ops, expected >= {L} of each"
        )
    out["buffers_preserved"] = not failures
    return out, failures


def _dense_twin_matmuls(model_name: str, kwargs: dict) -> int:
    """Matmul-like ops of the MoE's dense twin (no MoE blocks) converted to MIL."""
    import timm

    if model_name.startswith("mobile_vmoe_token_"):  # the per-token family has no dense form: the same ViT
        moe_only = {"num_experts", "top_k", "num_moe_layers", "moe_placement", "capacity_ratio",
                    "eval_capacity_ratio", "bpr", "eval_bpr", "cls_first", "eval_cls_first", "noise_std", "group_size",
                    "eval_group_size"}  # fmt: skip
        twin_name = model_name.replace("mobile_vmoe_token_", "mobile_vit_")
        twin = timm.create_model(twin_name, **{k: v for k, v in kwargs.items() if k not in moe_only}).eval()
    else:
        twin = timm.create_model(model_name, **{**kwargs, "num_moe_layers": 0}).eval()
    return _matmuls(twin, torch.zeros(1, 3, *twin.patch_embed.img_size))


def _matmuls(twin: nn.Module, example: torch.Tensor) -> int:
    """Matmul-like ops of ``twin`` converted to MIL."""
    with quiet_libraries(), captured_output():
        import coremltools as ct

        with torch.no_grad():
            ep = _convertible(torch.export.export(twin, (example,)).run_decompositions({}))
        twin_ml = ct.convert(ep, convert_to="milinternal", minimum_deployment_target=ct.target.iOS17)
    return sum(1 for t in _iter_ops(twin_ml.functions["main"]) if t in MATMUL_OPS)


def _iter_ops(block: Any) -> Iterator[str]:
    for op in block.operations:
        yield op.op_type
        for b in op.blocks:
            yield from _iter_ops(b)


def save_coreml(mlmodel: Any, path: Path) -> None:
    """Save to ``path`` exactly (coremltools appends .mlpackage to names without it, so stage, then rename).

    The staging folder is named like ``common.atomic_path``'s temporaries (``.NAME.*.tmp``), so that an export
    that was killed here leaves nothing the next export of the same target does not clean.
    """
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = stage / "model.mlpackage"
        with quiet_libraries(), captured_output():
            mlmodel.save(str(staged))
        os.replace(staged, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
