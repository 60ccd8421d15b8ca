"""ONNX: a model exported with torch.onnx (dynamo) and checked by onnx, and ONNX Runtime to run one here.

No verification and no file bookkeeping (``core.export_model`` does both).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .quiet import Progress, captured_output, quiet_libraries
from .switch import has_experts, switch_experts

__all__ = ["OnnxRunner", "export_onnx"]


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    expert_switch: bool = True,
    names: tuple[str, str] = ("image", "logits"),
) -> str | None:
    """torch.onnx dynamo export with a dynamic batch axis, weights inside the one file, then onnx's checker.

    ``expert_switch`` (default on): a MoE's experts become ``If`` branches with constant weights, which ONNX
    Runtime pre-packs (``switch.ExpertSwitch``); a batch whose images chose different experts takes the gather
    form. Off: the gather form only. ``names``: of the input and the output (a text encoder: tokens,
    text_embeds). Returns the MoE's expert dispatch, "switch" or "gather" (None: dense).
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
    with Progress("exporting to .onnx", total=2) as progress, torch.no_grad():
        progress.stage("torch.onnx.export")
        with quiet_libraries(), captured_output():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[names[0]],
                output_names=[names[1]],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                external_data=False,
                verbose=False,
            )
        progress.advance()
        progress.stage("onnx checker")
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        progress.advance()
    return dispatch


class OnnxRunner:
    """An .onnx in an ONNX Runtime CPU session (dynamic batch)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.numpy()  # integer inputs (a text encoder's tokens) keep their type
        out = self.session.run(None, {self.input_name: x.astype(np.float32) if x.dtype.kind == "f" else x})[0]
        return torch.from_numpy(out)
